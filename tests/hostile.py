"""Hostile and awkward image files, made in the test run (nothing committed)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

GPS_IFD = 0x8825
ORIENTATION = 0x0112


def jpeg(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, **save)
    return buffer.getvalue()


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def gradient(width: int = 320, height: int = 240) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.uint8)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB")


def exif_rotated_with_gps() -> bytes:
    """A 300x200 JPEG whose EXIF says 'rotate 90° clockwise' and that carries GPS and camera tags."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    exif[0x010F] = "SpyCam Inc."  # Make
    exif[0x0110] = "Model X"  # Model
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)})
    return jpeg(gradient(300, 200), exif=exif.tobytes())


def upright_with_gps() -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "SpyCam Inc."
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (52.0, 31.0, 12.0)})
    return jpeg(gradient(300, 200), exif=exif.tobytes(), comment=b"private comment")


def cmyk_jpeg() -> bytes:
    return jpeg(gradient().convert("CMYK"))


def png16() -> bytes:
    ramp = np.linspace(0, 65535, 200 * 100, dtype=np.uint16).reshape(100, 200)
    return png(Image.fromarray(ramp))  # mode I;16


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (64, 48), color) for color in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def palette_with_transparency() -> bytes:
    image = Image.new("RGBA", (80, 60), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (20, 20, 60, 40))
    return png(image.convert("P"))


def png_bomb(side: int = 100_000) -> bytes:
    """A PNG whose header claims side x side pixels; the body is a few kB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    body = zlib.compress(bytes(side + 1) * 16, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def write_hostile_files(folder: Path, photo: bytes) -> dict[str, bytes]:
    """Write each hostile file into ``folder``; returns name -> bytes."""
    files = {
        "truncated.jpg": photo[: len(photo) * 6 // 10],
        "page.jpg": b"<!DOCTYPE html><html><body>Not found</body></html>",
        "vector.svg": b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><circle r="4"/></svg>',
        "empty.jpg": b"",
        "one_pixel.png": png(Image.new("RGB", (1, 1), (9, 9, 9))),
        "sliver.png": png(Image.new("L", (60_000, 1), 128)),
        "bomb.png": png_bomb(),
        "cmyk.jpg": cmyk_jpeg(),
        "sixteen_bit.png": png16(),
        "animated.gif": animated_gif(),
        "rotated_gps.jpg": exif_rotated_with_gps(),
        "upright_gps.jpg": upright_with_gps(),
        "palette_alpha.png": palette_with_transparency(),
        "garbage.jpg": bytes(range(256)) * 4,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return files
