"""Tag: the 40 CelebA attributes and beyond for every face, from one or more backends.

Backends run in the configured order and each fills only what the earlier ones left null, so
``[celeba, agegender, geometry]`` takes the 40 attributes from FaceCaption-15M's classifier, age
from dlib's network, pose from the landmarks. ``attr_backends`` records which backend produced
each value. FaceCaption-15M's keep-rule is the default: an attribute counts when its probability
is above ``threshold`` (0.85, or a per-attribute value from calibration or from the model card of
a ``facecap tag train`` export), and a face needs
``min_confident`` (5) of them or gets ``tag:too_few_attributes``. A rule the backends cannot meet
is refused before any shard runs; left unset, it is 5 or as many as the backends can set, and the
run says so (offline backends set at most 4 of the 40: a preflight note, not 100% rejections).
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from facecap.pipeline.errors import ConfigError
from facecap.pipeline.registry import register
from facecap.pipeline.stage import Batch, Output, Resources, Stage, StageConfig, StageSpec
from facecap.pipeline.summary import Categories, Shares
from facecap.stages.shared.engines import default_gpus
from facecap.stages.shared.images import decode_bgr
from facecap.stages.shared.values import missing
from facecap.stages.tag.offline import AgeGender, Backend, Emotion, Faces, Geometry, InsightGenderAge, Skin
from facecap.stages.tag.schema import CELEBA40, COLUMNS, attribute_column
from facecap.stages.tag.vlm import VlmTagSettings, check_settings

BackendName = Literal["agegender", "genderage", "emotion", "geometry", "skin", "celeba", "clip", "vlm"]
OFFLINE: dict[str, type[Backend]] = {
    "agegender": AgeGender,
    "genderage": InsightGenderAge,
    "emotion": Emotion,
    "geometry": Geometry,
    "skin": Skin,
}


class TagConfig(StageConfig):
    backends: list[BackendName] = Field(
        default_factory=lambda: ["agegender", "geometry", "skin"],
        description="run in order; later ones fill what earlier ones left null",
    )
    threshold: float = Field(0.85, ge=0, le=1, description="an attribute counts when its probability is above this")
    thresholds: dict[str, float] = Field(
        default_factory=dict, description="per-attribute thresholds (CelebA names), e.g. from `facecap tag --calibrate`"
    )
    min_confident: int | None = Field(
        None,
        ge=0,
        description="faces with fewer confident CelebA attributes are rejected; default 5 (FaceCaption-15M), "
        "or as many as the backends can set when that is fewer (the run says so)",
    )
    celeba_checkpoint: str | None = Field(
        None,
        description="CelebA-40 checkpoint: ResNet-50 .pt/.pth, an .onnx export (its NAME.card.json beside it "
        "supplies input transform and thresholds), or a registered model name",
    )
    clip_model: str = Field("ViT-B-32", description="open_clip model name for the clip backend")
    clip_pretrained: str | None = Field(None, description="open_clip pretrained tag or weights path (needs the files)")
    clip_random_weights: bool = Field(False, description="tests only: let the clip backend run without weights")
    vlm: VlmTagSettings = Field(default_factory=VlmTagSettings, description="the vlm backend's engine and model")
    gpus: float | None = Field(
        None,
        ge=0,
        le=64,
        description="GPUs per worker (onnxruntime CUDA, torch, vLLM); default: one model's worth for a vlm "
        "backend on vllm, else 0",
    )
    batch_size: int = Field(64, ge=1, le=1024, description="faces per model call")

    def worker_gpus(self) -> float:
        if "vlm" in self.backends:
            return default_gpus(self.vlm.engine, self.gpus, self.vlm.vllm)
        return self.gpus or 0.0


# What the report plots of this stage's rows (summarized per shard by the workers).
CONFIDENT = 0.85  # FaceCaption-15M's threshold: the report counts attributes above it
AGE_BINS = ([0, 20, 30, 40, 50, 60, 200], ["<20", "20s", "30s", "40s", "50s", "60+"])


def confident_attributes(rows: pd.DataFrame) -> dict[str, pd.Series]:
    present = [name for name in CELEBA40 if f"attr_{name}" in rows]
    return {name: (rows[f"attr_{name}"] > CONFIDENT).where(rows[f"attr_{name}"].notna()) for name in present}


def age_group(rows: pd.DataFrame) -> pd.Series:
    return pd.cut(rows["age"], AGE_BINS[0], labels=AGE_BINS[1], right=False).astype(object)


def gender(rows: pd.DataFrame) -> pd.Series:
    return rows["gender"].fillna("unknown")


def skin_tone(rows: pd.DataFrame) -> pd.Series:
    return rows["skin_monk"].dropna().astype(int)


SUMMARIES = (
    Shares("attributes", tuple(f"attr_{name}" for name in CELEBA40), confident_attributes),
    Categories("estimated age", ("age",), age_group),
    Categories("gender presentation", ("gender",), gender),
    Categories("Monk skin tone bin (approx.)", ("skin_monk",), skin_tone),
)


@register
class TagStage(Stage):
    name = "tag"
    order = 50
    help = "Tag attributes: the 40 CelebA attributes, age, gender, expression, pose, eyes/mouth, skin tone."
    config_model = TagConfig
    consumes = ("landmarks",)
    summaries = SUMMARIES
    produces: ClassVar[dict[str, pa.DataType]] = COLUMNS
    reads_media: ClassVar[dict[str, str]] = {"aligned112": "key", "square": "key"}
    resources = Resources(cpus=1, batch_size=64, actor=True)

    def __init__(self, config: TagConfig):
        super().__init__(config)
        self.config: TagConfig = config
        self.backends: list[Backend] = []
        self.min_confident = effective_min_confident(config)

    @classmethod
    def spec(cls, config: TagConfig) -> StageSpec:
        # vLLM schedules its own batches: the vlm backend then gets the whole shard in one call.
        on_vllm = "vlm" in config.backends and config.vlm.engine == "vllm"
        batch_size = SHARD_WIDE if on_vllm else config.batch_size
        resources = Resources(cpus=1, gpus=config.worker_gpus(), batch_size=batch_size, actor=True)
        return StageSpec(resources=resources, reads=dict(cls.reads_media), own_processes=on_vllm)

    @classmethod
    def preflight(cls, config: TagConfig) -> list[str]:
        from facecap.pipeline import models

        for name in config.backends:
            for model in OFFLINE.get(name, Backend).models:
                models.resolve(model)
        if "celeba" in config.backends and not config.celeba_checkpoint:
            raise ConfigError(
                "tag backend celeba needs tag.celeba_checkpoint: a ResNet-50 CelebA-40 checkpoint or ONNX export "
                "(FaceCaption-15M's classifier, or one from `facecap tag train`; docs/attributes.md says how)"
            )
        if "celeba" in config.backends and config.celeba_checkpoint:
            from facecap.stages.tag.learned import read_card, resolve_checkpoint

            path = resolve_checkpoint(config.celeba_checkpoint)  # a registered model: present and verified
            if path.suffix == ".onnx" and path.is_file():
                read_card(path)  # a card beside it must belong to it
        if "clip" in config.backends and not (config.clip_pretrained or config.clip_random_weights):
            raise ConfigError(
                "tag backend clip needs tag.clip_pretrained (an open_clip pretrained tag whose files are in its "
                "cache, or a weights file): without it the model is randomly initialised and tags nothing real"
            )
        if "vlm" in config.backends:
            check_settings(config.vlm)
        unknown = sorted(set(config.thresholds) - set(CELEBA40))
        if unknown:
            raise ConfigError(f"tag.thresholds: not CelebA attributes: {', '.join(unknown)}")
        settable = settable_attributes(config.backends)
        if config.min_confident is not None and config.min_confident > len(settable):
            raise ConfigError(
                f"tag.min_confident {config.min_confident} cannot be met: the backends {', '.join(config.backends)} "
                f"set at most {len(settable)} CelebA attributes here ({', '.join(sorted(settable)) or 'none'}); "
                f"lower it (--min-confident {len(settable)}) or add the celeba, clip or vlm backend"
            )
        if config.min_confident is None and len(settable) < DEFAULT_MIN_CONFIDENT:
            return [
                f"keeping faces with {len(settable)} confident CelebA attributes, not FaceCaption-15M's "
                f"{DEFAULT_MIN_CONFIDENT}: the backends {', '.join(config.backends)} set only "
                f"{', '.join(sorted(settable)) or 'none'} here (add celeba, clip or vlm, or set --min-confident)"
            ]
        return []

    def close(self) -> None:
        for backend in self.backends:
            close = getattr(backend, "close", None)
            if close is not None:
                close()

    def setup(self) -> None:
        use_gpu = self.config.worker_gpus() > 0
        for name in self.config.backends:
            if name in OFFLINE:
                self.backends.append(OFFLINE[name](use_gpu=use_gpu))
            elif name == "vlm":
                from facecap.stages.tag.vlm import VlmBackend

                self.backends.append(VlmBackend(self.config.vlm, use_gpu=use_gpu))
            elif name == "celeba":
                from facecap.stages.tag.learned import CelebaResnet

                self.backends.append(CelebaResnet(self.config.celeba_checkpoint or "", use_gpu=use_gpu))
            else:
                from facecap.stages.tag.learned import ClipZeroShot

                cfg = self.config
                self.backends.append(
                    ClipZeroShot(cfg.clip_model, cfg.clip_pretrained, use_gpu, cfg.clip_random_weights)
                )

    def process(self, batch: Batch) -> Output:
        rows = batch.rows.reset_index(drop=True)
        faces, usable = self._faces(batch, rows)
        values: list[dict[str, Any]] = [{} for _ in range(len(rows))]
        sources: list[dict[str, str]] = [{} for _ in range(len(rows))]
        judges: list[dict[str, Any]] = [{} for _ in range(len(rows))]
        failures: dict[int, str] = {}
        for backend in self.backends:
            step = max(1, len(faces)) if backend.whole_batch else self.config.batch_size
            for start in range(0, len(faces), step):
                for offset, predicted in enumerate(backend.predict(faces.slice(start, start + step))):
                    row = usable[start + offset]
                    if "_error" in predicted:
                        failures.setdefault(row, predicted["_error"])
                        continue
                    for attribute, value in predicted.items():
                        if attribute not in values[row] and not missing(value):
                            values[row][attribute] = value
                            sources[row][attribute] = backend.name
                    if predicted and backend.provenance() is not None:
                        judges[row][backend.name] = backend.provenance()
        return Output(rows=self._rows(rows, values, sources, judges, usable, failures))

    def _faces(self, batch: Batch, rows: pd.DataFrame) -> tuple[Faces, list[int]]:
        aligned, landmarks, squares, jpegs, keys, usable = [], [], [], [], [], []
        for i, (key, points) in enumerate(zip(rows["key"], rows["landmarks"], strict=True)):
            crop = decode_bgr(batch.media.get("aligned112", {}).get(key))
            if crop is None or points is None or len(points) != 10:
                continue
            aligned.append(crop)
            landmarks.append(np.asarray(points, np.float32).reshape(5, 2))
            jpeg = batch.media.get(self.config.vlm.image, {}).get(key) if "vlm" in self.config.backends else None
            jpegs.append(jpeg)
            squares.append(decode_bgr(batch.media.get("square", {}).get(key)))
            keys.append(key)
            usable.append(i)
        return Faces(aligned, landmarks, squares, jpegs, keys), usable

    def threshold(self, attribute: str, backend: str | None) -> float:
        """Where an attribute counts: tag.thresholds, else the producing backend's model card, else tag.threshold."""
        if attribute in self.config.thresholds:
            return self.config.thresholds[attribute]
        for model in self.backends:
            if model.name == backend and attribute in model.thresholds:
                return model.thresholds[attribute]
        return self.config.threshold

    def _threshold_words(self) -> str:
        if self.config.thresholds or any(model.thresholds for model in self.backends):
            return f"their thresholds ({self.config.threshold} where none is set)"
        return str(self.config.threshold)

    def _rows(
        self,
        rows: pd.DataFrame,
        values: list[dict],
        sources: list[dict],
        judges: list[dict],
        usable: list[int],
        failures: dict[int, str],
    ) -> pd.DataFrame:
        out = rows.copy()
        table = {column: [None] * len(rows) for column in COLUMNS}
        statuses, errors = [], []
        usable_set = set(usable)
        for i in range(len(rows)):
            for attribute, value in values[i].items():
                column = attribute_column(attribute)
                if column in table:
                    table[column][i] = value
            table["attr_backends"][i] = json.dumps(sources[i], sort_keys=True)
            table["attr_models"][i] = json.dumps(judges[i], sort_keys=True) if judges[i] else None
            confident = [a for a in CELEBA40 if _above(values[i].get(a), self.threshold(a, sources[i].get(a)))]
            table["confident_attributes"][i] = confident
            if i not in usable_set:
                statuses.append(self.reject("undecodable"))
                errors.append("the aligned 112 crop or the landmarks of this face are unusable")
            elif i in failures:
                statuses.append(self.reject("invalid"))
                errors.append(failures[i])
            elif len(confident) < self.min_confident:
                statuses.append(self.reject("too_few_attributes"))
                errors.append(
                    f"{len(confident)} attributes above {self._threshold_words()} (need {self.min_confident})"
                    + (f": {', '.join(confident)}" if confident else "")
                )
            else:
                statuses.append(self.ok())
                errors.append(None)
        for column, column_values in table.items():
            out[column] = column_values
        out["status"], out["error"] = statuses, errors
        return out


DEFAULT_MIN_CONFIDENT = 5  # FaceCaption-15M's keep-rule
SHARD_WIDE = 1_000_000  # rows per batch when one engine call should see the whole shard


def settable_attributes(backends: list[str]) -> frozenset[str]:
    """The CelebA attributes these backends can set on this machine."""
    if {"celeba", "clip", "vlm"} & set(backends):
        return frozenset(CELEBA40)
    return frozenset().union(*(OFFLINE[name].celeba_attributes() for name in backends if name in OFFLINE))


def effective_min_confident(config: TagConfig) -> int:
    """The keep-rule in force: the configured count, else 5 or as many as the backends can set."""
    if config.min_confident is not None:
        return config.min_confident
    return min(DEFAULT_MIN_CONFIDENT, len(settable_attributes(config.backends)))


def _above(value: Any, threshold: float) -> bool:
    return value is not None and not missing(value) and float(value) > threshold
