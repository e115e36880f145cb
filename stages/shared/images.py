"""Check, normalise and resize downloaded images; strip their metadata.

Every failure is an ``ImageRejected`` with a short reason (the status suffix) and a detail.
When nothing needs to change (same format, RGB, upright, right size) the original bytes are
kept, with metadata segments removed losslessly; otherwise the image is decoded (JPEGs at a
reduced DCT scale when they will be shrunk anyway), converted to 8-bit RGB, turned upright,
resized and encoded without any metadata.

Before anything is decoded, the real size of what would be decoded is checked against
``max_pixels`` (containers such as ICO and TIFF hide it: ``containers``), and a worker process
decodes at most ``decode_pixels_in_flight`` pixels at once (``PixelBudget``), however many
download threads it runs. Lossless metadata removal is ``metadata``'s.

Pillow reads every header and handles the unusual files (palette, alpha, 16-bit, CMYK with a
colour profile, animations); the common case, a plain RGB or gray JPEG/PNG/WebP, is decoded,
resized (area averaging when shrinking) and encoded by OpenCV, which is 1.5-3x faster here.
"""

from __future__ import annotations

import collections
import contextlib
import io
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from facecap.pipeline.shard_cache import cached
from facecap.stages.shared import containers
from facecap.stages.shared.jpeg import turbojpeg
from facecap.stages.shared.metadata import colour_profile, strip_metadata

# Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS) stays as it is: our max_pixels
# is checked first, on the real size of what will be decoded (facecap.stages.shared.containers).

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop", "border"]
OutputFormat = Literal["jpg", "webp", "png"]
PIL_FORMAT = {"jpg": "JPEG", "webp": "WEBP", "png": "PNG"}
MIME = {"jpg": "image/jpeg", "webp": "image/webp", "png": "image/png"}
SUPPORTED = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO", "AVIF", "ICO"}
OPEN_FORMATS = sorted(SUPPORTED - {"MPO"})  # Pillow's JPEG reader opens MPO files itself
ORIENTATION_TAG = 0x0112


class ImageSettings(BaseModel):
    """img2dataset's resize options, and limits that keep hostile files harmless."""

    model_config = ConfigDict(extra="forbid")

    resize_mode: ResizeMode = Field("no", description="FaceCaption-15M kept original sizes ('no')")
    image_size: int = Field(512, ge=8, le=16384)
    resize_only_if_bigger: bool = False
    max_aspect_ratio: float | None = Field(None, gt=0, description="reject wider/taller images (after EXIF)")
    min_image_size: int = Field(0, ge=0, description="reject images whose smaller side is smaller")
    output_format: OutputFormat = "jpg"
    quality: int = Field(95, ge=1, le=100, description="jpg/webp encoder quality")
    max_pixels: int = Field(50_000_000, ge=1, description="larger images are refused before decoding")
    keep_original_bytes: bool = Field(
        True,
        description="store an image that needs no change as its own bytes minus metadata; false re-encodes every image",
    )
    decode_pixels_in_flight: int = Field(
        100_000_000, ge=1, description="pixels decoded at once per worker process; more waits its turn"
    )


class ImageRejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class NormalizedImage:
    data: bytes
    ext: str
    mime: str
    width: int
    height: int
    original_width: int
    original_height: int
    reencoded: bool


class PixelBudget:
    """At most ``capacity`` pixels being decoded at once in this process, first come first served;
    one image larger than the whole budget runs alone. The download threads of a worker share it,
    so their memory stays bounded however many images are in flight."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._used = 0
        self._queue: collections.deque[object] = collections.deque()

    @contextlib.contextmanager
    def hold(self, pixels: int, capacity: int) -> Iterator[None]:
        if pixels <= 0:
            yield
            return
        ticket = object()
        with self._condition:
            self._queue.append(ticket)
            while self._queue[0] is not ticket or (self._used and self._used + pixels > capacity):
                self._condition.wait()
            self._queue.popleft()
            self._used += pixels
            self._condition.notify_all()
        try:
            yield
        finally:
            with self._condition:
                self._used -= pixels
                self._condition.notify_all()

    @property
    def used(self) -> int:
        return self._used


DECODING = PixelBudget()
# What Pillow and its codecs raise on malformed data (a fuzz run meets every one of these).
DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    zlib.error,
    Image.DecompressionBombError,
)


def normalize(data: bytes, settings: ImageSettings) -> NormalizedImage:
    """The image to store for ``data``, or ImageRejected saying why there is none."""
    _sniff(data)
    problem = containers.before_open(data, settings.max_pixels)
    if problem:
        raise ImageRejected("too_many_pixels", problem)
    with DECODING.hold(containers.open_cost(data), settings.decode_pixels_in_flight):
        image = _open(data)
    fmt = image.format or "?"
    if fmt not in SUPPORTED:
        raise ImageRejected("unsupported_format", f"{fmt} images are not supported")
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected("undecodable", f"image claims size {width}x{height}")
    if width * height > settings.max_pixels:
        raise ImageRejected("too_many_pixels", f"{width}x{height} exceeds max_pixels {settings.max_pixels}")
    try:
        problem = containers.after_open(image, fmt, settings.max_pixels)
        if problem:
            raise ImageRejected("too_many_pixels", problem)
        with DECODING.hold(width * height, settings.decode_pixels_in_flight):
            return _normalize(data, image, fmt, settings)
    except DECODE_ERRORS as exc:
        raise ImageRejected(_decode_reason(exc), f"image does not decode: {type(exc).__name__}: {exc}") from None


def _open(data: bytes) -> Image.Image:
    """Open (lazily, except ICO) with the supported formats' readers only."""
    try:
        return Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
    except UnidentifiedImageError:
        other = _other_format(data)
        if other:
            raise ImageRejected("unsupported_format", f"{other} images are not supported") from None
        raise ImageRejected("not_an_image", f"unrecognised image data (starts with {data[:12]!r})") from None
    except Image.DecompressionBombError as exc:
        raise ImageRejected("too_many_pixels", str(exc)) from None
    except DECODE_ERRORS as exc:
        raise ImageRejected("undecodable", f"cannot read image header: {exc}") from None


def _other_format(data: bytes) -> str | None:
    """The format of an image Pillow knows but we do not read (named from its signature only)."""
    Image.init()
    prefix = data[:16]
    for name in Image.ID:
        _factory, accept = Image.OPEN[name]
        if name in SUPPORTED or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except DECODE_ERRORS:  # some signature checks read past a very short body
            continue
    return None


def _normalize(data: bytes, image: Image.Image, fmt: str, settings: ImageSettings) -> NormalizedImage:
    width, height = image.size
    orientation = _orientation(image)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    _check_shape(upright, settings)
    target = target_size(upright, settings)
    stored = None
    if _can_keep(image, fmt, orientation, upright, target, settings):
        # The original bytes minus everything that is not pixels, if those decode without a
        # single error; otherwise the image is re-encoded from what does decode (or refused).
        candidate = strip_metadata(data, settings.output_format)
        stored = candidate if candidate is not None and _decodes_cleanly(candidate, fmt) else None
    reencoded = stored is None
    pixels = _cv2_decode(data, fmt, orientation, image.size, target) if reencoded and _plain(image, fmt) else None
    if pixels is not None:
        pixels = resize_array(pixels, settings)
        stored, (height, width) = encode_array(pixels, settings), pixels.shape[:2]
    elif reencoded:
        resized = resize(_decode_rgb(image, fmt, orientation, target), settings)
        stored, (width, height) = encode(resized, settings), resized.size
    return NormalizedImage(
        data=stored,
        ext=settings.output_format,
        mime=MIME[settings.output_format],
        width=width,
        height=height,
        original_width=upright[0],
        original_height=upright[1],
        reencoded=reencoded,
    )


def _sniff(data: bytes) -> None:
    if not data:
        raise ImageRejected("empty_body", "the response had no body")
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        raise ImageRejected("unsupported_format", "SVG (vector) images are not supported")
    if head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head:
        raise ImageRejected("not_an_image", "the server sent an HTML page")
    if head[:1] in (b"{", b"[") or head.startswith(b"<?xml"):
        raise ImageRejected("not_an_image", "the server sent text (JSON or XML)")


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block only means we cannot trust the orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _check_shape(size: tuple[int, int], settings: ImageSettings) -> None:
    width, height = size
    ratio = max(width, height) / min(width, height)
    if settings.max_aspect_ratio and ratio > settings.max_aspect_ratio:
        raise ImageRejected("aspect_ratio", f"aspect ratio {ratio:.2f} exceeds {settings.max_aspect_ratio}")
    if settings.min_image_size and min(width, height) < settings.min_image_size:
        raise ImageRejected("too_small", f"{width}x{height} is smaller than min_image_size {settings.min_image_size}")


def target_size(size: tuple[int, int], settings: ImageSettings) -> tuple[int, int]:
    """The size the image is scaled to before any crop or border (the upright orientation)."""
    width, height = size
    mode, side = settings.resize_mode, settings.image_size
    if mode == "no":
        return size
    # keep_ratio / center_crop fit the smaller side; keep_ratio_largest / border the larger one.
    fit = min(width, height) if mode in ("keep_ratio", "center_crop") else max(width, height)
    scale = side / fit
    if settings.resize_only_if_bigger and scale >= 1:
        return size
    return max(1, round(width * scale)), max(1, round(height * scale))


def _can_keep(
    image: Image.Image,
    fmt: str,
    orientation: int,
    upright: tuple[int, int],
    target: tuple[int, int],
    settings: ImageSettings,
) -> bool:
    if not settings.keep_original_bytes:
        return False
    if fmt != PIL_FORMAT[settings.output_format] or orientation != 1 or image.mode != "RGB":
        return False
    if getattr(image, "n_frames", 1) > 1 or target != upright or colour_profile(image) is not None:
        return False
    squares = settings.resize_mode in ("center_crop", "border")
    return not squares or upright[0] == upright[1]


def _decodes_cleanly(data: bytes, fmt: str) -> bool:
    """Whether bytes about to be stored as they are decode completely: for a JPEG without one
    libjpeg warning (corrupt or extraneous data) when libjpeg-turbo's own API is at hand."""
    if fmt == "JPEG" and (turbo := turbojpeg()) is not None:
        return turbo.decode(data) is not None
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION) is not None


def _has_end_marker(data: bytes) -> bool:
    """A complete JPEG has an EOI marker after its last scan (0xFF is byte-stuffed inside scans)."""
    end = data.rfind(b"\xff\xd9")
    return end > data.rfind(b"\xff\xda")


def _plain(image: Image.Image, fmt: str) -> bool:
    """A file OpenCV decodes exactly as we want: no palette, alpha, 16-bit, profile or animation."""
    return (
        fmt in ("JPEG", "PNG", "WEBP")
        and image.mode in ("RGB", "L")
        and colour_profile(image) is None
        and "transparency" not in image.info
        and getattr(image, "n_frames", 1) == 1
    )


REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


def _cv2_decode(
    data: bytes, fmt: str, orientation: int, stored: tuple[int, int], target: tuple[int, int]
) -> np.ndarray | None:
    """Decode to BGR, at 1/2, 1/4 or 1/8 scale when a JPEG will be shrunk anyway, then upright;
    None for a PNG or WebP that OpenCV does not decode (Pillow then tries, and says why)."""
    flag = cv2.IMREAD_COLOR
    if fmt == "JPEG":
        if not _has_end_marker(data):
            raise ImageRejected("truncated_image", "the JPEG ends before its end-of-image marker")
        wanted = (target[1], target[0]) if orientation in (5, 6, 7, 8) else target
        for factor in (8, 4, 2):
            if stored[0] // factor >= wanted[0] and stored[1] // factor >= wanted[1]:
                flag = REDUCED[factor]
                break
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None and fmt == "JPEG":
        raise ImageRejected("truncated_image", "the JPEG data does not decode")
    return None if pixels is None else _upright(pixels, orientation)


def _upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an array."""
    if orientation in (5, 7):
        pixels = cv2.transpose(pixels)
    operation = {
        2: lambda p: cv2.flip(p, 1),
        3: lambda p: cv2.rotate(p, cv2.ROTATE_180),
        4: lambda p: cv2.flip(p, 0),
        6: lambda p: cv2.rotate(p, cv2.ROTATE_90_CLOCKWISE),
        7: lambda p: cv2.rotate(p, cv2.ROTATE_180),
        8: lambda p: cv2.rotate(p, cv2.ROTATE_90_COUNTERCLOCKWISE),
    }.get(orientation)
    return operation(pixels) if operation else pixels


def resize_array(pixels: np.ndarray, settings: ImageSettings) -> np.ndarray:
    height, width = pixels.shape[:2]
    target = target_size((width, height), settings)
    if target != (width, height):
        shrink = target[0] < width
        pixels = cv2.resize(pixels, target, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
    side = settings.image_size
    height, width = pixels.shape[:2]
    if settings.resize_mode == "center_crop" and (width, height) != (side, side):
        top, left = (height - side) // 2, (width - side) // 2
        pixels = pixels[top : top + side, left : left + side]
    elif settings.resize_mode == "border" and (width, height) != (side, side):
        canvas = np.zeros((side, side, 3), np.uint8)
        top, left = (side - height) // 2, (side - width) // 2
        canvas[top : top + height, left : left + width] = pixels
        pixels = canvas
    return pixels


def encode_array(pixels: np.ndarray, settings: ImageSettings) -> bytes:
    fmt = settings.output_format
    if fmt == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, settings.quality]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, settings.quality]
    else:
        params = [cv2.IMWRITE_PNG_COMPRESSION, 3]
    ok, encoded = cv2.imencode(f".{fmt}", pixels, params)
    if not ok:
        raise ImageRejected("undecodable", f"could not encode {fmt}")
    return encoded.tobytes()


def _decode_reason(exc: BaseException) -> str:
    if isinstance(exc, Image.DecompressionBombError):
        return "too_many_pixels"
    text = str(exc).lower()
    return "truncated_image" if "truncated" in text or "premature" in text else "undecodable"


def _decode_rgb(image: Image.Image, fmt: str, orientation: int, target: tuple[int, int]) -> Image.Image:
    if fmt == "JPEG" and image.mode in ("RGB", "L", "CMYK", "YCbCr"):
        # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result is shrunk anyway.
        wanted = (target[1], target[0]) if orientation in (5, 6, 7, 8) else target
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.draft("RGB", wanted)
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # animations: the first frame
        image.load()
        rgb = _to_rgb(image)
    except DECODE_ERRORS as exc:
        raise ImageRejected(_decode_reason(exc), f"image does not decode: {exc}") from None
    if orientation != 1:
        rgb = ImageOps.exif_transpose(_with_orientation(rgb, orientation))
    return rgb


def _with_orientation(image: Image.Image, orientation: int) -> Image.Image:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    image.info["exif"] = exif.tobytes()
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    icc = colour_profile(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.uint32 if mode == "I" else np.uint16)
        top = 65535 if mode != "I" or array.max() > 255 else 255
        image = Image.fromarray((array.astype(np.float32) * (255.0 / top)).clip(0, 255).astype(np.uint8), "L")
        mode = "L"
    elif mode == "F":
        array = np.asarray(image, dtype=np.float32)
        span = float(array.max() - array.min()) or 1.0
        image = Image.fromarray(((array - array.min()) * (255.0 / span)).astype(np.uint8), "L")
        mode = "L"
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas become white, as a viewer would show them on a page.
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        image = background
    elif mode == "CMYK" and icc:
        image = _to_srgb(image, icc, "RGB")
        icc = None
    elif mode != "RGB":
        image = image.convert("RGB")
    if icc and image.mode == "RGB":
        image = _to_srgb(image, icc, "RGB")
    return image


def _to_srgb(image: Image.Image, icc: bytes, output_mode: str) -> Image.Image:
    """Apply an embedded colour profile, so dropping it with the metadata keeps the colours."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        return ImageCms.profileToProfile(image, source, ImageCms.createProfile("sRGB"), outputMode=output_mode)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return image.convert(output_mode)


def resize(image: Image.Image, settings: ImageSettings) -> Image.Image:
    target = target_size(image.size, settings)
    if target != image.size:
        image = image.resize(target, Image.Resampling.LANCZOS, reducing_gap=3.0)
    side = settings.image_size
    if settings.resize_mode == "center_crop" and image.size != (side, side):
        left = (image.width - side) // 2
        top = (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    elif settings.resize_mode == "border" and image.size != (side, side):
        canvas = Image.new("RGB", (side, side), (0, 0, 0))
        canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        image = canvas
    return image


def encode(image: Image.Image, settings: ImageSettings) -> bytes:
    buffer = io.BytesIO()
    fmt = settings.output_format
    image.info.clear()  # nothing of the source's info (a profile, EXIF, text) is written
    if fmt == "jpg":
        image.save(buffer, "JPEG", quality=settings.quality)
    elif fmt == "webp":
        image.save(buffer, "WEBP", quality=settings.quality, method=4)
    else:
        image.save(buffer, "PNG", compress_level=3)
    return buffer.getvalue()


def decode_bgr(data: bytes | None) -> np.ndarray | None:
    """Stored image or crop bytes as BGR pixels, or None when absent or undecodable.

    Within a fused shard task the pixels are decoded once for every stage that reads the same
    bytes (quality and tag both read the aligned crop), and are then read-only.
    """
    if not data:
        return None
    return cached("bgr", data, lambda: _imdecode_bgr(data))


def _imdecode_bgr(data: bytes) -> np.ndarray | None:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return pixels if pixels is not None and pixels.size else None
