"""Caption benchmark: template captions/s per core, and the engines' captions/s and tokens/s.

The template captioner runs on synthetic attribute rows (every CelebA attribute drawn at random).
The engines run the rewrite prompt through a tiny randomly initialised Llama (tests/tinymodels.py)
in-process (transformers) and through a local OpenAI-compatible server serving the same model,
at several batch sizes and concurrencies: this measures the engine machinery, not a real model's
speed. On a GPU machine, point BENCH_CAPTION_MODEL at a real model folder and BENCH_CAPTION_URL at
a running `vllm serve` to measure those instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).parent))
sys.path.append(str(REPO / "tests"))
from common import machine  # noqa: E402


def template_rate(rows: int = 20000) -> float:
    from facecap.stages.caption.grammar import Grammar
    from facecap.stages.tag.schema import CELEBA40

    rng = random.Random(0)
    records = [
        {
            "gender": rng.choice(["female", "male", None]),
            "gender_score": rng.uniform(0.5, 1),
            "age": rng.uniform(15, 80),
            "age_std": rng.uniform(2, 20),
            "confident_attributes": rng.sample(CELEBA40, rng.randint(3, 10)),
            "pose_bin": rng.choice(["frontal", "left_three_quarter", None]),
        }
        for _ in range(rows)
    ]
    grammar = Grammar()
    started = time.perf_counter()
    for i, record in enumerate(records):
        grammar.caption(record, str(i))
    return rows / (time.perf_counter() - started)


def engine_rates(model_folder: str, url: str | None) -> list[tuple[str, int, float, float]]:
    from facecap.stages.shared.engines import HttpSettings, OpenAIEngine, Request, Sampling, TransformersEngine

    prompt = [{"role": "user", "content": "a young woman with wavy brown hair. she is wearing earrings."}]
    sampling = Sampling(max_tokens=32, temperature=0.7)
    results = []
    engine = TransformersEngine(model_folder, vision=False, device="cpu")
    for batch in (1, 8, 32):
        requests = [Request(prompt, seed=i) for i in range(64)]
        started = time.perf_counter()
        tokens = 0
        for start in range(0, len(requests), batch):
            tokens += sum(g.tokens for g in engine.generate(requests[start : start + batch], sampling))
        seconds = time.perf_counter() - started
        results.append(("transformers (in-process)", batch, len(requests) / seconds, tokens / seconds))
    server = None
    if url is None:
        from openai_server import OpenAIServer

        server = OpenAIServer(model_folder, vision=False).__enter__()
        url = server.base_url
    try:
        for concurrency in (1, 4, 16):
            client = OpenAIEngine("bench", HttpSettings(base_url=url, concurrency=concurrency))
            requests = [Request(prompt, seed=i) for i in range(64)]
            started = time.perf_counter()
            tokens = sum(g.tokens for g in client.generate(requests, sampling))
            seconds = time.perf_counter() - started
            results.append(("openai HTTP (local server)", concurrency, len(requests) / seconds, tokens / seconds))
    finally:
        if server is not None:
            server.__exit__()
    return results


def main() -> None:
    print(f"machine: {machine()}")
    print(f"template captioner: {template_rate():,.0f} captions/s on one core")
    model = os.environ.get("BENCH_CAPTION_MODEL")
    with tempfile.TemporaryDirectory() as folder:
        if model is None:
            from tinymodels import tiny_llm

            model = str(tiny_llm(Path(folder) / "llm"))
            print("engines: a tiny random Llama (2 layers, 32 wide): machinery cost, not a real model's speed")
        print(f"{'engine':<28}{'batch/conc.':>12}{'captions/s':>12}{'tokens/s':>10}")
        for name, width, captions, tokens in engine_rates(model, os.environ.get("BENCH_CAPTION_URL")):
            print(f"{name:<28}{width:>12}{captions:>12.1f}{tokens:>10.0f}")


if __name__ == "__main__":
    main()
