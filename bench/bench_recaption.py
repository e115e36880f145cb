"""Recaption of WebDataset shards: samples/s of the machinery (read the tars in place, caption,
write sidecars, or new shards), with the template captioner so no model time is counted.

Writes BENCH_RECAPTION_SHARDS (default 4) tars of BENCH_RECAPTION_SAMPLES (default 2000) samples
each with webdataset's TarWriter, like an export's (a ~40 KB image, a caption and ~1.5 KB of
JSON with attributes), then times a first run and a rerun (which must do no work) for sidecars
and for new shards.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import webdataset as wds

sys.path.insert(1, str(Path(__file__).parent))
from common import machine

from facecap.stages.caption.shards import recaption_shards
from facecap.stages.caption.stage import CaptionConfig


def write_shards(folder: Path, shards: int, samples: int) -> None:
    rng = np.random.default_rng(0)
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"shard-{shard:06d}.tar")) as writer:
            for i in range(samples):
                meta = {
                    "gender": "female" if i % 2 else "male",
                    "gender_score": 0.95,
                    "age": 20 + i % 50,
                    "age_std": 4.0,
                    "confident_attributes": ["smiling", "eyeglasses", "wavy_hair"],
                    "emotion": "happy",
                    "emotion_score": 0.8,
                    **{f"attribute_{a}": float(a) / 7 for a in range(40)},
                }
                jpeg = rng.integers(0, 256, 40_000, dtype=np.uint8).tobytes()
                writer.write({"__key__": f"{shard:04d}{i:06d}", "jpg": jpeg, "txt": "an old caption", "json": meta})


def timed(pattern: str, out: str, write: str) -> tuple[float, int]:
    started = time.perf_counter()
    result = recaption_shards(pattern, out, CaptionConfig(), write=write)
    return time.perf_counter() - started, result.captioned


def main() -> None:
    shards = int(os.environ.get("BENCH_RECAPTION_SHARDS", "4"))
    samples = int(os.environ.get("BENCH_RECAPTION_SAMPLES", "2000"))
    print(machine())
    with tempfile.TemporaryDirectory(prefix="facecap-bench-recaption-") as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        write_shards(folder, shards, samples)
        pattern = str(folder / f"shard-{{000000..{shards - 1:06d}}}.tar")
        total = shards * samples
        for write in ("sidecars", "shards"):
            out = str(Path(tmp) / write)
            seconds, captioned = timed(pattern, out, write)
            again, recaptioned = timed(pattern, out, write)
            assert captioned == total and recaptioned == 0
            print(
                f"{write:8s}: {total:,} samples in {seconds:.2f} s ({total / seconds:,.0f} samples/s); "
                f"rerun {again:.3f} s, nothing captioned"
            )


if __name__ == "__main__":
    main()
