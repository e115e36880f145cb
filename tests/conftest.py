"""Shared fixtures: the ../shared folder, one local Ray per session, an S3 server on loopback."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Fake credentials before any Ray worker starts, so workers sign their requests to the test S3
# server whichever fixture starts first (unsigned uploads get stored with their chunk framing).
for _name, _value in (
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_REGION", "us-east-1"),
):
    os.environ.setdefault(_name, _value)

TESTS = Path(__file__).parent
REPO = TESTS.parent
sys.path.insert(0, str(TESTS))
# The shared test models (MobileFaceNet, genderage, ...) for every process of the session, Ray
# workers included: they inherit the environment Ray starts with.
os.environ.setdefault("FACECAP_MODELS", str(Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared")) / "models"))


def shared_dir() -> Path:
    root = Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared"))
    if not (root / "data" / "faces" / "images.csv").is_file():
        pytest.fail(
            f"test fixtures not found at {root}: put the shared folder beside the repo or set FACECAP_SHARED",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def shared() -> Path:
    return shared_dir()


@pytest.fixture(scope="session")
def face_photos(shared: Path) -> Path:
    return shared / "data" / "faces"


@pytest.fixture(scope="session")
def ray_local():
    """One embedded 2-CPU Ray for the whole session (ray.init costs seconds and a GB)."""
    import ray
    import toystages
    from ray import cloudpickle

    from facecap.pipeline import cluster
    from facecap.pipeline.config import RayConfig

    # Ray workers cannot import modules from tests/; ship the toy stages by value instead.
    cloudpickle.register_pickle_by_value(toystages)
    cluster.connect(RayConfig(num_cpus=2, object_store_mb=256))
    yield ray
    cluster.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in server mode) on 127.0.0.1."""
    from moto.server import ThreadedMotoServer

    # Port 0: the server binds a free port itself. A port probed free and bound later can be taken
    # in between by any other process of a busy machine.
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def ingested(tmp_path):
    """45 URLs (every 9th invalid) ingested into 5 shards of 10; test modules may define their own."""
    from helpers import ingest, write_url_csv

    csv = write_url_csv(tmp_path / "urls.csv", 45, broken_every=9)
    result = ingest(csv, tmp_path / "ingest", shard_size=10)
    assert result.ok and result.shards == 5
    return tmp_path / "ingest"
