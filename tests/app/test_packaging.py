"""The installed wheel is self-contained: one `facecap` import package that carries its recipes and
prompts, and a command that works from any folder with no checkout beside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import facecap_env

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from the tracked files only (a copy: building leaves build/ and egg-info)."""
    source = tmp_path_factory.mktemp("source")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), "."]
    subprocess.run(build, cwd=source, check=True, capture_output=True)
    return next(out.glob("facecap-*.whl"))


def test_the_wheel_has_one_top_level_package_with_its_recipes_and_prompts(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"facecap"}
    for data in ("demo.yaml", "default.yaml", "hq.yaml", "prompts/rewrite.yaml", "prompts/vlm.yaml"):
        assert f"facecap/configs/{data}" in names
    for module in ("cli.py", "pipeline/runner.py", "stages/detect/stage.py", "stages/quality/cli.py"):
        assert f"facecap/{module}" in names


@pytest.mark.slow
def test_a_fresh_venv_with_the_wheel_runs_from_another_folder(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The dependencies come from the test environment's site-packages, read as a plain folder: its
    # .pth files (among them the editable install of this checkout) are not run, so only the wheel
    # provides `facecap`.
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    Path(site, "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = facecap_env()
    env.pop("PYTHONPATH", None)

    def run(*args: str | os.PathLike) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=elsewhere, env=env, capture_output=True, text=True, timeout=240)

    where = run(python, "-c", "import facecap, facecap.pipeline, facecap.stages; print(facecap.__file__)")
    assert where.returncode == 0, where.stderr
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    assert run(python, "-c", "import pipeline").returncode != 0  # no generic top-level names
    assert run(python, "-c", "import stages").returncode != 0

    helped = run(venv / "bin" / "facecap", "--help")
    assert helped.returncode == 0, helped.stderr
    assert "quality" in helped.stdout and "recaption" in helped.stdout
    planned = run(venv / "bin" / "facecap", "run", "-c", "demo", "--output", "work", "--dry-run")
    assert planned.returncode == 0, planned.stderr
    assert "plan: demo" in planned.stdout and "dedup" in planned.stdout
    prompt = run(
        python,
        "-c",
        "from facecap.stages.caption.stage import CaptionConfig, _load_prompt; "
        "print(_load_prompt(CaptionConfig(captioner='rewrite'))['user'][:40])",
    )
    assert prompt.returncode == 0, prompt.stderr
    shipped = yaml.safe_load((REPO / "configs" / "prompts" / "rewrite.yaml").read_text())["user"].strip()
    assert prompt.stdout.strip() == shipped[:40].strip()
