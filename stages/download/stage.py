"""Download: fetch every ``ok`` row's URL into a checked, normalised, metadata-free image.

Rows finish in any order (a slow host never holds back the rest) and are yielded in small
pieces; the runner stores ``KEY.jpg`` (or .webp/.png) and ``KEY.json`` sorted by key.
Statuses are ``download:<reason>``: ``http_404``, ``timeout``, ``blocked_address``,
``opted_out_header``, ``too_large``, ``truncated_image``, ``not_an_image``, ... (docs/cli.md).
"""

from __future__ import annotations

import hashlib
import json
import queue
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from facecap.pipeline.registry import register
from facecap.pipeline.stage import Batch, Output, Resources, Stage, StageConfig, StageSpec
from facecap.pipeline.summary import Histogram
from facecap.stages.download.fetch import Fetcher, HttpSettings, SafetySettings, is_transient
from facecap.stages.shared.images import ImageRejected, ImageSettings, normalize

YIELD_EVERY = 64


class DownloadImageSettings(ImageSettings):
    """The image settings with a face corpus's limits on by default (docs/cli.md, Download): an
    image whose smaller side is under 64 px holds no face worth keeping (detect keeps faces of at
    least 128 px by default, 48 in the demo), and one more than 4 times wider than tall, or
    taller than wide (banners, strips, panoramas, a 6000x1 sliver), holds none at a usable size
    once detect scales it to ``max_side``. A recipe sets either to null or 0 to turn it off."""

    max_aspect_ratio: float | None = Field(
        4.0, gt=0, description="reject wider/taller images (after EXIF); null: no limit"
    )
    min_image_size: int = Field(64, ge=0, description="reject images whose smaller side is smaller; 0: no limit")


class DownloadConfig(StageConfig):
    concurrency: int = Field(32, ge=1, le=1024, description="downloads in flight per worker")
    http: HttpSettings = Field(default_factory=HttpSettings)
    safety: SafetySettings = Field(default_factory=SafetySettings)
    image: DownloadImageSettings = Field(default_factory=DownloadImageSettings)


# What the report plots of this stage's rows (summarized per shard by the workers).
IMAGE_SIDE_EDGES = (0, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 1_000_000)


def image_side(rows: pd.DataFrame) -> pd.Series:
    return np.minimum(rows["original_width"], rows["original_height"])


SUMMARIES = (Histogram("image side (px)", ("original_width", "original_height"), IMAGE_SIDE_EDGES, image_side),)


@register
class DownloadStage(Stage):
    name = "download"
    order = 20
    help = "Fetch every ok row's image: safe, polite, bounded; normalised to RGB, metadata stripped."
    config_model = DownloadConfig
    consumes = ("url",)
    summaries = SUMMARIES
    produces: ClassVar[dict[str, pa.DataType]] = {
        "http_status": pa.int32(),
        "final_url": pa.string(),
        "mime": pa.string(),
        "original_width": pa.int32(),
        "original_height": pa.int32(),
        "width": pa.int32(),
        "height": pa.int32(),
        "bytes": pa.int64(),
        "sha256": pa.string(),
        "reencoded": pa.bool_(),
        "fetch_seconds": pa.float32(),
        "attempts": pa.int16(),
    }
    writes_media = ("image", "json")
    # A whole shard per call: the stage keeps its own downloads in flight across rows.
    resources = Resources(cpus=1, batch_size=1_000_000)
    skip_if_parent_has = ("image",)

    def __init__(self, config: DownloadConfig):
        super().__init__(config)
        self.config: DownloadConfig = config
        self.fetcher: Fetcher | None = None

    @classmethod
    def spec(cls, config: DownloadConfig) -> StageSpec:
        return StageSpec(resources=cls.resources, writes={"image": config.image.output_format, "json": "json"})

    @classmethod
    def retryable(cls, status: str) -> bool:
        stage, _, reason = status.partition(":")
        return stage == cls.name and is_transient(reason)

    def setup(self) -> None:
        # The download threads already decode and encode images side by side; OpenCV splitting
        # each resize over every core as well only adds overhead (20% more CPU per image here).
        cv2.setNumThreads(1)
        self.fetcher = Fetcher(self.config.http, self.config.safety)

    def process(self, batch: Batch) -> Iterator[Output]:
        records = batch.rows.to_dict("records")
        # Finished rows come back through a queue (not wait(FIRST_COMPLETED), which walks every
        # pending future on each call) and at most 2 x concurrency rows are in flight.
        finished_queue: queue.SimpleQueue = queue.SimpleQueue()
        window = self.config.concurrency * 2
        finished: list[tuple[dict, dict | None]] = []
        in_flight = 0
        with ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="download") as pool:
            for row in records:
                pool.submit(self._one, row, finished_queue)
                in_flight += 1
                while in_flight >= window or (in_flight and not finished_queue.empty()):
                    finished.append(finished_queue.get())
                    in_flight -= 1
                if len(finished) >= YIELD_EVERY:
                    yield self._output(finished)
                    finished = []
            while in_flight:
                finished.append(finished_queue.get())
                in_flight -= 1
        if finished:
            yield self._output(finished)

    def _one(self, row: dict[str, Any], finished: queue.SimpleQueue) -> None:
        try:
            finished.put(self._fetch_row(row))
        except BaseException as exc:
            # A bug or a decoder crash on one file must not sink the shard, and process() waits
            # for one answer per row: whatever happened, this row answers.
            out = dict(row)
            out.update(status=self.reject("error"), error=f"{type(exc).__name__}: {exc}"[:500])
            finished.put((out, None))

    def _fetch_row(self, row: dict[str, Any]) -> tuple[dict, dict | None]:
        started = time.perf_counter()
        result = self.fetcher.fetch(row["url"])
        out = dict(row)
        out.update(http_status=result.http_status, final_url=result.final_url, attempts=result.attempts)
        media = None
        if not result.ok:
            out.update(status=self.reject(result.reason), error=result.detail)
        else:
            try:
                image = normalize(result.data, self.config.image)
            except ImageRejected as rejected:
                out.update(status=self.reject(rejected.reason), error=rejected.detail, mime=result.mime)
            else:
                digest = hashlib.sha256(image.data).hexdigest()
                out.update(
                    status=self.ok(),
                    error=None,
                    mime=image.mime,
                    original_width=image.original_width,
                    original_height=image.original_height,
                    width=image.width,
                    height=image.height,
                    bytes=len(image.data),
                    sha256=digest,
                    reencoded=image.reencoded,
                )
                media = {"image": image.data, "json": _sample_json(out)}
        out["fetch_seconds"] = round(time.perf_counter() - started, 4)
        return out, media

    @staticmethod
    def _output(finished: list[tuple[dict, dict | None]]) -> Output:
        rows = pd.DataFrame([row for row, _ in finished])
        media = {row["key"]: m for row, m in finished if m is not None}
        return Output(rows=rows, media=media)


def _sample_json(row: dict[str, Any]) -> bytes:
    fields = ("key", "url", "alt_text", "final_url", "width", "height", "original_width", "original_height", "sha256")
    return json.dumps({f: row.get(f) for f in fields}, ensure_ascii=False, default=str).encode()
