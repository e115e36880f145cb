"""ArcFace alignment: the 5 detector landmarks warped onto the 112x112 template (a similarity).

Used by detect (its aligned crops) and by the identity helpers (reference photos), so that a
reference face is aligned exactly like the dataset's ``aligned112`` crops.
"""

from __future__ import annotations

import cv2
import numpy as np

# insightface's arcface_dst: where the 5 landmarks of a 112x112 ArcFace crop lie.
ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    np.float32,
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 least-squares similarity (rotation, uniform scale, shift) taking src points to dst.

    In 2D the matrix [[a, -b], [b, a]] spans every rotation with scale, so the least-squares fit
    has a closed form (Umeyama's result without its SVD, a third of the time). Exact and
    deterministic, unlike cv2.estimateAffinePartial2D, whose RANSAC may drop a landmark.
    """
    src = np.asarray(src, np.float64).reshape(-1, 2)
    dst = np.asarray(dst, np.float64).reshape(-1, 2)
    src_mean, dst_mean = src.mean(axis=0), dst.mean(axis=0)
    (x, y), (u, v) = (src - src_mean).T, (dst - dst_mean).T
    spread = float(x @ x + y @ y)
    a, b = (float(x @ u + y @ v) / spread, float(x @ v - y @ u) / spread) if spread > 0 else (1.0, 0.0)
    matrix = np.array([[a, -b, 0.0], [b, a, 0.0]])
    matrix[:, 2] = dst_mean - matrix[:, :2] @ src_mean
    return matrix


def alignment_matrix(landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The 2x3 transform that aligned_crop applies: landmarks onto the template scaled to size/112."""
    return similarity_transform(landmarks, ARCFACE_TEMPLATE_112 * (size / 112.0))


def aligned_crop(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """A size x size crop with the 5 landmarks warped onto the ArcFace template; outside pixels black."""
    matrix = alignment_matrix(landmarks, size)
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
