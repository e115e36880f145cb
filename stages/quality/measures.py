"""Cheap quality measures: pure NumPy/OpenCV on a face crop, the whole image, or the landmarks.

Every function takes BGR uint8 pixels (or landmark arrays) and returns plain floats, so each
measure can be tested on real photos and synthetic degradations on its own.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

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
