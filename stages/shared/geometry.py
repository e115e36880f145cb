"""Face geometry from the 5 detector landmarks, used by quality (pose rules) and tag (pose columns)."""

from __future__ import annotations

import math

import numpy as np

# Where the nose tip sits between the eye line and the mouth line on a frontal face, and how far
# it stands out of the face plane relative to that eye-to-mouth height and to half the eye
# distance (average adult proportions). The ratio is the median over 149 labelled portraits in
# ../shared/data/faces with YuNet's landmarks (0.567; the ArcFace template's is 0.494): detectors
# place the nose point lower than the template does.
NOSE_RATIO_FRONTAL = 0.567
HEIGHT_OVER_NOSE_DEPTH = 2.3
HALF_EYES_OVER_NOSE_DEPTH = 1.0


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
