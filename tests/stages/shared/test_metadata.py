"""Metadata never survives the lossless path: wherever it hides in a JPEG, PNG or WebP, and
whatever follows the image's end, only the parts that make the pixels are stored."""

from __future__ import annotations

import io

import hostile
import numpy as np
import pytest
from PIL import Image

from facecap.stages.shared.images import ImageSettings, normalize
from facecap.stages.shared.jpeg import all_segments
from facecap.stages.shared.metadata import MAX_ICC_BYTES, colour_profile, strip_metadata

SECRET = hostile.SECRET


def pixels(data: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    image.load()
    return np.asarray(image.convert("RGB"))


def stored_losslessly(data: bytes, fmt: str = "jpg") -> bytes:
    """Normalise ``data`` for output ``fmt``; check it kept its own pixels without a re-encode."""
    result = normalize(data, ImageSettings(output_format=fmt))
    assert not result.reencoded
    assert np.array_equal(pixels(result.data), pixels(data))
    return result.data


def assert_clean(stored: bytes) -> None:
    assert SECRET not in stored
    assert b"Exif" not in stored and b"<script" not in stored and b"ICC_PROFILE" not in stored


@pytest.mark.parametrize("marker", [0xE1, 0xED, 0xFE], ids=["exif_app1", "iptc_app13", "comment"])
def test_metadata_between_progressive_scans_is_dropped(marker):
    data = hostile.progressive_with_metadata_between_scans(marker)
    assert SECRET in data or b"Exif" in data
    stored = stored_losslessly(data)
    assert_clean(stored)
    assert stored.count(b"\xff\xda") == data.count(b"\xff\xda")  # every scan is still there


@pytest.mark.parametrize("trailer", ["jpeg", "html", "zip"])
def test_anything_after_the_jpeg_end_is_dropped(trailer):
    clean = hostile.jpeg(hostile.gradient())
    data = hostile.with_trailer(clean, trailer)
    stored = stored_losslessly(data)
    assert_clean(stored)
    assert stored == clean  # a Pillow JPEG has only JFIF, tables and one scan: all of it is kept


def test_a_progressive_jpeg_with_a_trailer_keeps_every_scan_and_nothing_after():
    data = hostile.with_trailer(hostile.progressive_with_metadata_between_scans(), "jpeg")
    stored = stored_losslessly(data)
    assert_clean(stored)
    assert stored.endswith(b"\xff\xd9") and stored.count(b"\xff\xd8") == 1


def test_app_segments_needed_for_colour_stay_and_thumbnails_go():
    data = hostile.jpeg(hostile.gradient())
    jfif = data[2:20]
    assert jfif[:4] == b"\xff\xe0\x00\x10" and jfif[4:9] == b"JFIF\x00"  # Pillow's, without a thumbnail
    adobe = hostile.jpeg_segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01")
    thumbnail = hostile.jpeg_segment(0xE0, b"JFXX\x00\x10" + SECRET)
    assert strip_metadata(data[:2] + adobe + thumbnail + data[2:], "jpg") == data[:2] + adobe + data[2:]
    # A JFIF header with a thumbnail and an Adobe segment with extra bytes keep their colour fields.
    with_thumbnail = hostile.jpeg_segment(0xE0, jfif[4:16] + b"\x02\x01" + bytes(6) + SECRET)
    long_adobe = hostile.jpeg_segment(0xEE, adobe[4:] + SECRET)
    stripped = strip_metadata(data[:2] + with_thumbnail + long_adobe + data[20:], "jpg")
    assert SECRET not in stripped
    assert stripped == data[:2] + jfif + adobe + data[20:]  # Pillow's JFIF says 0x0 thumbnail already


def test_a_jpeg_that_does_not_walk_to_its_end_is_reencoded_not_kept():
    data = hostile.jpeg(hostile.gradient())
    scan = data.index(b"\xff\xda")
    broken = data[:scan] + b"\x00garbage" + data[scan:]  # bytes where a marker must be
    assert all_segments(broken) is None and strip_metadata(broken, "jpg") is None
    assert all_segments(data) is not None
    truncated = data[: len(data) - 2]
    assert all_segments(truncated) is None


@pytest.mark.parametrize("kind", [b"prVt", b"tEXt", b"iTXt", b"eXIf", b"zzZz", b"caBX"])
@pytest.mark.parametrize("where", ["before_idat", "after_idat", "after_iend"])
def test_png_private_and_unknown_chunks_and_trailers_are_dropped(kind, where):
    data = hostile.png_with_chunk(kind, where)
    stored = stored_losslessly(data, "png")
    assert_clean(stored)
    assert stored.endswith(b"IEND\xaeB`\x82")


def test_png_profiles_go_and_pixel_chunks_stay():
    image = hostile.gradient(64, 48)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", icc_profile=hostile.srgb_profile(), dpi=(72, 72))
    data = buffer.getvalue()
    assert b"iCCP" in data and b"pHYs" in data
    stored = stored_losslessly(data, "png")
    assert b"iCCP" not in stored and b"pHYs" in stored


@pytest.mark.parametrize(
    "extra, trailer",
    [
        (hostile.webp_chunk(b"EXIF", hostile.gps_exif()), b""),
        (hostile.webp_chunk(b"XMP ", SECRET), b""),
        (hostile.webp_chunk(b"prVt", SECRET), b""),
        (b"", b"<html><script>" + SECRET + b"</script></html>"),
        (b"", hostile.webp_chunk(b"EXIF", SECRET)),
    ],
    ids=["exif", "xmp", "private_chunk", "html_after_riff", "chunk_after_riff"],
)
def test_webp_keeps_only_its_bitstream(extra, trailer):
    data = hostile.webp_with(extra, trailer)
    stored = stored_losslessly(data, "webp")
    assert_clean(stored)
    assert int.from_bytes(stored[4:8], "little") + 8 == len(stored)


def test_webp_extended_header_loses_its_metadata_flags():
    exif = Image.Exif()
    exif[0x010F] = SECRET.decode()
    data = hostile.webp_lossless(exif=exif.tobytes(), icc_profile=hostile.srgb_profile())
    assert data[12:16] == b"VP8X" and data[20] & 0x28
    stored = stored_losslessly(data, "webp")
    assert_clean(stored)
    assert b"ICCP" not in stored
    assert stored[12:16] == b"VP8X" and not stored[20] & 0x2C


def test_a_megabyte_icc_profile_is_not_stored():
    profile = hostile.srgb_profile() + bytes(3_000_000)  # an sRGB profile padded to 3 MB
    data = hostile.jpeg_with_icc(profile)
    assert len(data) > 3_000_000
    stored = stored_losslessly(data)
    assert len(stored) < 60_000 and b"ICC_PROFILE" not in stored


@pytest.mark.parametrize("profile", [hostile.srgb_profile, hostile.renamed_srgb_profile])
def test_an_srgb_profile_is_dropped_without_reencoding(profile):
    data = hostile.jpeg_with_icc(profile())
    assert colour_profile(Image.open(io.BytesIO(data))) is None  # sRGB by what it does, not its name
    stored = stored_losslessly(data)
    assert b"ICC_PROFILE" not in stored


def test_another_profile_is_applied_and_not_stored():
    red = Image.new("RGB", (64, 48), (220, 20, 20))
    data = hostile.jpeg_with_icc(hostile.swapped_primaries_profile(), red)
    assert colour_profile(Image.open(io.BytesIO(data))) is not None
    for fmt in ("jpg", "png", "webp"):
        result = normalize(data, ImageSettings(output_format=fmt))
        assert result.reencoded
        stored = Image.open(io.BytesIO(result.data))
        assert "icc_profile" not in stored.info, fmt
        r, _, b = pixels(result.data)[24, 32]
        assert b > 150 and r < 80, (fmt, r, b)  # the profile says this red is blue: applied


def test_profiles_over_the_bound_are_ignored():
    swapped = hostile.swapped_primaries_profile()
    assert colour_profile(Image.open(io.BytesIO(hostile.jpeg_with_icc(swapped)))) is not None
    padded = swapped + bytes(MAX_ICC_BYTES)
    assert colour_profile(Image.open(io.BytesIO(hostile.jpeg_with_icc(padded)))) is None
