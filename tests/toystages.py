"""Small stages that exercise the runner: they write and read media, explode rows, fail on cue.

They live in a plain module on sys.path so Ray workers can import them like real stages.
"""

from __future__ import annotations

import json
import os
from typing import ClassVar

import pandas as pd
import pyarrow as pa

from facecap.pipeline.stage import Batch, GlobalStage, Output, Resources, Stage, StageConfig
from facecap.pipeline.tasks import TaskJob


class MakeConfig(StageConfig):
    fail_key: str | None = None  # a row whose processing raises
    crash_marker: str | None = None  # a file: while it exists, the whole batch raises


class MakeMedia(Stage):
    """Writes a small 'image' per ok row; rejects keys ending in 7."""

    name = "makemedia"
    config_model = MakeConfig
    consumes = ("url",)
    produces: ClassVar = {"payload_len": pa.int64()}
    writes_media = ("jpg", "json")
    resources = Resources(cpus=1, batch_size=4)

    def process(self, batch: Batch) -> Output:
        if self.config.crash_marker and os.path.exists(self.config.crash_marker):
            raise RuntimeError("simulated worker fault")
        rows = batch.rows.copy()
        media = {}
        statuses, lengths = [], []
        for key, url in zip(rows["key"], rows["url"], strict=True):
            if key == self.config.fail_key:
                raise ValueError(f"poisoned row {key}")
            if key.endswith("7"):
                statuses.append(self.reject("ends_in_7"))
                lengths.append(None)
                continue
            payload = f"image-of-{url}".encode()
            media[key] = {"jpg": payload, "json": json.dumps({"key": key}).encode()}
            statuses.append("ok")
            lengths.append(len(payload))
        rows["status"] = statuses
        rows["error"] = None
        rows["payload_len"] = lengths
        return Output(rows=rows, media=media)


class SplitConfig(StageConfig):
    crash_once_marker: str | None = None  # a file: the setup that finds it removes it and raises (a shard fails)


class SplitFaces(Stage):
    """Reads the media, emits two 'face' rows per image (like detect), with crops."""

    name = "splitfaces"
    config_model = SplitConfig
    consumes = ("payload_len",)
    produces: ClassVar = {"image_key": pa.string(), "face_index": pa.int64(), "crop_len": pa.int64()}
    reads_media: ClassVar = {"jpg": "key"}
    writes_media = ("crop.jpg",)
    resources = Resources(cpus=1, batch_size=3, actor=True)

    def setup(self) -> None:
        marker = self.config.crash_once_marker
        if marker and os.path.exists(marker):
            os.remove(marker)
            raise RuntimeError("simulated fault while loading models, once")

    def process(self, batch: Batch) -> Output:
        out_rows, media = [], {}
        for row in batch.rows.to_dict("records"):
            image = batch.media_of("jpg", row["key"])
            assert len(image) == row["payload_len"]
            for face in range(2):
                face_key = f"{row['key']}_f{face}"
                out_rows.append(
                    {
                        **row,
                        "key": face_key,
                        "image_key": row["key"],
                        "face_index": face,
                        "crop_len": len(image) // 2,
                        "status": "ok",
                        "error": None,
                    }
                )
                media[face_key] = {"crop.jpg": image[: len(image) // 2]}
        return Output(rows=pd.DataFrame(out_rows), media=media)


class ReadBoth(Stage):
    """Reads media from two ancestors: the image by image_key and the crop by key."""

    name = "readboth"
    consumes = ("image_key",)
    produces: ClassVar = {"ratio": pa.float64()}
    reads_media: ClassVar = {"jpg": "image_key", "crop.jpg": "key"}

    def process(self, batch: Batch) -> Output:
        rows = batch.rows.copy()
        rows["ratio"] = [
            len(batch.media_of("crop.jpg", k)) / len(batch.media_of("jpg", ik))
            for k, ik in zip(rows["key"], rows["image_key"], strict=True)
        ]
        return Output(rows=rows)


class TopConfig(StageConfig):
    keep: int = 10  # keep the rows with the longest media, across all shards
    poison_marker: str | None = None  # a file: while it exists, summarizing shard 2's rows raises
    bad_key: str | None = None  # a row whose summary always raises
    fan_out: bool = False  # plan: read each shard's summary in a task on the run's executor


def shard_lengths(shard: int, summaries) -> pd.DataFrame:
    """A plan task: one shard's summary, read where the task runs; leaves its pid in the scratch."""
    summaries.scratch.write_bytes(f"task-{shard}.pid", str(os.getpid()).encode())
    return summaries.read(shard, ["length"]).to_pandas().assign(shard=shard)


class KeepLongest(GlobalStage):
    """A global stage: keeps the ``keep`` rows with the longest image across the whole dataset."""

    name = "keeplongest"
    config_model = TopConfig
    produces: ClassVar = {"length": pa.int64(), "rank": pa.int64()}
    reads_media: ClassVar = {"jpg": "key"}
    resources = Resources(cpus=1, batch_size=4)
    setups = 0  # counted per process: the apply pass must not load models

    def setup(self) -> None:
        type(self).setups += 1

    def summarize(self, batch: Batch) -> pd.DataFrame:
        marker = self.config.poison_marker
        keys = list(batch.rows["key"])
        if marker and os.path.exists(marker) and any(k.startswith("000000002") for k in keys):
            raise RuntimeError("simulated fault in shard 2")
        if self.config.bad_key in keys:
            raise ValueError(f"cannot summarize {self.config.bad_key}")
        return pd.DataFrame({"key": keys, "length": [len(batch.media_of("jpg", k)) for k in keys]})

    @classmethod
    def plan(cls, config: TopConfig, summaries) -> object:
        if config.fan_out:
            job = TaskJob(name="lengths", function=shard_lengths)
            parts = summaries.run_tasks(job, ((shard, summaries) for shard in summaries.shards))
            table = pd.concat([parts[shard] for shard in summaries.shards], ignore_index=True)
        else:
            table = summaries.read_all(["length"]).to_pandas()
        table = table.sort_values(["length", "key"], ascending=[False, True]).reset_index(drop=True)
        table["rank"] = range(len(table))
        for shard, frame in table.groupby("shard"):
            yield int(shard), frame[["key", "length", "rank"]]

    def process(self, batch: Batch) -> Output:
        rows = batch.rows.copy()
        rows["length"] = list(batch.plan["length"])
        rows["rank"] = list(batch.plan["rank"])
        rows["status"] = ["ok" if r < self.config.keep else self.reject("not_top") for r in rows["rank"]]
        return Output(rows=rows)


class SleepyConfig(StageConfig):
    pid_folder: str  # each worker writes its pid here when it starts a shard
    seconds: float = 3.0  # first attempts of a shard sleep this long, so a test can kill the worker
    # With a release file, first attempts wait for it to appear instead (``seconds`` is then only a cap):
    # a test kills a worker, then releases the others; no sleep races the kill.
    release_file: str | None = None


def started_pids(pid_folder) -> list[int]:
    """Pids of the workers that wrote their marker, by marker name; a marker still being written is left out."""
    pids = []
    for name in sorted(os.listdir(pid_folder)):
        with open(os.path.join(pid_folder, name)) as f:
            text = f.read()
        if text:  # the pid goes in with a single write when the file closes: all of it or nothing yet
            pids.append(int(text))
    return pids


class Sleepy(Stage):
    """Copies rows through slowly on a shard's first attempt: a worker to be killed mid-shard."""

    name = "sleepy"
    config_model = SleepyConfig
    produces: ClassVar = {"worker_pid": pa.int64()}
    resources = Resources(cpus=1, batch_size=100)

    def process(self, batch: Batch) -> Output:
        import time

        marker = os.path.join(self.config.pid_folder, f"{os.getpid()}.{batch.rows['key'].iloc[0]}")
        first_attempt = not any(name.endswith(batch.rows["key"].iloc[0]) for name in os.listdir(self.config.pid_folder))
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        if first_attempt:
            stop = time.monotonic() + self.config.seconds
            if self.config.release_file is None:
                time.sleep(self.config.seconds)
            while self.config.release_file and not os.path.exists(self.config.release_file) and time.monotonic() < stop:
                time.sleep(0.02)
        rows = batch.rows.copy()
        rows["worker_pid"] = os.getpid()
        return Output(rows=rows)


class AskConfig(StageConfig):
    base_url: str  # an OpenAI-compatible server, as caption.openai.base_url
    ask_prefix: str | None = None  # rows whose key starts so ask too (all of a shard: the shard fails)


class Ask(Stage):
    """Asks a chat server about rows whose key ends in 3 or starts with ``ask_prefix``, through
    the real OpenAI engine, whose errors name its URL."""

    name = "ask"
    config_model = AskConfig
    produces: ClassVar = {"answer": pa.string()}
    resources = Resources(cpus=1, batch_size=100)

    def process(self, batch: Batch) -> Output:
        from facecap.stages.shared.engines import HttpSettings, OpenAIEngine, Request, Sampling

        engine = OpenAIEngine("m", HttpSettings(base_url=self.config.base_url, retries=0, timeout=10))
        prefix = self.config.ask_prefix
        answers = []
        for key in batch.rows["key"]:
            if key.endswith("3") or (prefix is not None and key.startswith(prefix)):
                answers.append(engine.generate([Request([{"role": "user", "content": key}])], Sampling())[0].text)
            else:
                answers.append(None)
        rows = batch.rows.copy()
        rows["answer"] = answers
        return Output(rows=rows)


def square_or_fail(number: int, payload: dict) -> dict:
    """A task function (pipeline/tasks.py): fails while ``payload['fail_while']`` exists, else squares."""
    marker = payload.get("fail_while")
    if marker and os.path.exists(marker):
        # Each try leaves a trace, so the test can count the retries.
        with open(f"{marker}.tries", "a") as tries:
            tries.write(f"{number}\n")
        raise RuntimeError(f"simulated fault in item {number}")
    return {"number": number, "square": number * number, "pid": os.getpid()}


class MeetConfig(StageConfig):
    meeting_folder: str  # each worker leaves its pid here, then waits to see the others'
    workers: int = 2  # distinct workers a shard waits to see before it goes on
    # Seconds a worker waits for them, once (generous: a loaded machine starts Ray actors slowly); a
    # run that cannot start them all goes on with fewer,
    # and the test sees it in ``workers_met``.
    wait_cap: float = 90.0


class Meet(Stage):
    """Records which worker ran each shard, the thread budget it was given and how many workers
    were running at once: each worker waits (once) until ``workers`` distinct ones have started."""

    name = "meet"
    config_model = MeetConfig
    produces: ClassVar = {
        "worker_pid": pa.int64(),
        "omp_threads": pa.int64(),
        "opencv_threads": pa.int64(),
        "workers_met": pa.int64(),
    }
    resources = Resources(cpus=1, batch_size=100, actor=True)

    def process(self, batch: Batch) -> Output:
        import time

        import cv2

        folder = self.config.meeting_folder
        with open(os.path.join(folder, f"{os.getpid()}.pid"), "w") as f:
            f.write(str(os.getpid()))
        waited = os.path.join(folder, f"{os.getpid()}.waited")
        if not os.path.exists(waited):
            stop = time.monotonic() + self.config.wait_cap
            while len(self._met()) < self.config.workers and time.monotonic() < stop:
                time.sleep(0.02)
            open(waited, "w").close()
        rows = batch.rows.copy()
        rows["worker_pid"] = os.getpid()
        rows["omp_threads"] = int(os.environ.get("OMP_NUM_THREADS", "0"))
        rows["opencv_threads"] = cv2.getNumThreads()
        rows["workers_met"] = len(self._met())
        return Output(rows=rows)

    def _met(self) -> set[str]:
        return {name for name in os.listdir(self.config.meeting_folder) if name.endswith(".pid")}


class WideMeet(Meet):
    """Meet for workers that ask for two CPUs each."""

    name = "wide_meet"
    resources = Resources(cpus=2, batch_size=100, actor=True)


class EnvConfig(StageConfig):
    variable: str  # the environment variable each row reports


class ReadEnv(Stage):
    """Copies rows through with the worker's value of an environment variable."""

    name = "readenv"
    config_model = EnvConfig
    produces: ClassVar = {"seen": pa.string()}
    resources = Resources(cpus=1, batch_size=100)

    def process(self, batch: Batch) -> Output:
        rows = batch.rows.copy()
        rows["seen"] = os.environ.get(self.config.variable)
        return Output(rows=rows)
