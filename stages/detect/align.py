"""Face crops: ArcFace-aligned (5-point similarity), tight box, and FaceCaption's enlarged square.

Pixels a crop takes from outside the image are black; the box and square crops say whether
that happened, so a dataset can flag faces cut by the image border.
"""

from __future__ import annotations

import cv2
import numpy as np

# Alignment lives in stages/shared (the identity helpers align reference photos the same way).
from facecap.stages.shared.align import ARCFACE_TEMPLATE_112, aligned_crop, alignment_matrix, similarity_transform

__all__ = [
    "ARCFACE_TEMPLATE_112",
    "aligned_crop",
    "alignment_matrix",
    "box_crop",
    "padded_crop",
    "similarity_transform",
    "square_crop",
]


def box_crop(image: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, bool]:
    """The rounded box's pixels, not resized (at least 1x1); parts outside the image black. Bool: padded."""
    x1, y1, x2, y2 = (round(float(v)) for v in box[:4])
    return padded_crop(image, x1, y1, max(x2, x1 + 1), max(y2, y1 + 1))


def square_crop(image: np.ndarray, box: np.ndarray, scale: float = 1.5, size: int = 512) -> tuple[np.ndarray, bool]:
    """A square of side scale * the box's longer side around the box centre, resized to size.

    FaceCaption-15M's crops (Face-MakeUp's enlargeImage) take this square at 1.5x, so the whole
    head and some context show. Parts outside the image are black. Bool: padded.
    """
    x1, y1, x2, y2 = (float(v) for v in box[:4])
    side = max(1, round(scale * max(x2 - x1, y2 - y1)))
    left = round((x1 + x2) / 2 - side / 2)
    top = round((y1 + y2) / 2 - side / 2)
    crop, padded = padded_crop(image, left, top, left + side, top + side)
    # Area averaging only where linear would alias (over 2x): it costs ten times as much, and
    # the detect stage crops from a decode at most 2x larger than needed.
    if side > 2 * size:
        interpolation = cv2.INTER_AREA
    elif side > size:
        interpolation = cv2.INTER_LINEAR
    else:
        interpolation = cv2.INTER_CUBIC
    return cv2.resize(crop, (size, size), interpolation=interpolation), padded


def padded_crop(image: np.ndarray, x1: int, y1: int, x2: int, y2: int) -> tuple[np.ndarray, bool]:
    """image[y1:y2, x1:x2] where the rectangle may reach outside: those pixels are black. Bool: it did."""
    height, width = image.shape[:2]
    inside = x1 >= 0 and y1 >= 0 and x2 <= width and y2 <= height
    if inside:
        return image[y1:y2, x1:x2].copy(), False
    crop = np.zeros((y2 - y1, x2 - x1, *image.shape[2:]), image.dtype)
    sx1, sy1, sx2, sy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    if sx1 < sx2 and sy1 < sy2:
        crop[sy1 - y1 : sy2 - y1, sx1 - x1 : sx2 - x1] = image[sy1:sy2, sx1:sx2]
    return crop, True
