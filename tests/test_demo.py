"""`make demo` runs every built stage offline on a corpus served from 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from pipeline import demo
from pipeline.dataset import Dataset
from pipeline.storage import Storage


@pytest.mark.slow
def test_demo_runs_offline_and_the_funnel_adds_up(tmp_path, monkeypatch, ray_local, capsys):
    monkeypatch.chdir(tmp_path)
    assert demo.main() == 0
    summary = Dataset(Storage(str(tmp_path / "demo-out" / "work" / "ingest"))).summary()
    assert summary["complete"]
    assert summary["rows"] == 48 == sum(summary["by_status"].values())
    assert summary["by_status"] == {
        "ok": 40,
        "ingest:invalid_url": 4,
        "ingest:duplicate_url": 2,
        "ingest:opted_out": 2,
    }
    manifest = json.loads((tmp_path / "demo-out" / "work" / "ingest" / "_manifest.json").read_text())
    assert manifest["recipe"]["name"] == "demo"
    assert "served at http://127.0.0.1:" in capsys.readouterr().out
