"""The real decoded sizes of container formats, read from their bytes before anything is decoded.

An image's outer header does not always say how many pixels decoding it allocates: an ICO's
directory says 256x256 (its size fields are one byte) while the PNG or BMP inside may be
30000x30000, and Pillow decodes an ICO's largest entry inside ``Image.open``; a TIFF page is
decoded a tile at a time and the tile may be far larger than the page, or a later page far larger
than the first. ``before_open`` reads what Pillow would decode on opening, ``after_open`` what a
lazily opened image holds in its other frames and tiles; each returns why the file is refused
(a detail for ``too_many_pixels``) or None. GIF frames, APNG frames, animated WebP frames and
AVIF grids need no extra check: Pillow grows a GIF to its first frame's extent when it opens it,
libpng and libwebp refuse frames outside the canvas, libavif checks a grid against its declared
size, and only the first frame is ever decoded.
"""

from __future__ import annotations

from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_FRAMES = 10_000  # pages or frames walked to check their sizes; more is refused
TIFF_TILE_WIDTH, TIFF_TILE_LENGTH = 322, 323


def before_open(data: bytes, max_pixels: int) -> str | None:
    """Why ``data`` is refused before Pillow opens it (which for ICO decodes it), or None."""
    for index, declared, (width, height) in _ico_entries(data):
        if width * height > max_pixels:
            return f"ICO entry {index} holds a {width}x{height} image (its directory says {declared[0]}x{declared[1]})"
    return None


def open_cost(data: bytes) -> int:
    """Pixels that Pillow decodes inside ``Image.open`` (an ICO's entries), at most."""
    return max((width * height for _, _, (width, height) in _ico_entries(data)), default=0)


def _ico_entries(data: bytes) -> list[tuple[int, tuple[int, int], tuple[int, int]]]:
    """(index, size its directory declares, real size) of every ICO entry whose header reads."""
    if data[:4] != b"\x00\x00\x01\x00":
        return []
    found = []
    for index in range(int.from_bytes(data[4:6], "little")):
        entry = data[6 + 16 * index : 22 + 16 * index]
        if len(entry) < 16:
            break  # a broken directory: Pillow refuses it
        offset = int.from_bytes(entry[12:16], "little")
        size = embedded_size(data[offset : offset + 26])
        if size:
            found.append((index, (entry[0] or 256, entry[1] or 256), size))
    return found


def embedded_size(head: bytes) -> tuple[int, int] | None:
    """Width and height of an ICO entry: a PNG's IHDR, or a BMP info header (whose height counts
    the AND mask too, so the image is half of it)."""
    if head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if len(head) < 12:
        return None
    header_size = int.from_bytes(head[0:4], "little")
    if header_size == 12:  # BITMAPCOREHEADER
        return int.from_bytes(head[4:6], "little"), int.from_bytes(head[6:8], "little") // 2
    width = abs(int.from_bytes(head[4:8], "little", signed=True))
    height = abs(int.from_bytes(head[8:12], "little", signed=True))
    return width, height // 2


def after_open(image: Image.Image, fmt: str, max_pixels: int) -> str | None:
    """Why an opened (not yet decoded) image is refused: a frame or a TIFF tile over
    ``max_pixels``, or more than ``MAX_FRAMES`` frames. Leaves the image on its first frame."""
    if fmt != "TIFF":
        return None
    frames = getattr(image, "n_frames", 1)
    if frames > MAX_FRAMES:
        return f"{frames} pages (at most {MAX_FRAMES})"
    try:
        for frame in range(frames):
            if frame:
                image.seek(frame)
            width, height = image.size
            if width * height > max_pixels:
                return f"page {frame} is {width}x{height}, over max_pixels {max_pixels}"
            tags = getattr(image, "tag_v2", {})
            tile = _number(tags.get(TIFF_TILE_WIDTH)) * _number(tags.get(TIFF_TILE_LENGTH))
            if tile > max_pixels:
                return f"page {frame} is decoded in tiles of {tile} pixels, over max_pixels {max_pixels}"
    finally:
        if image.tell():
            image.seek(0)
    return None


def _number(value: object) -> int:
    if isinstance(value, tuple):
        value = value[0] if value else 0
    return int(value) if isinstance(value, (int, float)) else 0
