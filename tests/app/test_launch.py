"""The `facecap` entry point: a process-pool run starts its fork server before the CLI imports; a Ray run
stops its embedded Ray itself before Ray's exit hook would."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pyarrow.parquet as pq
from helpers import facecap_env, write_url_csv

from facecap.cli import REGISTRY
from facecap.launch import fork_server_preload, stage_folders


def test_every_registered_stage_lives_in_the_folder_its_command_names():
    assert set(REGISTRY) <= set(stage_folders())
    for name, stage_cls in REGISTRY.items():
        assert stage_cls.__module__ == f"facecap.stages.{name}.stage"  # what the fork server imports


def test_only_process_pool_runs_preload():
    assert fork_server_preload(["download", "in", "out", "--executor", "processes"]) == [
        "facecap.pipeline.worker",
        "facecap.stages.download",
    ]
    assert fork_server_preload(["--executor=processes", "detect", "in", "out"]) == [
        "facecap.pipeline.worker",
        "facecap.stages.detect",
    ]
    run_preload = fork_server_preload(["run", "-c", "r.yaml", "--executor", "processes"])
    assert run_preload[0] == "facecap.pipeline.worker"
    assert {f"facecap.stages.{name}" for name in REGISTRY} <= set(run_preload[1:])
    # auto (the default) runs CPU stages on the pool when no cluster is named.
    assert fork_server_preload(["download", "in", "out"]) == ["facecap.pipeline.worker", "facecap.stages.download"]
    assert fork_server_preload(["download", "in", "out", "--ray-address", "head:6379"]) is None
    assert fork_server_preload(["download", "in", "out", "--executor", "ray"]) is None
    assert fork_server_preload(["download", "in", "out", "--executor=local"]) is None
    assert fork_server_preload(["stats", "out", "--executor", "processes"]) is None
    assert fork_server_preload(["download", "in", "out", "--executor"]) is None
    assert fork_server_preload([]) is None


# Records whether the fork server was already running when facecap.cli began to import, then
# runs the real entry point; a subprocess, so this test run's own fork server is not involved.
PROBE = textwrap.dedent(
    """
    import sys
    from multiprocessing import forkserver
    from facecap import launch

    class Probe:
        def find_spec(self, name, path=None, target=None):
            if name == "facecap.cli":
                running = forkserver._forkserver._forkserver_pid is not None
                print(f"fork server running before the CLI imported: {running}", file=sys.stderr)
                sys.meta_path.remove(self)
            return None

    sys.meta_path.insert(0, Probe())
    sys.argv = ["facecap", *sys.argv[1:]]
    launch.main()
    """
)


def run_entry_point(*args: str, probe: str = PROBE) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", probe, *args], env=facecap_env(), capture_output=True, text=True, timeout=180
    )


def test_the_entry_point_starts_the_fork_server_first(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 60, broken_every=10)
    args = ["ingest", str(csv), str(tmp_path / "out"), "--shard-size", "20", "-q"]
    pooled = run_entry_point(*args, "--executor", "processes")
    assert pooled.returncode == 0, pooled.stderr
    assert "fork server running before the CLI imported: True" in pooled.stderr
    assert pq.read_table(tmp_path / "out").num_rows == 60
    local = run_entry_point(*args[:2], str(tmp_path / "local"), *args[3:], "--executor", "local")
    assert local.returncode == 0, local.stderr
    assert "fork server running before the CLI imported: False" in local.stderr


# Wraps ray.shutdown to report who calls it: facecap (facecap.pipeline.cluster), or Ray's exit hook (which
# passes _exiting_interpreter=True and first sleeps half a second).
RAY_PROBE = textwrap.dedent(
    """
    import sys
    import ray
    from facecap import launch

    real_shutdown = ray.shutdown

    def shutdown(*args, **kwargs):
        caller = "exit hook" if kwargs.get("_exiting_interpreter") else "cli"
        print(f"ray stopped by: {caller}, initialized: {ray.is_initialized()}", file=sys.stderr)
        real_shutdown(*args, **kwargs)

    ray.shutdown = shutdown
    sys.argv = ["facecap", *sys.argv[1:]]
    launch.main()
    """
)


def test_a_ray_command_stops_its_embedded_ray_before_exit(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 40, broken_every=10)
    args = ["ingest", str(csv), str(tmp_path / "out"), "--shard-size", "20", "-q", "--executor", "ray"]
    result = run_entry_point(*args, "--set", "ray.num_cpus=2", probe=RAY_PROBE)
    assert result.returncode == 0, result.stderr
    assert "ray stopped by: cli, initialized: True" in result.stderr
    assert pq.read_table(tmp_path / "out").num_rows == 40
