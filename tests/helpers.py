"""Helpers shared by tests: tiny URL lists, running stages, reading datasets back."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import RunnerConfig
from pipeline.dataset import Dataset
from pipeline.executors import LocalExecutor, RayExecutor
from pipeline.runner import StageResult, run_stage
from pipeline.sources import open_source
from pipeline.storage import Storage
from pipeline.worker import StageJob
from stages.ingest import IngestConfig, IngestStage


def write_url_csv(path: Path, n: int, broken_every: int = 0) -> Path:
    lines = ["url,caption"]
    for i in range(n):
        url = f"http://host{i % 7}.example/img/{i}.jpg"
        if broken_every and i % broken_every == broken_every - 1:
            url = f"nope://{i}"
        lines.append(f'{url},"caption {i}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def ingest(input_path: Path | str, output: Path | str, executor=None, shard_size: int = 10, **config) -> StageResult:
    cfg = IngestConfig(input=[str(input_path)], shard_size=shard_size, **config)
    job = StageJob(stage_cls=IngestStage, config=cfg, output=str(output))
    return run_stage(job, executor or LocalExecutor(), source=open_source(cfg))


def run(stage_cls, parent, output, config=None, executor=None, runner: RunnerConfig | None = None, revisit=False, **kw):
    cfg = config or stage_cls.config_model()
    job = StageJob(stage_cls=stage_cls, config=cfg, output=str(output), parent=str(parent), revisit=revisit)
    return run_stage(job, executor or LocalExecutor(), runner=runner, **kw)


def ray_executor() -> RayExecutor:
    return RayExecutor()


def read_all(folder: Path | str) -> pa.Table:
    dataset = Dataset(Storage(str(folder)))
    tables = [dataset.read_shard(i) for i in dataset.shard_indices()]
    return pa.concat_tables(tables) if tables else pa.table({})


def read_parquet_dir(folder: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted(folder.glob("part-*.parquet")))
