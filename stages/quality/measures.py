"""Cheap quality measures: pure NumPy/OpenCV on a face crop, the whole image, or the landmarks.

Every function takes BGR uint8 pixels (or landmark arrays) and returns plain floats, so each
measure can be tested on real photos and synthetic degradations on its own.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# Where the nose tip sits between the eye line and the mouth line on a frontal face, and how far
# it stands out of the face plane relative to that eye-to-mouth height and to half the eye
# distance (average adult proportions). The ratio is the median over 149 labelled portraits in
# ../shared/data/faces with YuNet's landmarks (0.567; the ArcFace template's is 0.494): detectors
# place the nose point lower than the template does.
NOSE_RATIO_FRONTAL = 0.567
HEIGHT_OVER_NOSE_DEPTH = 2.3
HALF_EYES_OVER_NOSE_DEPTH = 1.0
SHARPNESS_SIDE = 112  # sharpness is measured at this size so it compares across crop sizes


def gray(pixels: np.ndarray) -> np.ndarray:
    return pixels if pixels.ndim == 2 else cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)


def sharpness(pixels: np.ndarray) -> tuple[float, float]:
    """(variance of the Laplacian, mean squared gradient) of the crop resized to 112 px.

    Resizing first normalises for crop size (the same face stored at 112 or at 512 scores within
    2x). Higher is sharper, and it depends on content as well: the fixture portrait
    deepface/img1.jpg scores about 13,000, 2,400 after a 6 px Gaussian blur of the photo, and the
    faces of insightface's group photo 1,300-3,800. Use it relative to a corpus's own spread.
    """
    image = gray(pixels)
    if image.shape[:2] != (SHARPNESS_SIDE, SHARPNESS_SIDE):
        image = cv2.resize(image, (SHARPNESS_SIDE, SHARPNESS_SIDE), interpolation=cv2.INTER_AREA)
    image = image.astype(np.float32)
    laplacian = float(cv2.Laplacian(image, cv2.CV_32F, ksize=3).var())
    gx = cv2.Sobel(image, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(image, cv2.CV_32F, 0, 1, ksize=3)
    return laplacian, float(np.mean(gx * gx + gy * gy)) / 16.0  # /16: Sobel's gain, in grey levels^2


def exposure(pixels: np.ndarray) -> dict[str, float]:
    """Mean luminance, share of crushed blacks and blown whites, and RMS contrast, all in [0, 1]."""
    luminance = gray(pixels).astype(np.float32) / 255.0
    return {
        "q_brightness": float(luminance.mean()),
        "q_dark_fraction": float((luminance < 16 / 255).mean()),
        "q_bright_fraction": float((luminance > 239 / 255).mean()),
        "q_contrast": float(luminance.std()),
    }


def channel_spread(pixels: np.ndarray, side: int = 256) -> float:
    """FaceCaptionHQ-4M's grayscale test: the mean over pixels of the std across B, G, R (0-255).

    A grayscale or sepia-free monochrome image is about 0; a colour photo is usually above 10.
    """
    if pixels.ndim == 2 or pixels.shape[2] == 1:
        return 0.0
    height, width = pixels.shape[:2]
    scale = side / max(height, width)
    if scale < 1:
        pixels = cv2.resize(pixels, (max(1, round(width * scale)), max(1, round(height * scale))), cv2.INTER_AREA)
    return float(pixels.astype(np.float32).std(axis=2).mean())


def head_pose(landmarks: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from the 5 landmarks (image-left eye, image-right eye, nose,
    mouth corners), by the geometry of a face whose nose tip stands out of the eye-mouth plane.

    Signs, as the image shows the face: yaw > 0 when the face turns towards the image's right,
    pitch > 0 when it tilts up, roll > 0 when the eye line rotates clockwise. Rough beyond about
    60 degrees of yaw (the far eye's landmark is a guess there); 5-point PnP was tried and was
    unstable (a pure roll moved its pitch by 30 degrees).
    """
    points = np.asarray(landmarks, np.float64).reshape(5, 2)
    eye_vector = points[1] - points[0]
    roll = math.degrees(math.atan2(eye_vector[1], eye_vector[0]))
    eye_distance = float(np.hypot(*eye_vector))
    if eye_distance < 1e-6:
        return float("nan"), float("nan"), roll
    # Undo the roll about the eye midpoint, so yaw and pitch are measured along the face's axes.
    angle = -math.radians(roll)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    eyes_mid = (points[0] + points[1]) / 2
    upright = (points - eyes_mid) @ rotation.T
    mouth_mid = (upright[3] + upright[4]) / 2
    midline_x = mouth_mid[0] / 2  # between the eye midpoint (0) and the mouth midpoint
    yaw = math.degrees(math.atan(HALF_EYES_OVER_NOSE_DEPTH * (upright[2, 0] - midline_x) / (eye_distance / 2)))
    height = mouth_mid[1]
    if height <= 1e-6:
        return yaw, float("nan"), roll
    ratio = upright[2, 1] / height
    pitch = math.degrees(math.atan((NOSE_RATIO_FRONTAL - ratio) * HEIGHT_OVER_NOSE_DEPTH))
    return yaw, pitch, roll


def frontalness(yaw: float, pitch: float) -> float:
    """1 for a face looking straight at the camera, 0 from 90 degrees of combined turn on."""
    if math.isnan(yaw) or math.isnan(pitch):
        return float("nan")
    return max(0.0, 1.0 - math.hypot(yaw, pitch) / 90.0)


def max_overlap(box: np.ndarray, others: list[np.ndarray]) -> float:
    """The largest intersection-over-union of ``box`` with the other faces of its image."""
    best = 0.0
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    area = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    for other in others:
        ox1, oy1, ox2, oy2 = (float(v) for v in other[:4])
        iw = max(0.0, min(x2, ox2) - max(x1, ox1))
        ih = max(0.0, min(y2, oy2) - max(y1, oy1))
        inter = iw * ih
        union = area + max(0.0, ox2 - ox1) * max(0.0, oy2 - oy1) - inter
        if union > 0:
            best = max(best, inter / union)
    return best
