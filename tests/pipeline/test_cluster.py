"""Ray lifecycle: a real two-node cluster on loopback, started with the ``ray`` CLI and driven by ``facecap``
as a separate process; facecap beside such a cluster; stopping an executor with shards in flight.

Both nodes run on this machine with distinct loopback IPs. Ray replaces 127.0.0.1 (and "localhost")
with the machine's outward IP wherever it meets it, so the nodes use 127.0.0.2 and 127.0.0.3, which
are loopback too (127.0.0.0/8) but are taken as given. Ray still binds its gRPC ports on all
interfaces; that is Ray's choice and cannot be configured.

Other tests of the session run an embedded Ray, so the cluster is never stopped with ``ray stop``
(which kills every Ray on the machine): each ``ray start`` runs in a new session, every process it
spawns (GCS, raylet, agents, workers) inherits that session id, and exactly those are killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import psutil
import pytest
from conftest import free_port
from helpers import ingest, kill_session, read_all, run, write_url_csv
from typer.testing import CliRunner

from facecap.cli import app
from facecap.corpus_server import CorpusServer
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import ConfigError
from facecap.pipeline.executors import RayExecutor
from facecap.pipeline.stage import Batch, Output, Resources, Stage, StageConfig
from facecap.pipeline.storage import Storage
from facecap.pipeline.worker import StageJob

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
ROWS, SHARD_SIZE = 200, 20
START_TIMEOUT = 90  # seconds for one `ray start`
RUN_TIMEOUT = 180  # seconds for one facecap run

LIST_NODES = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
nodes, cpus = int(sys.argv[2]), float(sys.argv[3])
deadline = time.monotonic() + 60
while True:  # all nodes alive and their CPUs known cluster-wide (else the first shards all stay on the head)
    alive = [n for n in ray.nodes() if n["Alive"]]
    if (len(alive) >= nodes and ray.available_resources().get("CPU", 0) >= cpus) or time.monotonic() > deadline:
        break
    time.sleep(0.2)
time.sleep(1)  # let every raylet's view of the other node's resources catch up too
print(json.dumps({n["NodeID"]: n["NodeManagerAddress"] for n in alive}))
"""


@dataclass
class Cluster:
    address: str
    root: str  # RAY_TMPDIR-style root: Ray's temp dir is ROOT/ray
    env: dict[str, str]
    nodes: dict[str, str] = field(default_factory=dict)  # node id -> node IP
    sessions: set[int] = field(default_factory=set)  # session ids whose processes are ours

    def spawn(self, args: list[str], log: Path, **kwargs) -> subprocess.Popen:
        """Start a process in a new session that cleanup will kill, with its whole tree."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs)
        self.sessions.add(proc.pid)
        return proc

    def ray_start(self, *args: str) -> int:
        """``ray start ARGS``; returns the session id that the node's processes share."""
        log = Path(self.root) / "ray-start.log"
        proc = self.spawn([str(BIN / "ray"), "start", *args], log, env=self.env)
        try:
            rc = proc.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"ray start {' '.join(args)} took over {START_TIMEOUT}s:\n{log.read_text()[-3000:]}")
        assert rc == 0, f"ray start {' '.join(args)} failed ({rc}):\n{log.read_text()[-3000:]}"
        return proc.pid

    def node_addresses(self, nodes: int, cpus: float) -> dict[str, str]:
        """Node id -> IP of the live nodes, once ``nodes`` nodes with ``cpus`` CPUs are known."""
        listing = subprocess.run(
            [sys.executable, "-c", LIST_NODES, self.address, str(nodes), str(cpus)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
            start_new_session=True,
        )
        assert listing.returncode == 0, listing.stderr[-3000:]
        return json.loads(listing.stdout.strip().splitlines()[-1])


def our_processes(sessions: set[int], root: str) -> list[psutil.Process]:
    """Live processes in our sessions, or naming our temp dir (belt and braces: never anyone else's)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
            if os.getsid(proc.pid) in sessions or any(root in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def stop(sessions: set[int], root: str) -> list[str]:
    """SIGKILL every process of ours (its state is thrown away); returns what survived (should be none)."""
    deadline = time.monotonic() + 15
    while (procs := our_processes(sessions, root)) and time.monotonic() < deadline:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        time.sleep(0.2)
    return [" ".join(p.info["cmdline"] or [p.name()])[:200] for p in our_processes(sessions, root)]


PLUGINS = Path(__file__).resolve().parents[1] / "plugins"


def node_options(temp_dir: str) -> list[str]:
    return ["--object-store-memory=100000000", f"--temp-dir={temp_dir}", "--disable-usage-stats"]


@pytest.fixture(scope="module")
def cluster():
    # Short: Ray's unix socket paths (ROOT/ray/session_.../sockets/raylet.1) must fit in 107 bytes.
    root = tempfile.mkdtemp(prefix="fcr-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Every node can import the test plugin stages (tests/plugins), as a cluster's nodes would have them installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PLUGINS), env.get("PYTHONPATH")]))
    port = free_port()
    c = Cluster(address=f"{HEAD_IP}:{port}", root=root, env=env)
    temp_dir = os.path.join(root, "ray")
    common = ["--num-cpus=1", *node_options(temp_dir)]
    try:
        c.ray_start("--head", f"--node-ip-address={HEAD_IP}", f"--port={port}", "--include-dashboard=false", *common)
        c.ray_start(f"--address={c.address}", f"--node-ip-address={NODE_IP}", *common)
        c.nodes = c.node_addresses(2, 2)
        assert sorted(c.nodes.values()) == [HEAD_IP, NODE_IP], c.nodes
        yield c
    finally:
        survivors = stop(c.sessions, root)
        shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"cluster processes survived cleanup: {survivors}"


def facecap(c: Cluster, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real `facecap` command as its own driver process (its own session, killed on timeout)."""
    log = Path(c.root) / "facecap.log"
    log.write_text("")
    proc = c.spawn([str(BIN / "facecap"), *args], log, env=env or c.env, cwd=c.root)
    try:
        proc.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"facecap {' '.join(args)} ran over {RUN_TIMEOUT}s:\n{log.read_text()[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), "")


def stats_json(folder: Path) -> dict:
    result = CliRunner().invoke(app, ["stats", str(folder), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def shard_nodes(folder: Path) -> list[str]:
    return [json.loads(p.read_text())["node"] for p in sorted((folder / "_stats").glob("part-*.json"))]


def check_funnel(folder: Path) -> None:
    summary = stats_json(folder)
    assert summary["rows"] == summary["rows_in"] == ROWS == sum(summary["by_status"].values())
    assert summary["by_status"] == {"ok": ROWS - ROWS // 10, "ingest:invalid_url": ROWS // 10}
    assert summary["shards"] == {"total": ROWS // SHARD_SIZE, "done": ROWS // SHARD_SIZE, "failed": 0}
    assert summary["complete"]


def test_ingest_on_a_two_node_cluster_uses_both_nodes(cluster, tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", ROWS, broken_every=10)
    out = tmp_path / "out"
    args = ["ingest", str(csv), str(out), "--shard-size", str(SHARD_SIZE), "--ray-address", cluster.address]
    first = facecap(cluster, *args)
    assert first.returncode == 0, first.stdout[-3000:]
    assert f"{ROWS // SHARD_SIZE}/{ROWS // SHARD_SIZE} shards done" in first.stdout
    check_funnel(out)
    nodes = shard_nodes(out)
    assert len(nodes) == ROWS // SHARD_SIZE and set(nodes) <= set(cluster.nodes)

    again = facecap(cluster, *args)
    assert again.returncode == 0 and "nothing to do" in again.stdout, again.stdout[-3000:]

    # An ingest shard takes milliseconds, so which nodes run them is a race between Ray's leases and
    # the work: on a busy machine one node can finish them all. A stage whose shards wait until two
    # run at once makes the spread certain: with one CPU a node, the two must be on both nodes.
    meet = tmp_path / "meet"
    meet.mkdir()
    held = tmp_path / "held"
    args = ["rendezvous", str(out), str(held), "--ray-address", cluster.address, "--set", f"rendezvous.folder={meet}"]
    spread = facecap(cluster, *args, env={**cluster.env, "FACECAP_STAGES": "rendezvous_stage"})
    assert spread.returncode == 0, spread.stdout[-3000:]
    nodes = shard_nodes(held)
    assert set(nodes) == set(cluster.nodes), f"shards ran on {nodes}, cluster nodes are {cluster.nodes}"


def test_without_an_address_facecap_starts_its_own_ray_even_beside_a_cluster(cluster, tmp_path):
    # With RAY_TMPDIR at the cluster's root, ROOT/ray/ray_current_cluster names the cluster, as
    # /tmp/ray/ray_current_cluster does after a plain `ray start`. Without an address facecap must
    # still start its own embedded Ray (ray.init would otherwise join the cluster and reject num_cpus).
    csv = write_url_csv(tmp_path / "urls.csv", ROWS, broken_every=10)
    assert (Path(cluster.root) / "ray" / "ray_current_cluster").is_file()
    out = tmp_path / "out"
    env = {**cluster.env, "RAY_TMPDIR": cluster.root}
    embedded = facecap(cluster, "ingest", str(csv), str(out), "--shard-size", str(SHARD_SIZE), "-q", env=env)
    assert embedded.returncode == 0, embedded.stdout[-3000:]
    check_funnel(out)
    nodes = set(shard_nodes(out))
    assert len(nodes) == 1 and not nodes & set(cluster.nodes), f"shards ran on {nodes}, not on a new local Ray"


LOST_IP = "127.0.0.4"


def busy_actors(sid: int, method: str) -> list[str]:
    """Titles of the node's Ray workers running ``method`` (Ray retitles a worker by what it runs)."""
    titles = []
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            title = " ".join(proc.info["cmdline"] or [])
            if os.getsid(proc.pid) == sid and title.startswith(f"ray::{method}"):
                titles.append(title)
    return titles


def test_a_node_lost_mid_stage_leaves_the_run_to_finish_on_the_other_nodes(cluster, tmp_path, face_photos):
    # A third node of this test's own, so the module's cluster stays whole; 2 CPUs, so it holds
    # detect actors and losing it leaves fewer CPUs than the pool had actors.
    lost = cluster.ray_start(
        f"--address={cluster.address}",
        f"--node-ip-address={LOST_IP}",
        "--num-cpus=2",
        *node_options(os.path.join(cluster.root, "ray")),
    )
    lost_ids = {node for node, ip in cluster.node_addresses(3, 4).items() if ip == LOST_IP}
    assert lost_ids, f"the node at {LOST_IP} never joined"
    photos = sorted((face_photos / "deepface").glob("*.jpg"))[:40]
    served = tmp_path / "served"
    served.mkdir()
    for photo in photos:
        shutil.copyfile(photo, served / photo.name)
    recipe = {
        "stages": ["ingest", "download", "detect"],
        "ingest": {"shard_size": 4},
        "download": {"safety": {"allow_private_networks": True}, "http": {"retries": 0}},
        # Full-size detection and every crop: a shard takes long enough to be caught running.
        "detect": {"detector": "yunet", "max_side": 4096, "crops": ["box", "square", "aligned", "aligned112"]},
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    with CorpusServer(served) as server:
        urls = "\n".join(server.url(f"/files/{p.name}") for p in photos)
        (tmp_path / "urls.txt").write_text(urls + "\n")
        args = ["run", "-c", str(tmp_path / "recipe.yaml"), "-i", str(tmp_path / "urls.txt"), "-o", str(out)]
        proc = cluster.spawn([str(BIN / "facecap"), *args, "--ray-address", cluster.address], log, env=cluster.env)
        try:
            deadline = time.monotonic() + RUN_TIMEOUT
            while not busy_actors(lost, "_ShardActor.process"):
                assert proc.poll() is None, f"the run ended before a detect shard ran on {LOST_IP}:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no detect shard ever ran on {LOST_IP}:\n{log.read_text()}"
                time.sleep(0.02)
            kill_session(lost)  # the node dies with a shard running on it
            assert proc.wait(timeout=RUN_TIMEOUT) == 0, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    output = log.read_text()
    shards = len(photos) // 4
    assert f"detect: {shards}/{shards} shards done" in output, output
    detect = Dataset(Storage(str(out / "detect")))
    summary = detect.summary()
    assert summary["complete"] and summary["shards"]["failed"] == 0
    downloaded = Dataset(Storage(str(out / "download"))).summary()
    assert downloaded["by_status"] == {"ok": len(photos)}
    keys = read_all(out / "detect").column("key").to_pylist()
    assert len(keys) == len(set(keys)) == summary["rows"]
    assert {k.split("_f")[0] for k in keys} == set(read_all(out / "download").column("key").to_pylist())
    retried = [s for s in detect.shard_stats().values() if s.attempts > 1]
    assert retried, "no detect shard was retried after the node was lost"
    assert all(s.node not in lost_ids for s in retried)


class Sleepy(Stage):
    """An actor stage whose shard takes two minutes: it is still running when the executor stops."""

    name = "sleepy"
    resources = Resources(cpus=1, batch_size=100, actor=True)

    def process(self, batch: Batch) -> Output:
        time.sleep(120)
        return Output(rows=batch.rows)


class Quick(Stage):
    name = "quick"
    resources = Resources(cpus=1, batch_size=100, actor=True)

    def process(self, batch: Batch) -> Output:
        return Output(rows=batch.rows)


@pytest.fixture
def ray_with_this_module(ray_local):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import tests/
    return ray_local


def test_stopping_the_ray_executor_kills_busy_actors(ray_with_this_module, tmp_path):
    # stop() runs in the runner's `finally`, so with shards in flight on Ctrl-C or an error. It used to
    # ray.cancel(force=True) every pending ref, which Ray refuses for actor tasks (ValueError): the
    # error hid the interrupt, and the busy actors kept their CPUs until the driver exited.
    ray_local = ray_with_this_module
    assert ingest(write_url_csv(tmp_path / "urls.csv", 10), tmp_path / "ingest", shard_size=10).ok
    job = StageJob(
        stage_cls=Sleepy, config=StageConfig(), output=str(tmp_path / "out"), parent=str(tmp_path / "ingest")
    )
    cpus = ray_local.cluster_resources()["CPU"]
    executor = RayExecutor()
    executor.start(job)
    executor.submit(0, None, 1)
    deadline = time.monotonic() + 60
    while ray_local.available_resources().get("CPU", 0) == cpus:  # wait until the actor holds its CPU
        assert time.monotonic() < deadline, "the actor never started"
        time.sleep(0.1)
    executor.stop()
    deadline = time.monotonic() + 30
    while ray_local.available_resources().get("CPU", 0) < cpus:  # the killed actor gives its CPU back
        assert time.monotonic() < deadline, "the busy actor still holds its CPU after stop()"
        time.sleep(0.1)
    assert not (tmp_path / "out" / "_done").exists()


@pytest.mark.timeout(90)
def test_an_actor_stage_never_has_more_shards_in_flight_than_actors(ray_with_this_module, tmp_path):
    # runner.max_in_flight above the pool size made submit() create an actor per extra shard; with the
    # pool holding the CPUs those actors were never placed, their shards never ran, and the run hung.
    assert ingest(write_url_csv(tmp_path / "urls.csv", 30), tmp_path / "ingest", shard_size=10).ok
    result = run(Quick, tmp_path / "ingest", tmp_path / "out", executor=RayExecutor(max_in_flight=8))
    assert result.ok and result.processed == result.shards == 3


def test_a_gpu_stage_on_a_cluster_without_gpus_is_refused_before_any_shard(ray_with_this_module, tmp_path):
    # Ray would queue a worker that needs a GPU forever on a CPU-only cluster: a silent hang.
    assert ingest(write_url_csv(tmp_path / "urls.csv", 3), tmp_path / "ingest", shard_size=10).ok
    gpu_stage = type("GpuQuick", (Quick,), {"resources": replace(Quick.resources, gpus=1)})
    job = StageJob(
        stage_cls=gpu_stage, config=StageConfig(), output=str(tmp_path / "out"), parent=str(tmp_path / "ingest")
    )
    with pytest.raises(ConfigError, match=r"needs 1 GPU per worker and the Ray cluster has 0.*set quick\.gpus=0"):
        RayExecutor().start(job)
    assert not (tmp_path / "out").exists()
