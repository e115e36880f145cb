"""docs/adding-a-stage.md, run: the stage it builds, kept in its own folder, is found, gets a command
built from its declared options, and runs inside `facecap run` after ingest."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
from helpers import facecap_env, write_url_csv

FACECAP = str(Path(sys.executable).parent / "facecap")

DOC = Path(__file__).resolve().parents[2] / "docs" / "adding-a-stage.md"


def write_stage_from_the_doc(folder: Path) -> None:
    """The doc's three Python blocks, in order: stage.py, __init__.py, cli.py; its folder renamed
    from stages/shout/ to a plugin package outside facecap."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 3, "docs/adding-a-stage.md should show stage.py, __init__.py and cli.py"
    folder.mkdir(parents=True)
    for name, code in zip(("stage.py", "__init__.py", "cli.py"), blocks, strict=True):
        (folder / name).write_text(code.replace("facecap.stages.shout", folder.name))


def test_a_stage_in_its_own_folder_runs_through_facecap_run(tmp_path):
    write_stage_from_the_doc(tmp_path / "plugins" / "toy_shout")
    urls = write_url_csv(tmp_path / "urls.csv", 3)
    recipe = tmp_path / "toy.yaml"
    recipe.write_text(
        textwrap.dedent("""
            name: toy
            stages: [ingest, shout]
            shout: {marks: 2}
        """)
    )
    env = facecap_env(FACECAP_STAGES="toy_shout", PYTHONPATH=str(tmp_path / "plugins"))

    helped = subprocess.run([FACECAP, "shout", "--help"], env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert "--marks" in helped.stdout and "exclamation marks" in helped.stdout

    args = [FACECAP, "run", "-c", str(recipe), "-i", str(urls), "-o", str(tmp_path / "work"), "--executor", "local"]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    rows = pq.read_table(tmp_path / "work" / "shout" / "part-00000.parquet").to_pandas()
    assert list(rows["alt_shout"]) == ["CAPTION 0!!", "CAPTION 1!!", "CAPTION 2!!"]
    assert set(rows["status"]) == {"ok"}

    missing = subprocess.run([FACECAP, "run", "-c", str(recipe), "-o", str(tmp_path / "w2"), "--dry-run"],
                             env=facecap_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "unknown key 'shout'" in missing.stderr  # one line, not a traceback
