"""Lossless metadata removal: an image's own bytes rebuilt from the parts that make its pixels.

Each rewriter keeps what a decoder needs and drops everything else: unknown, private and
metadata parts wherever they sit in the file (an EXIF block between the scans of a progressive
JPEG, a private PNG chunk, an XMP chunk in a WebP) and anything after the image's end (a second
JPEG with its own EXIF, an HTML or script payload). Embedded colour profiles are never stored:
the caller applies a profile by re-encoding, or drops it when it is sRGB (what an untagged
image means) or too large to trust (``MAX_ICC_BYTES``).

A file whose structure does not parse to its end gives None: the caller then re-encodes it from
its decoded pixels, which keeps nothing but the pixels.
"""

from __future__ import annotations

import functools
import io

from PIL import Image, ImageCms

from facecap.stages.shared.jpeg import all_segments

MAX_ICC_BYTES = 1 << 20  # larger profiles are ignored (the image is read as sRGB), never applied

# JPEG: frame headers (SOF0-15 but DHT, JPG and DAC), DHT, DAC, DQT, DRI, DNL, scans, restart
# markers, EOI. APPn (but JFIF and Adobe, rewritten to their colour fields), COM, JPGn, DHP/EXP
# (hierarchical) and reserved markers go.
JPEG_KEEP = {*range(0xC0, 0xD0)} - {0xC8} | {0xDA, 0xDB, 0xDC, 0xDD, 0xD9, *range(0xD0, 0xD8)}
JFIF = b"JFIF\x00"
ADOBE = b"Adobe"
# PNG: critical chunks and ancillary chunks that only describe the pixels (transparency, gamma,
# chromaticities, sRGB intent, significant bits, background, pixel density). Text, EXIF, time,
# profiles, animation and every private or unknown chunk go.
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEEP = {b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tRNS", b"gAMA", b"cHRM", b"sRGB", b"sBIT", b"bKGD", b"pHYs"}
# WebP: the bitstreams and the extended header; EXIF, XMP, ICCP, animation and unknown chunks go.
WEBP_KEEP = {b"VP8X", b"VP8 ", b"VP8L", b"ALPH"}
VP8X_METADATA_FLAGS = 0x20 | 0x08 | 0x04  # ICC, EXIF, XMP


def strip_metadata(data: bytes, fmt: str) -> bytes | None:
    """``data`` (of output format ``fmt``: jpg, png or webp) with only the parts that make its
    pixels, or None when its structure does not parse cleanly to its end."""
    if fmt == "jpg":
        return strip_jpeg(data)
    if fmt == "png":
        return strip_png(data)
    return strip_webp(data)


def strip_jpeg(data: bytes) -> bytes | None:
    walked = all_segments(data)
    if walked is None:
        return None
    segments, _end = walked
    out = bytearray(b"\xff\xd8")
    for segment in segments:
        body = data[segment.start : segment.end]
        if segment.marker in JPEG_KEEP:
            out += body
        else:
            out += _colour_app(segment.marker, body)
    return bytes(out)


def _colour_app(marker: int, body: bytes) -> bytes:
    """What an APP segment leaves that decoders need for colour: a JFIF header cut to its fixed
    part (version, density; no thumbnail, no extra bytes) or an Adobe segment cut to its
    colour-transform fields; nothing for any other segment. Both decide how libjpeg reads three
    components (YCbCr or RGB), so they are rewritten rather than dropped."""
    if marker == 0xE0 and body[4:9] == JFIF and len(body) >= 16:
        return b"\xff\xe0\x00\x10" + body[4:16] + b"\x00\x00"
    if marker == 0xEE and body[4:9] == ADOBE and len(body) >= 16:
        return b"\xff\xee\x00\x0e" + body[4:16]
    return b""


def strip_png(data: bytes) -> bytes | None:
    if data[:8] != PNG_SIGNATURE:
        return None
    out = bytearray(PNG_SIGNATURE)
    position = 8
    while position + 12 <= len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        end = position + 12 + length
        if end > len(data):
            return None
        if kind in PNG_KEEP:
            out += data[position:end]
        if kind == b"IEND":
            return bytes(out)
        position = end
    return None  # no IEND: truncated


def strip_webp(data: bytes) -> bytes | None:
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    end = 8 + int.from_bytes(data[4:8], "little")
    if end > len(data):
        return None
    chunks = bytearray()
    position = 12
    while position + 8 <= end:
        kind = data[position : position + 4]
        size = int.from_bytes(data[position + 4 : position + 8], "little")
        if position + 8 + size > end:
            return None
        if kind in WEBP_KEEP:
            chunk = bytearray(data[position : position + 8 + size] + b"\x00" * (size & 1))
            if kind == b"VP8X" and size >= 1:
                chunk[8] &= ~VP8X_METADATA_FLAGS & 0xFF
            chunks += chunk
        position += 8 + size + (size & 1)
    if not chunks:
        return None
    return b"RIFF" + (len(chunks) + 4).to_bytes(4, "little") + b"WEBP" + bytes(chunks)


def colour_profile(image: Image.Image) -> bytes | None:
    """The embedded ICC profile that must be applied to get sRGB pixels: None when there is none,
    when applying it changes no colour (an sRGB profile under any name: what untagged means), or
    when it is larger than ``MAX_ICC_BYTES`` or unreadable (then ignored: the image is read as
    sRGB)."""
    icc = image.info.get("icc_profile")
    if not icc or not isinstance(icc, bytes) or len(icc) > MAX_ICC_BYTES:
        return None
    try:
        if image.mode in ("RGB", "RGBA"):
            return None if _srgb_equivalent(icc) else icc
        ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return None
    return icc


# Greys, primaries, secondaries and skin tones: an RGB profile that maps all of them to
# themselves (within 2 levels) in sRGB is sRGB for our purposes.
_PROBE = bytes(
    value
    for colour in [
        *((v, v, v) for v in (0, 32, 64, 96, 128, 160, 192, 224, 255)),
        (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
        (224, 172, 140), (141, 85, 36), (198, 134, 66), (90, 60, 40),
    ]
    for value in colour
)  # fmt: skip


@functools.lru_cache(maxsize=64)
def _srgb_equivalent(icc: bytes) -> bool:
    probe = Image.frombytes("RGB", (len(_PROBE) // 3, 1), _PROBE)
    converted = ImageCms.profileToProfile(
        probe,
        ImageCms.ImageCmsProfile(io.BytesIO(icc)),
        ImageCms.createProfile("sRGB"),  # a profile per call: lcms profiles are not shared across threads
        ImageCms.Intent.RELATIVE_COLORIMETRIC,
        "RGB",
    )
    return max(abs(a - b) for a, b in zip(converted.tobytes(), _PROBE, strict=True)) <= 2
