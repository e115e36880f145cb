"""Quality: measure every face row, then apply a rule list; the measures taken are stored.

Measures (``q_*`` columns, docs/quality.md gives each range): resolution, sharpness, exposure,
colour (grayscale), head pose, BRISQUE, text area (PP-OCRv4), cartoon score, NSFW (NudeNet), and
the multi-face context. They run cheapest first, and a row whose status a rule has settled gets
no further measure (``cascade.py``; the statuses are those of measuring everything). Rules only
set statuses: the first failing rule gives ``quality:<rule-name>`` and ``quality_failed`` lists
every failing rule it could be judged by, so a dataset can be re-thresholded later (``facecap
quality --explain``) without running a model again. A ranking rule (keep the top fraction by
resolution, FaceCaptionHQ-4M style) makes the stage global: it measures every shard first, then
cuts at the dataset-wide threshold.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from facecap.pipeline.registry import register
from facecap.pipeline.stage import Batch, GlobalStage, Output, Resources, StageConfig, StageSpec, Summaries
from facecap.pipeline.summary import Histogram
from facecap.stages.quality import measures
from facecap.stages.quality.cascade import BY_COST, COSTS, Cascade
from facecap.stages.quality.rules import Rule, failing, ranking_cutoff
from facecap.stages.shared.geometry import head_pose
from facecap.stages.shared.images import decode_bgr
from facecap.stages.shared.values import missing

MEASURES: dict[str, pa.DataType] = {
    "q_face_side": pa.float32(),
    "q_image_side": pa.float32(),
    "q_relative_area": pa.float32(),
    "q_aspect": pa.float32(),
    "q_sharpness": pa.float32(),
    "q_gradient": pa.float32(),
    "q_brightness": pa.float32(),
    "q_dark_fraction": pa.float32(),
    "q_bright_fraction": pa.float32(),
    "q_contrast": pa.float32(),
    "q_channel_std": pa.float32(),
    "q_grayscale": pa.bool_(),
    "q_yaw": pa.float32(),
    "q_pitch": pa.float32(),
    "q_roll": pa.float32(),
    "q_frontalness": pa.float32(),
    "q_brisque": pa.float32(),
    "q_clip_iqa": pa.float32(),
    "q_text_fraction": pa.float32(),
    "q_cartoon": pa.float32(),
    "q_nsfw": pa.float32(),
    "q_faces_in_image": pa.int16(),
    "q_is_largest": pa.bool_(),
    "q_max_overlap": pa.float32(),
}
# Beside the measures: what the cascade skipped for the row, and the milliseconds each measure
# (and decoding) took for it; a per-image measure's time is shared by the faces that got it.
BOOKKEEPING: dict[str, pa.DataType] = {
    "quality_skipped": pa.list_(pa.string()),
    "quality_ms": pa.struct([(name, pa.float32()) for name in COSTS]),
}


# Text and NSFW detection run on the image shrunk to these long sides: the smallest whose decisions
# agreed with full resolution on the fixture photos (docs/quality.md, bench/eval_quality_resolution.py).
TEXT_SIDE: int | None = 640
NSFW_SIDE: int | None = 960


def default_rules() -> list[Rule]:
    return [Rule(name="nsfw", expr="q_nsfw < 0.5")]


class QualityConfig(StageConfig):
    sharpness: bool = Field(True, description="q_sharpness, q_gradient on the aligned 112 crop")
    exposure: bool = Field(True, description="q_brightness, q_dark/bright_fraction, q_contrast of the face")
    colour: bool = Field(True, description="q_channel_std and q_grayscale of the whole image")
    pose: bool = Field(True, description="q_yaw, q_pitch, q_roll, q_frontalness from the 5 landmarks")
    brisque: bool = Field(True, description="q_brisque, no-reference quality of the face crop (lower is better)")
    clip_iqa: bool = Field(False, description="q_clip_iqa: CLIP-IQA of the face crop (needs the clip extra)")
    clip_model: str = Field("ViT-B-32", description="open_clip model for CLIP-IQA")
    clip_pretrained: str | None = Field(None, description="open_clip pretrained tag or weights file for CLIP-IQA")
    text: bool = Field(True, description="q_text_fraction: image area covered by text (PP-OCRv4 detector)")
    cartoon: bool = Field(True, description="q_cartoon: 0 photograph-like .. 1 drawn")
    nsfw: bool = Field(True, description="q_nsfw: highest NudeNet score of an explicit class")
    grayscale_below: float = Field(3.0, ge=0, description="q_grayscale when q_channel_std is below this (0-255)")
    text_side: int | None = Field(
        TEXT_SIDE, ge=32, description="text detection on the image shrunk to this long side (null: full)"
    )
    nsfw_side: int | None = Field(
        NSFW_SIDE, ge=32, description="NSFW detection on the image shrunk to this long side (null: full)"
    )
    cascade: bool = Field(
        True,
        description="measure cheapest first and stop measuring a row once its status is settled "
        "(the same statuses; false measures every row fully, for analysis)",
    )
    rules: list[Rule] = Field(
        default_factory=default_rules, description="keep-rules, first failing one names the status"
    )


# What the report plots of this stage's rows (summarized per shard by the workers).
def sharpness(rows: pd.DataFrame) -> pd.Series:
    return rows["q_sharpness"]


def brisque(rows: pd.DataFrame) -> pd.Series:
    return rows["q_brisque"]


def yaw(rows: pd.DataFrame) -> pd.Series:
    return rows["q_yaw"]


SUMMARIES = (
    Histogram("sharpness", ("q_sharpness",), (0, 10, 20, 50, 100, 200, 500, 1000, 2000, 1e9), sharpness),
    Histogram("BRISQUE (lower is better)", ("q_brisque",), (-1e3, 0, 10, 20, 30, 40, 50, 60, 80, 100, 1e3), brisque),
    Histogram("yaw (deg)", ("q_yaw",), (-90, -60, -45, -30, -15, 0, 15, 30, 45, 60, 90), yaw),
)


@register
class QualityStage(GlobalStage):
    name = "quality"
    order = 40
    help = "Measure face and image quality (sharpness, exposure, pose, BRISQUE, text, cartoon, NSFW) and apply rules."
    config_model = QualityConfig
    consumes = ("image_key", "box", "landmarks", "face_width", "face_height")
    summaries = SUMMARIES
    produces: ClassVar[dict[str, pa.DataType]] = {**MEASURES, "quality_failed": pa.list_(pa.string()), **BOOKKEEPING}
    reads_media: ClassVar[dict[str, str]] = {"image": "image_key", "aligned112": "key"}
    batch_by = "image_key"  # all faces of an image in one batch: overlap and per-image measures
    resources = Resources(cpus=1, batch_size=64, actor=True)

    def __init__(self, config: QualityConfig):
        super().__init__(config)
        self.config: QualityConfig = config
        self._scorers: dict[str, Any] = {}

    @classmethod
    def spec(cls, config: QualityConfig) -> StageSpec:
        # Ranking rules (keep the top 40% by ...) need every row's measure: only they need the passes.
        return replace(super().spec(config), global_passes=any(rule.ranking for rule in config.rules))

    @classmethod
    def preflight(cls, config: QualityConfig) -> None:
        from facecap.pipeline import models

        for measure, model in (("brisque", "brisque-svm"), ("text", "ppocr-det"), ("nsfw", "nudenet-320n")):
            if getattr(config, measure):
                models.resolve(model)  # one clear line when a wheel's model file is missing
        known = set(MEASURES) | set(_DETECT_COLUMNS)
        for rule in config.rules:
            unknown = sorted(c for c in rule.columns() if c not in known)
            if unknown:
                from facecap.pipeline.errors import ConfigError

                raise ConfigError(f"quality rule {rule.name}: unknown column(s) {', '.join(unknown)}")

    def setup(self) -> None:
        from facecap.stages.quality.scorers import Brisque, NsfwDetector, TextDetector

        if self.config.brisque:
            self._scorers["brisque"] = Brisque()
        if self.config.text:
            self._scorers["text"] = TextDetector(self.config.text_side)
        if self.config.nsfw:
            self._scorers["nsfw"] = NsfwDetector(self.config.nsfw_side)
        if self.config.clip_iqa:
            from facecap.stages.quality.scorers import ClipIqa

            self._scorers["clip_iqa"] = ClipIqa(self.config.clip_model, self.config.clip_pretrained)

    # -- the three entry points --------------------------------------------------------------
    def process(self, batch: Batch) -> Output:
        if batch.plan is not None:  # the apply pass of a global run: decisions are made
            rows = batch.rows.copy()
            for column in [*self.produces, "status", "error"]:
                rows[column] = list(batch.plan[column])
            return Output(rows=rows)
        rows = self._measure(batch)
        failed = failing(self.config.rules, rows)
        return Output(rows=_with_statuses(rows, failed, self.config.rules))

    def summarize(self, batch: Batch) -> pd.DataFrame:
        return self._measure(batch)[["key", "image_key", *_DETECT_COLUMNS, *MEASURES, *BOOKKEEPING]]

    @classmethod
    def plan(cls, config: QualityConfig, summaries: Summaries):
        ranking = [r for r in config.rules if r.ranking]
        columns = sorted({r.by for r in ranking})
        everything = summaries.read_all(columns).to_pandas()
        cutoffs = {r.name: ranking_cutoff(everything[r.by], r) for r in ranking}
        for shard in summaries.shards:
            rows = summaries.read(shard).to_pandas()
            if not len(rows):
                continue
            failed = failing(config.rules, rows, cutoffs)
            decided = _with_statuses(rows, failed, config.rules, cutoffs)
            yield shard, decided[["key", *MEASURES, "quality_failed", *BOOKKEEPING, "status", "error"]]

    # -- measuring ---------------------------------------------------------------------------
    def _measure(self, batch: Batch) -> pd.DataFrame:
        """Every measure in order of cost (cascade.BY_COST), each only on the rows that still need it."""
        rows = batch.rows.copy().reset_index(drop=True)
        records = rows.to_dict("records")
        media = _ImageCache(batch)
        values: dict[str, list[Any]] = {name: [None] * len(rows) for name in MEASURES}
        costs: list[dict[str, float]] = [{} for _ in records]
        cascade = Cascade(self.config.rules, len(rows), on=self.config.cascade)
        read = sorted({c for rule in self.config.rules for c in rule.columns()} & set(MEASURES))
        cascade.judge(rows.assign(**{c: values[c] for c in read}))
        faces_of: dict[str, list[int]] = {}
        for i, row in enumerate(records):
            faces_of.setdefault(row["image_key"], []).append(i)
            media.boxes.setdefault(row["image_key"], []).append(np.asarray(row["box"], np.float32))
        for measure in BY_COST:
            needed = cascade.needs(measure) if self._on(measure.name) else None
            if needed is not None:
                groups = faces_of.values() if measure.per_image else [[i] for i in range(len(records))]
                for faces in groups:
                    chosen = [i for i in faces if needed[i]]
                    if chosen:
                        self._take(measure.name, chosen, records, values, media, costs)
            cascade.measured(measure, needed, rows.assign(**{c: values[c] for c in read}))
        out = rows.assign(**values)
        out["quality_skipped"] = cascade.skipped
        out["quality_ms"] = [{name: _ms(row.get(name)) for name in COSTS} for row in costs]
        return out

    def _on(self, measure: str) -> bool:
        if measure in ("brisque", "text", "nsfw", "clip_iqa"):
            return measure in self._scorers
        return measure == "row" or bool(getattr(self.config, measure))

    def _take(self, measure: str, faces: list[int], records: list[dict], values: dict, media, costs) -> None:
        """Run one measure on ``faces`` (one face, or the faces of one image), timing it apart from
        decoding; a per-image measure's time is shared by the faces that get it."""
        decoding = media.decode_seconds
        started = time.perf_counter()
        getattr(self, f"_{measure}")(faces, records, values, media)
        seconds = time.perf_counter() - started
        decode = media.decode_seconds - decoding
        for i in faces:
            costs[i][measure] = (seconds - decode) / len(faces)
            if decode:
                costs[i]["decode"] = costs[i].get("decode", 0.0) + decode / len(faces)

    # One method per measure (cascade.BY_COST): ``faces`` are row indices, all of one image for a
    # per-image measure.
    def _row(self, faces: list[int], records: list[dict], values: dict, media: _ImageCache) -> None:
        (i,) = faces
        row = records[i]
        width, height = float(row["face_width"]), float(row["face_height"])
        values["q_face_side"][i] = min(width, height)
        original = _original_size(row)
        if original:
            values["q_image_side"][i] = float(min(original))
            values["q_aspect"][i] = float(max(original) / max(1, min(original)))
            values["q_relative_area"][i] = width * height / float(original[0] * original[1])
        box = np.asarray(row["box"], np.float32)
        others = [b for b in media.boxes[row["image_key"]] if not np.array_equal(b, box)]
        values["q_faces_in_image"][i] = _int_or_none(row.get("num_faces"))
        values["q_is_largest"][i] = None if missing(row.get("is_largest")) else bool(row["is_largest"])
        values["q_max_overlap"][i] = measures.max_overlap(box, others)

    def _pose(self, faces: list[int], records: list[dict], values: dict, media: _ImageCache) -> None:
        (i,) = faces
        landmarks = records[i].get("landmarks")
        if landmarks is not None and len(landmarks) == 10:
            yaw, pitch, roll = head_pose(np.asarray(landmarks, np.float32).reshape(5, 2))
            values["q_yaw"][i], values["q_pitch"][i], values["q_roll"][i] = yaw, pitch, roll
            values["q_frontalness"][i] = measures.frontalness(yaw, pitch)

    def _sharpness(self, faces: list[int], records: list[dict], values: dict, media: _ImageCache) -> None:
        (i,) = faces
        crop = media.crop(records[i]["key"])
        if crop is not None:
            values["q_sharpness"][i], values["q_gradient"][i] = measures.sharpness(crop)

    def _exposure(self, faces: list[int], records: list[dict], values: dict, media: _ImageCache) -> None:
        (i,) = faces
        crop = media.crop(records[i]["key"])
        if crop is not None:
            for name, value in measures.exposure(crop).items():
                values[name][i] = value

    def _colour(self, faces: list[int], records: list[dict], values: dict, media: _ImageCache) -> None:
        image = media.image(records[faces[0]]["image_key"])
        if image is not None:
            spread = measures.channel_spread(image)
            for i in faces:
                values["q_channel_std"][i] = spread
                values["q_grayscale"][i] = bool(spread < self.config.grayscale_below)

    def _cartoon(self, faces: list[int], records: list[dict], values: dict, media: _ImageCache) -> None:
        from facecap.stages.quality.scorers import cartoon_score

        (i,) = faces
        face = media.face_region(records[i])
        if face is not None:
            values["q_cartoon"][i] = cartoon_score(face)

    def _brisque(self, faces: list[int], records: list[dict], values: dict, media: _ImageCache) -> None:
        (i,) = faces
        crop = media.crop(records[i]["key"])
        if crop is not None:
            values["q_brisque"][i] = self._scorers["brisque"].score(crop)

    def _clip_iqa(self, faces: list[int], records: list[dict], values: dict, media: _ImageCache) -> None:
        (i,) = faces
        crop = media.crop(records[i]["key"])
        if crop is not None:
            values["q_clip_iqa"][i] = self._scorers["clip_iqa"].score(crop)

    def _nsfw(self, faces: list[int], records: list[dict], values: dict, media: _ImageCache) -> None:
        self._per_image(faces, records, media, values["q_nsfw"], self._scorers["nsfw"].nsfw_score)

    def _text(self, faces: list[int], records: list[dict], values: dict, media: _ImageCache) -> None:
        self._per_image(faces, records, media, values["q_text_fraction"], self._scorers["text"].text_fraction)

    @staticmethod
    def _per_image(faces: list[int], records: list[dict], media: _ImageCache, column: list, score) -> None:
        """One score of the whole image (the faces share an image), given to each of its faces."""
        image = media.image(records[faces[0]]["image_key"])
        if image is not None:
            value = score(image)
            for i in faces:
                column[i] = value


_DETECT_COLUMNS = ("det_score", "face_width", "face_height", "face_area_ratio", "num_faces", "is_largest")


class _ImageCache:
    """Decoded images and crops of one batch (each decoded once, timed), and each image's face boxes."""

    def __init__(self, batch: Batch):
        self.batch = batch
        self.boxes: dict[str, list[np.ndarray]] = {}
        self.decode_seconds = 0.0
        self._images: dict[str, np.ndarray | None] = {}
        self._crops: dict[str, np.ndarray | None] = {}

    def image(self, key: str) -> np.ndarray | None:
        if key not in self._images:
            self._images[key] = self._decode(self.batch.media.get("image", {}).get(key))
        return self._images[key]

    def crop(self, key: str) -> np.ndarray | None:
        if key not in self._crops:
            self._crops[key] = self._decode(self.batch.media.get("aligned112", {}).get(key))
        return self._crops[key]

    def _decode(self, data: bytes | None) -> np.ndarray | None:
        started = time.perf_counter()
        pixels = decode_bgr(data)
        self.decode_seconds += time.perf_counter() - started
        return pixels

    def face_region(self, row: dict) -> np.ndarray | None:
        """The face box in the stored image's pixels (boxes are in original pixels)."""
        image = self.image(row["image_key"])
        if image is None:
            return None
        original = _original_size(row) or (image.shape[1], image.shape[0])
        sx, sy = image.shape[1] / original[0], image.shape[0] / original[1]
        x1, y1, x2, y2 = (float(v) for v in row["box"][:4])
        left, top = max(0, int(x1 * sx)), max(0, int(y1 * sy))
        right, bottom = min(image.shape[1], math.ceil(x2 * sx)), min(image.shape[0], math.ceil(y2 * sy))
        if right - left < 8 or bottom - top < 8:
            return None
        return image[top:bottom, left:right]


def _original_size(row: dict) -> tuple[int, int] | None:
    width, height = row.get("original_width"), row.get("original_height")
    if missing(width) or missing(height) or not width or not height:
        width, height = row.get("width"), row.get("height")
    if missing(width) or missing(height) or not width or not height:
        return None
    return int(width), int(height)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 4)


def _int_or_none(value: Any) -> int | None:
    return None if missing(value) else int(value)


def _with_statuses(
    rows: pd.DataFrame, failed: list[list[str]], rules: list[Rule], cutoffs: dict[str, float] | None = None
) -> pd.DataFrame:
    by_name = {rule.name: rule for rule in rules}
    out = rows.copy()
    out["quality_failed"] = failed
    out["status"] = ["ok" if not names else f"quality:{names[0]}" for names in failed]
    out["error"] = [
        None if not names else _explain(by_name[names[0]], row, cutoffs)
        for names, row in zip(failed, out.to_dict("records"), strict=True)
    ]
    return out


def _explain(rule: Rule, row: dict, cutoffs: dict[str, float] | None) -> str:
    if rule.ranking:
        cutoff = (cutoffs or {}).get(rule.name)
        return f"{rule.by}={_fmt(row.get(rule.by))} is below the dataset's top cut-off {_fmt(cutoff)}"
    shown = ", ".join(f"{c}={_fmt(row.get(c))}" for c in sorted(rule.columns()))
    return f"failed '{rule.expr}' ({shown})"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
