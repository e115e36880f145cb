"""Image checks and normalisation on real photos and on hostile files made here."""

from __future__ import annotations

import io

import hostile
import numpy as np
import pytest
from PIL import Image, ImageOps

from facecap.stages.shared.images import ImageRejected, ImageSettings, normalize, target_size
from facecap.stages.shared.metadata import strip_metadata


@pytest.fixture(scope="module")
def photo(face_photos) -> bytes:
    return (face_photos / "deepface" / "img10.jpg").read_bytes()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def reason_of(data: bytes, settings: ImageSettings | None = None) -> str:
    with pytest.raises(ImageRejected) as info:
        normalize(data, settings or ImageSettings())
    return info.value.reason


def test_a_clean_jpeg_keeps_its_bytes_minus_metadata(photo):
    result = normalize(photo, ImageSettings())
    assert not result.reencoded
    assert result.ext == "jpg" and result.mime == "image/jpeg"
    original = decode(photo)
    assert (result.width, result.height) == original.size
    assert decode(result.data).tobytes() == original.tobytes()  # the same pixels, no re-encode


def test_metadata_is_stripped_without_reencoding():
    data = hostile.upright_with_gps()
    assert decode(data).getexif()
    result = normalize(data, ImageSettings())
    assert not result.reencoded
    stored = decode(result.data)
    assert not stored.getexif() and "comment" not in stored.info
    assert b"SpyCam" not in result.data
    assert stored.tobytes() == decode(data).tobytes()


def test_exif_rotation_is_applied_and_gps_never_reaches_the_output():
    result = normalize(hostile.exif_rotated_with_gps(), ImageSettings())
    assert result.reencoded
    assert (result.width, result.height) == (200, 300)
    assert (result.original_width, result.original_height) == (200, 300)
    stored = decode(result.data)
    assert not stored.getexif()
    assert b"SpyCam" not in result.data and b"Model X" not in result.data


@pytest.mark.parametrize(
    "make, size",
    [
        (hostile.cmyk_jpeg, (320, 240)),
        (hostile.png16, (200, 100)),
        (hostile.animated_gif, (64, 48)),
        (hostile.palette_with_transparency, (80, 60)),
    ],
)
def test_odd_modes_become_8bit_rgb_jpeg(make, size):
    result = normalize(make(), ImageSettings())
    stored = decode(result.data)
    assert stored.format == "JPEG" and stored.mode == "RGB" and stored.size == size
    if make is hostile.animated_gif:
        red, green, _ = stored.getpixel((5, 5))
        assert red > 150 and green < 60  # the first frame


def test_16bit_ramp_keeps_its_range():
    stored = decode(normalize(hostile.png16(), ImageSettings()).data).convert("L")
    low, high = stored.getextrema()
    assert low < 10 and high > 245


def test_transparent_areas_become_white():
    stored = decode(normalize(hostile.palette_with_transparency(), ImageSettings()).data)
    assert min(stored.getpixel((2, 2))) > 240
    red, _, blue = stored.getpixel((40, 30))
    assert blue > 200 and red < 60


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty_body"),
        (b"<!DOCTYPE html><html></html>", "not_an_image"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "unsupported_format"),
        (b'{"error": "no"}', "not_an_image"),
        (bytes(range(256)) * 4, "not_an_image"),
        (b"\x01", "not_an_image"),  # shorter than some formats' signature checks read (found by fuzzing)
        (b"8BPS\x00\x01" + bytes(40), "unsupported_format"),  # a Photoshop file: named, never opened
        (hostile.png_bomb(), "too_many_pixels"),
    ],
)
def test_bad_bodies_each_get_their_reason(data, reason):
    assert reason_of(data) == reason


def test_truncated_jpeg_is_detected(photo):
    assert reason_of(photo[: len(photo) // 2]) == "truncated_image"
    assert reason_of(photo[: len(photo) // 2], ImageSettings(resize_mode="keep_ratio", image_size=64)) in (
        "truncated_image",
        "undecodable",
    )


def test_size_and_aspect_limits():
    sliver = hostile.png(Image.new("L", (6000, 1), 128))
    assert reason_of(sliver, ImageSettings(max_aspect_ratio=10)) == "aspect_ratio"
    tiny = hostile.png(Image.new("RGB", (1, 1)))
    assert reason_of(tiny, ImageSettings(min_image_size=32)) == "too_small"
    assert normalize(tiny, ImageSettings()).width == 1


@pytest.mark.parametrize(
    "mode, expected",
    [
        ("keep_ratio", (512, 683)),
        ("keep_ratio_largest", (384, 512)),
        ("center_crop", (512, 512)),
        ("border", (512, 512)),
        ("no", (600, 800)),
    ],
)
def test_resize_modes_like_img2dataset(mode, expected, face_photos):
    data = (face_photos / "deepface" / "img11.jpg").read_bytes()  # 600x800
    result = normalize(data, ImageSettings(resize_mode=mode, image_size=512))
    assert (result.width, result.height) == expected
    assert decode(result.data).size == expected


def test_border_pads_with_black_and_center_crop_keeps_the_middle():
    image = hostile.gradient(400, 200)
    bordered = decode(normalize(hostile.jpeg(image), ImageSettings(resize_mode="border", image_size=100)).data)
    assert max(bordered.getpixel((50, 2))) < 20  # top band is border
    cropped = normalize(hostile.jpeg(image), ImageSettings(resize_mode="center_crop", image_size=100))
    assert (cropped.width, cropped.height) == (100, 100)


def test_resize_only_if_bigger_leaves_small_images():
    small = hostile.jpeg(hostile.gradient(100, 80))
    settings = ImageSettings(resize_mode="keep_ratio", image_size=512, resize_only_if_bigger=True)
    result = normalize(small, settings)
    assert (result.width, result.height) == (100, 80) and not result.reencoded
    assert target_size((100, 80), ImageSettings(resize_mode="keep_ratio", image_size=512)) == (640, 512)


@pytest.mark.parametrize("fmt, pil", [("webp", "WEBP"), ("png", "PNG"), ("jpg", "JPEG")])
def test_output_formats(fmt, pil, photo):
    result = normalize(photo, ImageSettings(output_format=fmt, resize_mode="keep_ratio", image_size=128))
    assert decode(result.data).format == pil and result.ext == fmt


def test_png_and_webp_metadata_stripping():
    image = hostile.gradient(50, 40)
    buffer = io.BytesIO()
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "secret person")
    image.save(buffer, "PNG", pnginfo=info)
    stripped = strip_metadata(buffer.getvalue(), "png")
    assert b"secret person" not in stripped
    assert decode(stripped).tobytes() == image.tobytes()
    exif = Image.Exif()
    exif[0x010F] = "SpyCam Inc."
    webp = io.BytesIO()
    image.save(webp, "WEBP", lossless=True, exif=exif.tobytes())
    assert b"SpyCam" in webp.getvalue()
    clean = strip_metadata(webp.getvalue(), "webp")
    assert b"SpyCam" not in clean
    assert decode(clean).convert("RGB").tobytes() == image.tobytes()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillow(orientation):
    image = hostile.gradient(120, 80)
    image.paste((255, 255, 255), (0, 0, 30, 20))  # a white corner makes every flip visible
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = hostile.jpeg(image, exif=exif.tobytes())
    expected = np.asarray(ImageOps.exif_transpose(decode(data)).convert("RGB"), dtype=np.int16)
    for settings in (ImageSettings(), ImageSettings(resize_mode="keep_ratio", image_size=40)):
        stored = decode(normalize(data, settings).data).convert("RGB")
        reference = expected
        if settings.resize_mode != "no":
            reference = np.asarray(Image.fromarray(expected.astype(np.uint8)).resize(stored.size), dtype=np.int16)
        assert stored.size == (reference.shape[1], reference.shape[0])
        assert np.abs(np.asarray(stored, dtype=np.int16) - reference).mean() < 12, orientation


def test_fast_and_pillow_paths_agree_on_a_photo(photo):
    from facecap.stages.shared import images

    settings = ImageSettings(resize_mode="keep_ratio", image_size=256)
    fast = decode(normalize(photo, settings).data)
    pil_image = Image.open(io.BytesIO(photo))
    slow = images.resize(images._decode_rgb(pil_image, "JPEG", 1, fast.size), settings)
    assert fast.size == slow.size
    assert np.abs(np.asarray(fast, np.int16) - np.asarray(slow, np.int16)).mean() < 4


def test_a_jpeg_whose_scan_data_is_corrupt_is_reencoded_not_kept():
    """Bytes spliced into the entropy-coded data (here a secret) decode with libjpeg warnings:
    such a file is re-encoded from what decodes, never stored as it came (found by fuzzing)."""
    from facecap.stages.shared.jpeg import turbojpeg

    assert turbojpeg() is not None  # the strict check needs libjpeg-turbo's TurboJPEG 3 API (installed here)
    data = hostile.jpeg(hostile.noise(64, 48))
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    result = normalize(data[:middle] + hostile.SECRET + data[middle:], ImageSettings())
    assert result.reencoded and hostile.SECRET not in result.data
    assert decode(result.data).size == (64, 48)


def test_a_webp_whose_chunk_is_shorter_than_its_bitstream_is_reencoded():
    """OpenCV decodes such a file by reading past the chunk; cut to its chunks it would not
    decode, so it is re-encoded rather than stored broken (found by fuzzing)."""
    buffer = io.BytesIO()
    hostile.noise(64, 48).save(buffer, "WEBP", quality=80)
    data = buffer.getvalue()
    assert data[12:16] == b"VP8 "
    size = int.from_bytes(data[16:20], "little") - 24
    # The RIFF and its chunk both end 24 bytes before the bitstream does; those bytes follow.
    short = b"RIFF" + (12 + size).to_bytes(4, "little") + b"WEBPVP8 " + size.to_bytes(4, "little") + data[20:]
    result = normalize(short, ImageSettings(output_format="webp"))
    assert result.reencoded
    assert decode(result.data).size == (64, 48)


def test_keep_original_bytes_off_reencodes_every_image(photo):
    """What hides inside compressed pixel data (slack after a bitstream, bytes a decoder reads
    as pixels) cannot be stripped losslessly: an operator who wants nothing but decoded pixels
    turns the lossless path off."""
    buffer = io.BytesIO()
    hostile.noise(64, 48).save(buffer, "WEBP", quality=80)
    data = buffer.getvalue()
    size = int.from_bytes(data[16:20], "little")
    slack = hostile.SECRET + b"\x00" * (len(hostile.SECRET) & 1)  # after the bitstream, inside its chunk
    hidden = hostile.riff(b"VP8 " + (size + len(slack)).to_bytes(4, "little") + data[20 : 20 + size] + slack)
    kept = normalize(hidden, ImageSettings(output_format="webp"))
    assert not kept.reencoded and hostile.SECRET in kept.data  # pixel data is kept as it is
    for data, fmt in ((hidden, "webp"), (photo, "jpg")):
        result = normalize(data, ImageSettings(output_format=fmt, keep_original_bytes=False))
        assert result.reencoded and hostile.SECRET not in result.data
