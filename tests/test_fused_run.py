"""`facecap run` fuses its per-shard stages by default; on real photos a fused run leaves exactly what
`--no-fuse` leaves: the same rows and statuses (every column but timings) and the same tar members,
in every stage's folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import facecap_env, snapshot

from facecap.corpus_server import CorpusServer

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
FACECAP = str(Path(sys.executable).parent / "facecap")
PHOTOS = 16
FUSED = "download+detect+quality+tag+caption"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, face_photos):
    """16 real photos and 2 broken URLs from 127.0.0.1, and the demo recipe (every stage), 4 shards."""
    root = tmp_path_factory.mktemp("fused")
    served = root / "served"
    served.mkdir()
    photos = sorted((face_photos / "deepface").glob("*.jpg"))[:PHOTOS]
    for photo in photos:
        shutil.copyfile(photo, served / photo.name)
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    config["ingest"]["shard_size"] = 5
    # A rule that rejects some faces, so tag and caption see a mix of ok and rejected rows.
    config["quality"]["rules"].append({"name": "big_face", "expr": "q_face_side >= 300"})
    (root / "recipe.yaml").write_text(yaml.safe_dump(config))
    with CorpusServer(served) as server:
        urls = [server.url(f"/files/{p.name}") for p in photos] + [server.url("/status/404"), urls_truncated(server)]
        (root / "urls.csv").write_text("url,caption\n" + "\n".join(f"{u},alt {i}" for i, u in enumerate(urls)) + "\n")
        yield root, config["stages"]


def urls_truncated(server: CorpusServer) -> str:
    server.add("/truncated.jpg", b"\xff\xd8\xff\xe0" + b"\0" * 200, headers={"Content-Type": "image/jpeg"})
    return server.url("/truncated.jpg")


def facecap_run(root: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [FACECAP, "run", "-c", str(root / "recipe.yaml"), "-i", str(root / "urls.csv"), "-o", str(out), *extra]
    result = subprocess.run(args, env=facecap_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def test_a_fused_run_leaves_what_an_unfused_run_leaves(corpus):
    root, stages = corpus
    unfused = facecap_run(root, root / "unfused", "--no-fuse")
    fused = facecap_run(root, root / "fused")
    assert f"{FUSED}: fused" in fused.stderr and "fused" not in unfused.stderr
    for stage in stages:  # each stage still reports its own line
        assert f"{stage}: 4/4 shards done" in fused.stdout
    expected = snapshot(root / "unfused", stages)
    assert ok_rows(expected["detect"]) >= PHOTOS - 3
    assert any(r["status"].startswith("quality:") for r in expected["quality"]["rows"])  # rules did reject
    assert expected["tag"]["media"] == {} and expected["detect"]["media"]  # crops only in detect's tars
    assert snapshot(root / "fused", stages) == expected

    again = facecap_run(root, root / "fused")  # resume: every stage, fused or not, has nothing to do
    assert again.stdout.count("nothing to do") == len(stages), again.stdout


def ok_rows(stage_snapshot: dict) -> int:
    return stage_snapshot["by_status"].get("ok", 0)
