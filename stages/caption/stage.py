"""Caption: the text half of every pair, from a grammar, an LLM rewrite, or a vision-language model.

- ``template``: FaceCaption-15M's probabilistic grammar over the confident attributes; offline,
  seeded per row, several variants per face (``caption`` is a list, FaceCaption v2's convention).
- ``rewrite``: the grammar's text rewritten by an LLM under a prompt that forbids adding facts
  (configs/prompts/rewrite.yaml).
- ``vlm``: a vision-language model describes the face crop, with the attributes as hints
  (configs/prompts/vlm.yaml).

Every caption is cleaned (chat artefacts, markdown, repeats) and checked (refusals, length,
language); a failing one is generated again once with another seed, then the row gets
``caption:invalid`` with the reason. ``caption_provenance`` records captioner, engine, model and
revision, prompt hash, sampling and time. Run on a dataset that already has captions (``facecap
recaption``), the previous captions move to ``caption_versions`` unless ``replace`` is set; no
image is copied (the stage writes Parquet only; tars stay where they are).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field, model_validator

from facecap.pipeline.errors import ConfigError
from facecap.pipeline.registry import register
from facecap.pipeline.stage import Batch, Output, Resources, Stage, StageConfig, StageSpec
from facecap.pipeline.summary import Distinct, Histogram
from facecap.stages.caption.grammar import Grammar, confident_set
from facecap.stages.caption.hygiene import clean, problem
from facecap.stages.shared.engines import (
    Engine,
    EngineName,
    Generation,
    OpenAISettings,
    Request,
    Sampling,
    SamplingSettings,
    VllmSettings,
    default_gpus,
    load_prompt,
    make_engine,
    request_seed,
)


class TemplateSettings(StageConfig):
    """The grammar captioner (FaceCaption-15M's sentences over the confident attributes)."""

    variants: int = Field(3, ge=1, le=10, description="template captions per face (the caption list)")
    # Measured on the labelled shared photos (docs/captioning.md): the offline gender network is right
    # 86% of the time at score >= 0.7 and 93% at >= 0.9; below the cut the caption says "person".
    min_gender_score: float = Field(
        0.9, ge=0.5, le=1, description="name a gender (woman/man) only above this gender_score"
    )


class VlmCaptionSettings(StageConfig):
    """What a vision-language captioner sees and writes."""

    image: Literal["square", "aligned112", "image"] = Field("square", description="which crop it sees")
    long_max_words: int | None = Field(None, ge=20, description="also ask for a long caption of this length")


# vLLM schedules its own batches: the whole shard goes to it in one LLM.chat call.
SHARD_WIDE = 1_000_000

# Keys of the flat section recipes used before it was nested: still read, moved to their section.
LEGACY_KEYS = {
    "variants": "template",
    "max_tokens": "sampling",
    "temperature": "sampling",
    "top_p": "sampling",
    "image": "vlm",
    "long_max_words": "vlm",
    "base_url": "openai",
    "api_key_env": "openai",
    "concurrency": "openai",
    "timeout": "openai",
    "retries": "openai",
}


class CaptionConfig(StageConfig):
    captioner: Literal["template", "rewrite", "vlm"] = "template"
    seed: int = Field(0, description="grammar and sampling seed; a row's captions depend only on it and the key")
    max_words: int = Field(70, ge=5, le=400, description="longer captions are invalid")
    replace: bool = Field(False, description="recaption: drop earlier versions instead of keeping them")
    template: TemplateSettings = Field(default_factory=TemplateSettings)
    # rewrite and vlm: which engine runs which model under which prompt.
    engine: EngineName = Field("openai", description="for rewrite and vlm")
    model: str | None = Field(None, description="model name (openai, vllm) or local folder (transformers)")
    prompt: str | None = Field(None, description="prompt YAML (default: the packaged prompts/<captioner>.yaml)")
    sampling: SamplingSettings = Field(default_factory=SamplingSettings)
    vlm: VlmCaptionSettings = Field(default_factory=VlmCaptionSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings)
    gpus: float | None = Field(
        None, ge=0, le=64, description="GPUs per worker; default: one model's worth for vllm, else 0"
    )
    batch_size: int | None = Field(
        None, ge=1, le=1_000_000, description="rows per engine call; default 16, the whole shard for vllm"
    )

    @model_validator(mode="before")
    @classmethod
    def _nest_legacy_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not LEGACY_KEYS.keys() & data.keys():
            return data
        data = dict(data)
        for key in LEGACY_KEYS.keys() & data.keys():
            section = dict(data.get(LEGACY_KEYS[key]) or {})
            section.setdefault(key, data.pop(key))
            data[LEGACY_KEYS[key]] = section
        return data


# What the report plots of this stage's rows (summarized per shard by the workers).
CAPTION_WORDS_EDGES = (0, 5, 10, 15, 20, 30, 40, 50, 70, 100, 200, 1_000_000)


def _first_captions(rows: pd.DataFrame) -> list[str]:
    return [str(c[0]) if c is not None and len(c) else "" for c in rows["caption"]]


def caption_words(rows: pd.DataFrame) -> pd.Series:
    return pd.Series([len(text.split()) for text in _first_captions(rows) if text], dtype=float)


def caption_fourgrams(rows: pd.DataFrame) -> list[list[str]]:
    grams = []
    for text in _first_captions(rows):
        words = text.lower().split()
        grams.append([" ".join(words[i : i + 4]) for i in range(len(words) - 3)])
    return grams


SUMMARIES = (
    Histogram("caption length (words)", ("caption",), CAPTION_WORDS_EDGES, caption_words),
    Distinct("caption 4-grams", ("caption",), caption_fourgrams),
)


@register
class CaptionStage(Stage):
    name = "caption"
    order = 60
    help = "Caption faces: grammar over the attributes, an LLM rewrite, or a vision-language model."
    config_model = CaptionConfig
    consumes = ()
    summaries = SUMMARIES
    produces: ClassVar[dict[str, pa.DataType]] = {
        "caption": pa.list_(pa.string()),
        "caption_short": pa.string(),
        "caption_provenance": pa.string(),
        "caption_versions": pa.string(),
    }
    reads_media: ClassVar[dict[str, str]] = {}
    resources = Resources(cpus=1, batch_size=64, actor=True)

    def __init__(self, config: CaptionConfig):
        super().__init__(config)
        self.config: CaptionConfig = config
        self.grammar = Grammar(seed=config.seed, min_gender_score=config.template.min_gender_score)
        self.engine: Engine | None = None
        self.prompt: dict[str, str] = {}

    @classmethod
    def spec(cls, config: CaptionConfig) -> StageSpec:
        # Grammar and rewrite work from the columns alone: no tar is opened.
        image = config.vlm.image
        reads = {image: "image_key" if image == "image" else "key"} if config.captioner == "vlm" else {}
        gpus = default_gpus(config.engine, config.gpus, config.vllm) if config.captioner != "template" else 0.0
        batch_size = config.batch_size or (SHARD_WIDE if config.engine == "vllm" else 16)
        on_vllm = config.engine == "vllm" and config.captioner != "template"
        resources = Resources(cpus=1, gpus=gpus, batch_size=batch_size, actor=True)
        return StageSpec(resources=resources, reads=reads, own_processes=on_vllm)

    @classmethod
    def preflight(cls, config: CaptionConfig) -> None:
        if config.captioner == "template":
            return
        if not config.model:
            raise ConfigError(f"caption.captioner {config.captioner} needs caption.model (a model name or folder)")
        if config.engine == "openai" and not config.openai.base_url:
            raise ConfigError("caption.engine openai needs caption.openai.base_url, e.g. http://localhost:8000/v1")
        _load_prompt(config)

    def setup(self) -> None:
        if self.config.captioner == "template":
            return
        self.prompt = _load_prompt(self.config)
        cfg = self.config
        vision = cfg.captioner == "vlm"
        use_gpu = default_gpus(cfg.engine, cfg.gpus, cfg.vllm) > 0
        self.engine = make_engine(cfg.engine, cfg.model or "", vision, cfg.openai, cfg.vllm, use_gpu)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def process(self, batch: Batch) -> Output:
        rows = batch.rows.reset_index(drop=True)
        records = rows.to_dict("records")
        started = time.time()
        if self.config.captioner == "template":
            captions = [(*self._template(r), None) for r in records]
            invalid: list[str | None] = [None] * len(records)
        else:
            captions, invalid = self._generated(records, batch)
        shared = self._provenance(started)
        out = rows.copy()
        out["caption"] = [c[0] for c in captions]
        out["caption_short"] = [c[1] for c in captions]
        out["caption_provenance"] = [
            None if bad else json.dumps({**shared, **({"captions": c[2]} if c[2] else {})}, sort_keys=True)
            for c, bad in zip(captions, invalid, strict=True)
        ]
        out["caption_versions"] = [_versions(r, self.config.replace) for r in records]
        out["status"] = [self.reject("invalid") if bad else self.ok() for bad in invalid]
        out["error"] = invalid
        return Output(rows=out)

    # -- captioners ---------------------------------------------------------------------------
    def _template(self, record: dict) -> tuple[list[str], str]:
        """The grammar's variants (deduplicated) and its short caption."""
        key = record["key"]
        variants = [self.grammar.caption(record, key, v) for v in range(self.config.template.variants)]
        return list(dict.fromkeys(variants)), self.grammar.short(record, key)

    def _generated(self, records: list[dict], batch: Batch) -> tuple[list[tuple], list[str | None]]:
        """(caption list, short caption, per-caption provenance) per row, and each row's problem."""
        cfg = self.config
        requests = [self._request(r, batch, cfg.max_words, "short") for r in records]
        texts, problems = self._with_retry(requests, cfg.max_words)
        long_texts: list[str | None] = [None] * len(records)
        long_requests: list[Request] = []
        if cfg.captioner == "vlm" and cfg.vlm.long_max_words:
            long_requests = [self._request(r, batch, cfg.vlm.long_max_words, "long") for r in records]
            long_texts, _ = self._with_retry(long_requests, cfg.vlm.long_max_words)
        captions = []
        for i, (text, long_text) in enumerate(zip(texts, long_texts, strict=True)):
            if text is None:
                captions.append((None, None, None))
                continue
            made = [{"kind": "short", "max_words": cfg.max_words, "seed": requests[i].seed}]
            if long_text:
                made.append({"kind": "long", "max_words": cfg.vlm.long_max_words, "seed": long_requests[i].seed})
            captions.append(([text, long_text] if long_text else [text], text, made))
        return captions, problems

    def _with_retry(self, requests: list[Request], max_words: int) -> tuple[list[str | None], list[str | None]]:
        sampling = Sampling(**self.config.sampling.model_dump())
        results: list[str | None] = [None] * len(requests)
        problems: list[str | None] = ["not generated"] * len(requests)
        first_seeds = [r.seed for r in requests]
        pending = list(range(len(requests)))
        for attempt in range(2):  # one retry with another seed for captions that fail the checks
            if attempt:
                for index in pending:
                    requests[index].seed = request_seed(first_seeds[index], attempt)
            generations: list[Generation] = self.engine.generate([requests[i] for i in pending], sampling)
            still = []
            for index, generation in zip(pending, generations, strict=True):
                text = clean(generation.text)
                why = problem(text, max_words)
                if why is None:
                    results[index], problems[index] = text, None
                else:
                    problems[index] = f"{why} after {attempt + 1} tries: {text[:80]!r}"
                    still.append(index)
            pending = still
            if not pending:
                break
        return results, problems

    def _request(self, record: dict, batch: Batch, max_words: int, variant: str) -> Request:
        """One generation request; its seed depends on the recipe seed, the row key and the variant only."""
        cfg = self.config
        seed = request_seed(cfg.seed, record["key"], variant)
        if cfg.captioner == "rewrite":
            template = self.grammar.caption(record, record["key"], 0)
            user = self.prompt["user"].format(template=template, max_words=max_words)
            messages = [
                {"role": "system", "content": self.prompt["system"].format(max_words=max_words)},
                {"role": "user", "content": user},
            ]
            return Request(messages=messages, seed=seed)
        attributes = ", ".join(sorted(confident_set(record))) or "none"
        user = self.prompt["user"].format(attributes=attributes.replace("_", " "), max_words=max_words)
        messages = [
            {"role": "system", "content": self.prompt["system"].format(max_words=max_words)},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user}]},
        ]
        media_key = record["image_key"] if cfg.vlm.image == "image" else record["key"]
        return Request(messages=messages, image=batch.media_of(cfg.vlm.image, media_key), seed=seed)

    def _provenance(self, started: float) -> dict[str, Any]:
        cfg = self.config
        info: dict[str, Any] = {"captioner": cfg.captioner, "seed": cfg.seed, "time": round(started, 3)}
        if cfg.captioner == "template":
            info.update(engine="grammar", variants=cfg.template.variants)
            return info
        prompt_text = json.dumps(self.prompt, sort_keys=True)
        info.update(
            engine=cfg.engine,
            model=cfg.model,
            revision=getattr(self.engine, "revision", None),
            prompt_sha256=hashlib.sha256(prompt_text.encode()).hexdigest()[:16],
            sampling=cfg.sampling.model_dump(),
        )
        return info


def _load_prompt(config: CaptionConfig) -> dict[str, str]:
    return load_prompt(config.prompt, config.captioner, "caption prompt")


def _versions(record: dict, replace: bool) -> str | None:
    """Earlier captions of a recaptioned row, newest last (None on a first captioning)."""
    earlier = record.get("caption")
    if replace or earlier is None or (isinstance(earlier, float) and math.isnan(earlier)):
        return None
    previous = record.get("caption_versions")
    history = json.loads(previous) if isinstance(previous, str) and previous else []
    history.append(
        {
            "caption": [str(c) for c in (earlier.tolist() if isinstance(earlier, np.ndarray) else earlier)],
            "caption_short": record.get("caption_short"),
            "provenance": json.loads(record["caption_provenance"])
            if isinstance(record.get("caption_provenance"), str)
            else None,
        }
    )
    return json.dumps(history)
