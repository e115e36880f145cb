"""Decoding a stored image for detect: at the scale detection needs, and again only where crops need more.

TurboJPEG (``stages/shared/jpeg.py``) decodes an upright JPEG at any M/8 scale and only a region;
OpenCV decodes everything else (PNG, WebP, CMYK, EXIF-rotated JPEGs) at 1, 1/2, 1/4 or 1/8.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from fractions import Fraction

import cv2
import numpy as np
from PIL import Image

from facecap.stages.detect.detectors import downscale
from facecap.stages.shared.images import ORIENTATION_TAG, decode_bgr
from facecap.stages.shared.jpeg import TurboJpeg, has_exif, scaled, turbojpeg

REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
OPENCV_SCALES = [Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1)]
JPEG_START = b"\xff\xd8"
# Pixels kept around a crop's source rectangle, so interpolation at its edge reads real pixels.
CROP_MARGIN = 2


@dataclass(frozen=True)
class CropSource:
    """Decoded pixels the crops are cut from: full pixels per pixel, and where pixels[0, 0] lies."""

    pixels: np.ndarray
    factor: tuple[float, float]
    origin: tuple[int, int] = (0, 0)


@dataclass
class StoredImage:
    """A stored image decoded for detection at the scale it needs, and again only where crops need more.

    Detection runs at most ``max_side`` pixels, so a large JPEG is decoded at a reduced DCT scale
    (libjpeg's scaling): decoding, not the detector, was the stage's main cost. With TurboJPEG
    (stages/shared/jpeg.py) that is the smallest of its M/8 scales that keeps ``max_side`` pixels and
    crops decode only the region around the faces; without it, OpenCV's 1/2, 1/4 and 1/8.
    """

    data: bytes
    size: tuple[int, int]  # full width, height (upright)
    pixels: np.ndarray  # the detection decode, at a reduced scale when the image is large
    factor: tuple[float, float]  # full pixels per pixel of ``pixels``, x and y
    turbo: TurboJpeg | None = None  # set when TurboJPEG decoded it (an upright JPEG)
    _decodes: dict[int, np.ndarray] = field(default_factory=dict)  # OpenCV decodes by reduction

    @classmethod
    def open(cls, data: bytes, max_side: int) -> StoredImage | None:
        turbo = turbojpeg()
        if turbo is not None and data[:2] == JPEG_START and _upright(data):
            header = turbo.header(data)
            decoded = turbo.decode(data, turbo.scale_at_least(header, max_side)) if header else None
            if decoded is not None:
                pixels = decoded.pixels
                factor = (header.width / pixels.shape[1], header.height / pixels.shape[0])
                return cls(data, (header.width, header.height), pixels, factor, turbo)
        return cls._open_with_opencv(data, max_side)

    @classmethod
    def _open_with_opencv(cls, data: bytes, max_side: int) -> StoredImage | None:
        size = _upright_size(data)  # read once: it picks the reduction and maps boxes back
        reduction = _reduction(size, max_side)
        pixels = _opencv_decode(data, reduction)
        if pixels is None or not pixels.size:
            return None
        if size is None or reduction == 1:
            return cls(data, (pixels.shape[1], pixels.shape[0]), pixels, (1.0, 1.0), _decodes={1: pixels})
        return cls(data, size, pixels, (size[0] / pixels.shape[1], size[1] / pixels.shape[0]))

    def detection_view(self, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
        """The image at most ``max_side`` pixels for the detector, and full pixels per its pixel.

        The DCT decode leaves up to 2x too many pixels; below 1.5x the rest of the shrink is
        bilinear, not the area averaging the detector's own downscale uses (which stays beyond).
        """
        small, fx, fy = downscale(self.pixels, max_side, linear_below=1.5)
        return small, (self.factor[0] * fx, self.factor[1] * fy)

    def crop_scale(self, limit: float) -> Fraction:
        """The coarsest decode scale with at most ``limit`` full pixels per pixel (crops keep every
        detail they store); 0 when the detection decode already is that fine."""
        if max(self.factor) <= limit + 1e-6:
            return Fraction(0)
        scales = self.turbo.scales if self.turbo is not None else OPENCV_SCALES
        return next(s for s in scales if s >= 1 / limit - 1e-9) if limit >= 1 else Fraction(1)

    def crop_source(self, scale: Fraction, bounds: tuple[float, float, float, float]) -> CropSource:
        """Pixels at ``scale`` (from ``crop_scale``) covering ``bounds`` (x1, y1, x2, y2 in full
        pixels; parts outside the image need no pixels).

        Crops rarely need full resolution: a 512 crop of an 1100 px face square is as sharp from
        a 1/2-scale decode, which the detection image often already is. Where they need more,
        TurboJPEG decodes only the faces' region: a second whole decode cost more than detecting.
        """
        if scale == 0:
            return CropSource(self.pixels, self.factor)
        if self.turbo is not None:
            width, height = (scaled(side, scale) for side in self.size)
            fx, fy = self.size[0] / width, self.size[1] / height
            x1, y1, x2, y2 = bounds
            region = (
                math.floor(x1 / fx) - CROP_MARGIN,
                math.floor(y1 / fy) - CROP_MARGIN,
                math.ceil(x2 / fx) + CROP_MARGIN,
                math.ceil(y2 / fy) + CROP_MARGIN,
            )
            decoded = self.turbo.decode(self.data, scale, region)
            if decoded is not None:
                return CropSource(decoded.pixels, (fx, fy), decoded.origin)
        reduction = scale.denominator if scale.numerator == 1 and self.data[:2] == JPEG_START else 1
        pixels = self._decodes.get(reduction)
        if pixels is None:
            pixels = self._decodes[reduction] = _opencv_decode(self.data, reduction)
        return CropSource(pixels, (self.size[0] / pixels.shape[1], self.size[1] / pixels.shape[0]))


def _opencv_decode(data: bytes, reduction: int) -> np.ndarray | None:
    """The image's pixels at 1/``reduction`` scale; a full-scale decode is shared, within a fused
    shard task, with the later stages that decode the same image (``decode_bgr``: quality)."""
    if reduction == 1:
        return decode_bgr(data)
    return cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED[reduction])  # no later stage decodes this


def _upright(data: bytes) -> bool:
    """Whether the JPEG needs no EXIF rotation (OpenCV applies it; libjpeg alone does not)."""
    if not has_exif(data):
        return True
    header = _pil_header(data)
    return header is not None and header[1] == 1  # unreadable: let OpenCV decide how to read it


def _pil_header(data: bytes) -> tuple[tuple[int, int], int | None] | None:
    """Pillow's reading of the headers: the stored width and height, and the EXIF orientation
    (None when the EXIF block is damaged); None when Pillow cannot open the image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
            try:
                return size, image.getexif().get(ORIENTATION_TAG, 1)
            except Exception:
                return size, None
    except Exception:
        return None


def _upright_size(data: bytes) -> tuple[int, int] | None:
    """The image's size as OpenCV returns it: EXIF orientations 5-8 swap width and height."""
    header = _pil_header(data) if data[:2] == JPEG_START else None
    if header is None or header[1] is None:
        return None
    (width, height), orientation = header
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _reduction(size: tuple[int, int] | None, max_side: int) -> int:
    """The largest JPEG DCT reduction that still leaves at least ``max_side`` pixels (1 without a size)."""
    if size is None:
        return 1
    return next((f for f in (8, 4, 2) if max(size) // f >= max_side), 1)
