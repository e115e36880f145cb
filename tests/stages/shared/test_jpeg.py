"""TurboJPEG decodes on real photos: the same pixels as OpenCV, whole, scaled and of a region."""

from __future__ import annotations

import io
from fractions import Fraction

import cv2
import numpy as np
import pytest

from facecap.stages.shared import jpeg
from facecap.stages.shared.jpeg import TurboJpeg, scaled, turbojpeg

PORTRAIT = "deepface/img1.jpg"  # 1382 x 1868, 4:4:4


@pytest.fixture(scope="module")
def turbo() -> TurboJpeg:
    found = turbojpeg()
    assert found is not None, "the turbojpeg wheel is a dependency: its libturbojpeg should load"
    return found


def encoded(image: np.ndarray, sampling: int = cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, 92, cv2.IMWRITE_JPEG_SAMPLING_FACTOR, sampling]
    return cv2.imencode(".jpg", image, params)[1].tobytes()


def test_the_bundled_library_offers_the_m_over_8_scales(turbo):
    assert {Fraction(1, 8), Fraction(3, 8), Fraction(5, 8), Fraction(3, 4), Fraction(7, 8), Fraction(1)} <= set(
        turbo.scales
    )
    assert max(turbo.scales) == 1


def test_a_whole_decode_is_opencvs(turbo, face_photos):
    data = (face_photos / PORTRAIT).read_bytes()
    ours = turbo.decode(data)
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert ours.origin == (0, 0)
    assert ours.pixels.shape == reference.shape
    assert np.abs(ours.pixels.astype(int) - reference).max() <= 1


@pytest.mark.parametrize("scale", [Fraction(1, 2), Fraction(3, 4), Fraction(3, 8)])
def test_a_scaled_decode_has_libjpegs_size_and_the_image(turbo, face_photos, scale):
    data = (face_photos / PORTRAIT).read_bytes()
    pixels = turbo.decode(data, scale).pixels
    assert pixels.shape[:2] == (scaled(1868, scale), scaled(1382, scale))
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    shrunk = cv2.resize(full, (pixels.shape[1], pixels.shape[0]), interpolation=cv2.INTER_AREA)
    assert cv2.PSNR(pixels, shrunk) > 30
    if scale == Fraction(1, 2):
        assert (
            np.abs(pixels.astype(int) - cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_REDUCED_COLOR_2)).max()
            <= 1
        )


@pytest.mark.parametrize(
    "sampling",
    [cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420],
)
@pytest.mark.parametrize("scale", [Fraction(1), Fraction(1, 2)])
def test_a_region_decode_is_that_part_of_the_whole_decode(turbo, face_photos, sampling, scale):
    data = encoded(cv2.imread(str(face_photos / PORTRAIT)), sampling)
    whole = turbo.decode(data, scale).pixels
    for region in [(101, 203, 390, 517), (0, 0, 50, 40), (300, 600, 10_000, 10_000), (-20, -5, 64, 64)]:
        part = turbo.decode(data, scale, region)
        x, y = part.origin
        height, width = part.pixels.shape[:2]
        # It covers the region (clipped to the image), starting at or left of it on the MCU grid.
        assert x <= max(region[0], 0) and y == max(region[1], 0)
        assert x + width >= min(region[2], whole.shape[1]) and y + height >= min(region[3], whole.shape[0])
        assert x + width <= whole.shape[1] and y + height <= whole.shape[0]
        same = whole[y : y + height, x : x + width]
        assert np.abs(part.pixels.astype(int) - same).mean() < 0.5  # chroma upsampling at edges may differ by 1
        assert cv2.PSNR(part.pixels, same) > 45


def test_what_is_not_a_clean_jpeg_gives_none(turbo, face_photos):
    data = (face_photos / PORTRAIT).read_bytes()
    png = cv2.imencode(".png", cv2.imread(str(face_photos / PORTRAIT)))[1].tobytes()
    for bad in [b"", b"\xff\xd8 not really a jpeg", data[:300], data[: len(data) // 2], png]:
        assert turbo.decode(bad) is None
    assert turbo.header(b"\xff\xd8 nothing") is None
    # A failed image leaves nothing behind: the next decode is whole and right.
    assert turbo.decode(data).pixels.shape == (1868, 1382, 3)


def test_the_smallest_scale_that_keeps_the_side(turbo):
    header = jpeg.JpegHeader(width=1000, height=700, subsampling=2)
    assert turbo.scale_at_least(header, 640) == Fraction(3, 4)  # 5/8 would leave 625
    assert turbo.scale_at_least(header, 1000) == 1
    assert turbo.scale_at_least(header, 2000) == 1  # never upscaled
    assert turbo.scale_at_least(jpeg.JpegHeader(6000, 4000, 2), 640) == Fraction(1, 8)  # 750 px


def test_it_can_be_switched_off_and_pointed_at_a_library(monkeypatch, turbo):
    try:
        monkeypatch.setenv("FACECAP_TURBOJPEG", "off")
        turbojpeg.cache_clear()
        assert turbojpeg() is None
        monkeypatch.setenv("FACECAP_TURBOJPEG", "/nonexistent/libturbojpeg.so")
        turbojpeg.cache_clear()
        assert turbojpeg() is None
        monkeypatch.setenv("FACECAP_TURBOJPEG", turbo.path)
        turbojpeg.cache_clear()
        assert turbojpeg().path == turbo.path
    finally:
        monkeypatch.delenv("FACECAP_TURBOJPEG")
        turbojpeg.cache_clear()


def test_grey_and_progressive_jpegs_decode_and_cmyk_is_left_to_opencv(turbo, face_photos):
    from PIL import Image

    image = cv2.imread(str(face_photos / PORTRAIT))
    grey = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))[1].tobytes()
    part = turbo.decode(grey, region=(100, 100, 300, 300))
    x, y = part.origin
    reference = cv2.imdecode(np.frombuffer(grey, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(part.pixels, reference[y : y + part.pixels.shape[0], x : x + part.pixels.shape[1]])

    def saved(**options) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB)).convert(options.pop("mode", "RGB")).save(
            buffer, "JPEG", **options
        )
        return buffer.getvalue()

    progressive = saved(progressive=True)
    whole = turbo.decode(progressive).pixels
    part = turbo.decode(progressive, region=(100, 100, 300, 300))
    x, y = part.origin
    assert cv2.PSNR(part.pixels, whole[y : y + part.pixels.shape[0], x : x + part.pixels.shape[1]]) > 45
    assert turbo.decode(saved(mode="CMYK")) is None  # no CMYK to BGR in TurboJPEG: OpenCV converts it


def test_exif_is_found_among_the_header_segments(face_photos):
    from PIL import Image

    data = (face_photos / PORTRAIT).read_bytes()
    assert not jpeg.has_exif(cv2.imencode(".jpg", cv2.imread(str(face_photos / PORTRAIT)))[1].tobytes())
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, "JPEG", exif=exif)
    with_exif = buffer.getvalue()
    assert jpeg.has_exif(with_exif)
    # Two big APP2 segments (ICC profiles can be this large) before it: found by segment lengths.
    padding = (b"\xff\xe2" + (65_000).to_bytes(2, "big") + b"\0" * 64_998) * 2
    assert jpeg.has_exif(with_exif[:2] + padding + with_exif[2:])
    assert jpeg.has_exif(b"\xff\xd8garbage")  # unparsable headers: the caller checks properly
