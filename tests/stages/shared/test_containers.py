"""Decompression bombs whose real size is not in the outer header are refused before any pixel
is decoded; Pillow's own bomb limit stays on; decoding in a process is bounded in pixels."""

from __future__ import annotations

import io
import threading
import time

import hostile
import pytest
from helpers import peak_rss_growth_while
from PIL import Image, ImageFile

from facecap.stages.shared import containers
from facecap.stages.shared.images import DECODING, ImageRejected, ImageSettings, PixelBudget, normalize

SMALL = ImageSettings(max_pixels=1_000_000)


@pytest.fixture
def decodes(monkeypatch) -> list[tuple[int, int]]:
    """Every pixel decode Pillow starts (the image's size), recorded."""
    seen: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def load(self):
        seen.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return seen


def rejection(data: bytes, settings: ImageSettings = SMALL) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        normalize(data, settings)
    return info.value


BOMBS = {
    "ico_png_entry": lambda: hostile.ico([(16, 16, hostile.png_of_zeros(3000, 3000))]),
    "ico_bmp_entry": lambda: hostile.ico([(16, 16, hostile.bmp_info(3000, 3000))]),
    "ico_second_entry": lambda: hostile.ico(
        [(32, 32, hostile.png(hostile.gradient(32, 32))), (16, 16, hostile.png_of_zeros(2000, 2000))]
    ),
    "tiff_tile": lambda: hostile.tiff([(16, 16, 2048)]),
    "tiff_second_page": lambda: hostile.tiff([(16, 16, 0), (3000, 3000, 0)]),
    "gif_frame_beyond_screen": lambda: hostile.gif_frame_beyond_screen(16, 3000, 3000),
}


@pytest.mark.parametrize("name", BOMBS)
def test_container_bombs_are_refused_before_decoding(name, decodes):
    data = BOMBS[name]()
    assert len(data) < 200_000
    refused = rejection(data)
    assert refused.reason == "too_many_pixels", refused.detail
    assert decodes == [], f"{name} was decoded before it was refused"


@pytest.mark.parametrize(
    "data, reason",
    [
        (hostile.webp_canvas_smaller_than_bitstream(16, 3000, 3000), "undecodable"),
        (hostile.icns_with_png(3000, 3000), "unsupported_format"),
        (hostile.apng_frame_beyond_image(3000, 3000), "not_an_image"),  # Pillow refuses it on opening
        (hostile.avif(1200, 1000), "too_many_pixels"),
    ],
    ids=["webp_canvas_smaller_than_bitstream", "icns_holding_a_png", "apng_frame_beyond_image", "avif"],
)
def test_other_containers_are_refused_without_a_decode(data, reason, decodes):
    assert rejection(data).reason == reason
    assert decodes == []


def test_small_containers_still_decode():
    icon = hostile.ico([(32, 32, hostile.png(hostile.gradient(32, 32))), (16, 16, hostile.bmp_info(16, 16))])
    assert containers.before_open(icon, SMALL.max_pixels) is None
    assert normalize(icon, SMALL).width == 32
    pages = normalize(hostile.tiff([(40, 30, 0), (20, 10, 0)]), SMALL)
    assert (pages.width, pages.height) == (40, 30)
    tiled = normalize(hostile.tiff([(40, 30, 64)]), SMALL)
    assert (tiled.width, tiled.height) == (40, 30)


def test_the_real_sizes_of_icon_entries():
    assert containers.embedded_size(hostile.png_of_zeros(700, 500)[:26]) == (700, 500)
    assert containers.embedded_size(hostile.bmp_info(300, 200)[:26]) == (300, 200)
    assert containers.open_cost(hostile.ico([(16, 16, hostile.bmp_info(300, 200))])) == 60_000
    assert containers.open_cost(hostile.jpeg(hostile.gradient())) == 0


def test_a_full_size_icon_bomb_costs_no_memory(decodes):
    """The issue's case at its real scale: 256x256 declared, 12000x12000 inside (144 MB to decode)."""
    data = hostile.ico([(0, 0, hostile.png_of_zeros(12_000, 12_000))])
    refused: list[str] = []

    def attempt() -> None:
        refused.append(rejection(data, ImageSettings()).reason)

    assert peak_rss_growth_while(attempt) < 20
    assert refused == ["too_many_pixels"] and decodes == []


def test_pillows_own_bomb_limit_is_on():
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0
    # Above Pillow's hard limit (2 x MAX_IMAGE_PIXELS) a raised max_pixels still refuses, cleanly.
    side = int((2 * Image.MAX_IMAGE_PIXELS) ** 0.5) + 100
    huge = ImageSettings(max_pixels=10 * side * side)
    assert rejection(hostile.png_bomb(side), huge).reason == "too_many_pixels"


def test_the_pixel_budget_lets_one_large_image_through_at_a_time():
    budget = PixelBudget()
    inside, peak, lock = [0], [0], threading.Lock()

    def work(pixels: int) -> None:
        with budget.hold(pixels, capacity=100):
            with lock:
                inside[0] += pixels
                peak[0] = max(peak[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= pixels

    threads = [threading.Thread(target=work, args=(p,)) for p in (60, 60, 30, 150, 10, 60)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    assert peak[0] <= 150  # never more than the budget, or one image larger than it alone
    assert budget.used == 0


def test_normalize_holds_the_budget_while_it_decodes(monkeypatch):
    seen: list[int] = []
    original = ImageFile.ImageFile.load

    def load(self):
        seen.append(DECODING.used)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    normalize(hostile.cmyk_jpeg(), ImageSettings())  # decoded by Pillow: 320 x 240
    assert seen and all(used >= 320 * 240 for used in seen)
    assert DECODING.used == 0


def test_only_the_first_frame_of_a_multi_frame_file_is_decoded(decodes):
    mpo = io.BytesIO()
    hostile.gradient(64, 48).save(mpo, "MPO", save_all=True, append_images=[hostile.gradient(1200, 1000)])
    pages = hostile.tiff([(40, 30, 0), (900, 900, 0)])
    for data in (mpo.getvalue(), pages, hostile.animated_gif()):
        decodes.clear()
        result = normalize(data, SMALL)
        assert (result.width, result.height) in ((64, 48), (40, 30))
        assert decodes and all(w * h <= 64 * 48 for w, h in decodes), decodes
