"""A stage for cluster tests, loaded as a plugin (FACECAP_STAGES=rendezvous_stage, this folder on
PYTHONPATH of the driver and of every Ray node).

Each shard waits until ``meet`` shards are in progress at once (marker files in a folder every node
sees), so on nodes of one CPU each the shards must be spread over ``meet`` nodes: spreading is then
a fact the test can check, not a race between Ray's leases and milliseconds of work.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from facecap.pipeline.registry import register
from facecap.pipeline.stage import Batch, Output, Resources, Stage, StageConfig


class RendezvousConfig(StageConfig):
    folder: str = Field(description="where each shard leaves its marker")
    meet: int = Field(2, ge=1, description="shards that must be in progress together before any goes on")
    timeout: float = Field(120.0, gt=0, description="a cap: the test fails on the nodes it sees, not by hanging")


@register
class RendezvousStage(Stage):
    name = "rendezvous"
    order = 900
    help = "Hold each shard until enough shards run at once (cluster tests)."
    config_model = RendezvousConfig
    produces: ClassVar = {"rendezvous_pid": pa.int64()}
    resources = Resources(cpus=1, batch_size=100_000)

    def process(self, batch: Batch) -> Output:
        Path(self.config.folder, f"{os.getpid()}-{batch.rows['key'].iloc[0]}").touch()
        wait_until(lambda: len(os.listdir(self.config.folder)) >= self.config.meet, self.config.timeout)
        return Output(rows=batch.rows.assign(rendezvous_pid=os.getpid()))


def wait_until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
