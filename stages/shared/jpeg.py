"""JPEG decoding through libjpeg-turbo's TurboJPEG 3 API: any of its M/8 scales, and a region.

OpenCV decodes a JPEG whole, at 1, 1/2, 1/4 or 1/8 scale. TurboJPEG 3 (libjpeg-turbo 3.0 or
later) also scales by 3/8, 5/8, 3/4 and 7/8, so a 1000 px photo is decoded straight to 750 px
for a 640 px detector instead of in full and then shrunk; and it decodes a cropping region:
rows below the region are never decoded and the IDCT skips everything outside it, so the face
crops of a 4000 px photo cost a fraction of a full decode.

The library is found, in this order, at ``FACECAP_TURBOJPEG`` (a path; ``off`` disables it),
inside the ``turbojpeg`` wheel (its bundled libturbojpeg; facecap calls the library's C API
through ctypes, not that wheel's own bindings), or as a system libturbojpeg 3. Without one,
``turbojpeg()`` is None and callers decode with OpenCV. Like libjpeg's own decoders this ignores
EXIF orientation: callers use it for upright images only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import importlib.util
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

TJINIT_DECOMPRESS = 1
TJPARAM_STOPONWARNING, TJPARAM_SUBSAMP, TJPARAM_JPEGWIDTH, TJPARAM_JPEGHEIGHT = 0, 4, 5, 6
TJPF_BGR = 1
# The MCU width of each chroma subsampling (TJSAMP_444, 422, 420, GRAY, 440, 411, 441): a cropping
# region must start on a scaled MCU boundary.
MCU_WIDTHS = (8, 16, 16, 8, 8, 32, 8)


class _Scaling(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


UNCROPPED = _Region(0, 0, 0, 0)


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    subsampling: int  # TJSAMP_*, -1 when unusual

    def scaled_size(self, scale: Fraction) -> tuple[int, int]:
        return scaled(self.width, scale), scaled(self.height, scale)


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # BGR, uint8
    origin: tuple[int, int]  # where pixels[0, 0] lies in the whole image at the decode's scale


def scaled(length: int, scale: Fraction) -> int:
    """libjpeg's scaled length (TJSCALED): rounded up."""
    return -(-length * scale.numerator // scale.denominator)


@dataclass(frozen=True)
class Segment:
    """One marker segment of a JPEG's headers: its marker and where it lies in the file."""

    marker: int
    start: int
    end: int


def header_segments(data: bytes) -> tuple[list[Segment], int, bool]:
    """The marker segments after SOI, up to the first scan: (segments, where the walk stopped,
    whether it stopped at a start-of-scan). Fill bytes are skipped; a walk that meets a byte that
    is not a marker, or runs out of data, stops there with False."""
    segments: list[Segment] = []
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return segments, position, False
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
            continue
        if marker == 0xDA:  # start of scan: the headers are over
            return segments, position, True
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        segments.append(Segment(marker, position, end))
        position = end
    return segments, position, False


# In entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker (0xD0-0xD7);
# any other byte after it (fill bytes aside) is the marker that ends the scan.
_SCAN_END = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length


def all_segments(data: bytes) -> tuple[list[Segment], int] | None:
    """Every marker segment from SOI to EOI, progressive files' segments between scans included:
    (segments, the offset just past EOI). A start-of-scan segment spans its header and the
    entropy-coded data after it. None when the file is not a well-formed JPEG up to its EOI
    (truncated, a byte where a marker should be, a length past the end)."""
    if data[:2] != b"\xff\xd8":
        return None
    segments: list[Segment] = []
    position = 2
    size = len(data)
    while position + 2 <= size:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
            continue
        if marker == 0xD9:
            segments.append(Segment(marker, position, position + 2))
            return segments, position + 2
        if marker in STANDALONE:
            segments.append(Segment(marker, position, position + 2))
            position += 2
            continue
        if marker in (0x00, 0xD8) or position + 4 > size:
            return None
        end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        if end - position < 4 or end > size:
            return None
        if marker == 0xDA:
            found = _SCAN_END.search(data, end)
            if found is None:
                return None
            end = found.start()
        segments.append(Segment(marker, position, end))
        position = end
    return None


def has_exif(data: bytes) -> bool:
    """Whether an Exif APP1 segment comes before the image data; True when the headers do not parse
    (the caller then asks a full EXIF parser). A few reads an image."""
    segments, _, at_scan = header_segments(data)
    exif = any(s.marker == 0xE1 and data[s.start + 4 : s.start + 10] == b"Exif\x00\x00" for s in segments)
    return exif or not at_scan


class TurboJpeg:
    """BGR decodes at a TurboJPEG scale, whole or of a region; None where the data is not a clean JPEG."""

    def __init__(self, library: ctypes.CDLL, path: str):
        self.path = path
        self._library = _declare(library)
        count = ctypes.c_int()
        factors = self._library.tj3GetScalingFactors(ctypes.byref(count))
        every = {Fraction(factors[i].num, factors[i].denom) for i in range(count.value)}
        self.scales = sorted(s for s in every if s <= 1)  # smallest first; upscaling is never wanted

    @contextlib.contextmanager
    def _decompressor(self) -> Iterator[int]:
        """A fresh handle per image (about a microsecond): a handle is not thread-safe, and one
        that failed keeps the last image's header. Warnings (truncated or corrupt data) are errors:
        such images go to OpenCV, which decodes them as it always has."""
        handle = self._library.tj3Init(TJINIT_DECOMPRESS)
        if not handle:
            raise MemoryError("libturbojpeg could not create a decompressor (tj3Init)")
        try:
            self._library.tj3Set(handle, TJPARAM_STOPONWARNING, 1)
            yield handle
        finally:
            self._library.tj3Destroy(handle)

    def header(self, data: bytes) -> JpegHeader | None:
        with self._decompressor() as handle:
            return self._header(handle, data)

    def _header(self, handle: int, data: bytes) -> JpegHeader | None:
        if self._library.tj3DecompressHeader(handle, data, len(data)) != 0:
            return None
        get = self._library.tj3Get
        header = JpegHeader(
            get(handle, TJPARAM_JPEGWIDTH), get(handle, TJPARAM_JPEGHEIGHT), get(handle, TJPARAM_SUBSAMP)
        )
        return header if header.width > 0 and header.height > 0 else None

    def scale_at_least(self, header: JpegHeader, side: int) -> Fraction:
        """The smallest scale that leaves the longer side at least ``side`` pixels (1 for small images)."""
        longest = max(header.width, header.height)
        return next((s for s in self.scales if scaled(longest, s) >= side), Fraction(1))

    def decode(
        self, data: bytes, scale: Fraction = Fraction(1), region: tuple[int, int, int, int] | None = None
    ) -> Decoded | None:
        """The image at ``scale`` (one of ``scales``); with ``region`` (x1, y1, x2, y2 in scaled
        pixels, clipped to the image) only that part, widened left to the MCU grid as libjpeg needs.
        """
        with self._decompressor() as handle:
            return self._decode(handle, data, scale, region)

    def _decode(
        self, handle: int, data: bytes, scale: Fraction, region: tuple[int, int, int, int] | None
    ) -> Decoded | None:
        header = self._header(handle, data)  # a decode starts from the header it loads
        if header is None or self._library.tj3SetScalingFactor(handle, _Scaling(scale.numerator, scale.denominator)):
            return None
        width, height = header.scaled_size(scale)
        x1, y1, x2, y2 = _clipped(region, width, height) if region else (0, 0, width, height)
        if (x1, y1, x2, y2) != (0, 0, width, height) and header.subsampling in range(len(MCU_WIDTHS)):
            x1 -= x1 % scaled(MCU_WIDTHS[header.subsampling], scale)
            cropping = _Region(x1, y1, x2 - x1, y2 - y1)
        else:
            x1, y1, x2, y2 = 0, 0, width, height  # an unusual subsampling: whole, sliced below
            cropping = UNCROPPED
        if self._library.tj3SetCroppingRegion(handle, cropping) != 0:
            return None
        pixels = np.empty((y2 - y1, x2 - x1, 3), np.uint8)
        if self._library.tj3Decompress8(handle, data, len(data), pixels.ctypes.data, pixels.strides[0], TJPF_BGR):
            return None
        if region and cropping is UNCROPPED:
            rx1, ry1, rx2, ry2 = _clipped(region, width, height)
            return Decoded(pixels[ry1:ry2, rx1:rx2], (rx1, ry1))
        return Decoded(pixels, (x1, y1))


def _clipped(region: tuple[int, int, int, int], width: int, height: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = region
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    return x1, y1, min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)


def _declare(library: ctypes.CDLL) -> ctypes.CDLL:
    handle, buffer, size, c_int = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int
    signatures = {
        "tj3Init": ([c_int], handle),
        "tj3Destroy": ([handle], None),
        "tj3DecompressHeader": ([handle, buffer, size], c_int),
        "tj3Get": ([handle, c_int], c_int),
        "tj3GetScalingFactors": ([ctypes.POINTER(c_int)], ctypes.POINTER(_Scaling)),
        "tj3SetScalingFactor": ([handle, _Scaling], c_int),
        "tj3SetCroppingRegion": ([handle, _Region], c_int),
        "tj3Decompress8": ([handle, buffer, size, ctypes.c_void_p, c_int, c_int], c_int),
        "tj3Set": ([handle, c_int, c_int], c_int),
    }
    for name, (arguments, result) in signatures.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library


def _candidates() -> list[str]:
    """Where a libturbojpeg 3 may be: the turbojpeg wheel's bundled copy, then the system's."""
    found: list[str] = []
    spec = importlib.util.find_spec("turbojpeg")
    if spec is not None and spec.origin:
        site = Path(spec.origin).parent
        for folder in ("turbojpeg.libs", "turbojpeg.dylibs", ".dylibs", ""):
            found += sorted(str(p) for p in (site / folder).glob("*turbojpeg*") if _is_library(p))
    system = ctypes.util.find_library("turbojpeg")
    return [*found, *([system] if system else [])]


def _is_library(path: Path) -> bool:
    name = path.name
    return (
        name.startswith(("libturbojpeg", "turbojpeg"))
        and (".so" in name or name.endswith((".dylib", ".dll")))
        and ("cpython" not in name and ".pyd" not in name)
    )


@functools.cache
def turbojpeg() -> TurboJpeg | None:
    """The first libturbojpeg with the TurboJPEG 3 API that loads, or None (then use OpenCV)."""
    setting = os.environ.get("FACECAP_TURBOJPEG", "")
    if setting.lower() in ("off", "0", "none"):
        return None
    for path in [setting] if setting else _candidates():
        try:
            library = ctypes.CDLL(path)
            if hasattr(library, "tj3Init") and hasattr(library, "tj3SetCroppingRegion"):
                return TurboJpeg(library, path)
        except OSError:
            continue
    return None
