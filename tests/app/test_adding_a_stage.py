"""docs/adding-a-stage.md, run: a stage kept in its own folder is found, gets a command built from
its declared options, and runs inside `facecap run` after ingest."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
from helpers import facecap_env, write_url_csv

FACECAP = str(Path(sys.executable).parent / "facecap")

TOY_STAGE = '''
"""A toy stage: shouts each row's alt text into a new column, rejects rows without one."""

from typing import ClassVar

import pyarrow as pa
from pydantic import Field

from facecap.pipeline.options import Flag, StageCommand
from facecap.pipeline.registry import register
from facecap.pipeline.stage import Batch, Output, Stage, StageConfig


class ShoutConfig(StageConfig):
    marks: int = Field(1, ge=0, le=5, description="exclamation marks after the text")


@register
class ShoutStage(Stage):
    name = "shout"
    order = 15
    help = "Shout the alt text."
    config_model = ShoutConfig
    consumes = ("alt_text",)
    produces: ClassVar = {"alt_shout": pa.string()}

    def process(self, batch: Batch) -> Output:
        rows = batch.rows.copy()
        texts = [t if isinstance(t, str) and t else None for t in rows["alt_text"]]
        rows["alt_shout"] = [t.upper() + "!" * self.config.marks if t else None for t in texts]
        rows["status"] = [self.ok() if t else self.reject("no_text") for t in texts]
        rows["error"] = None
        return Output(rows=rows)


COMMANDS = (StageCommand(stage="shout", flags=(Flag("marks"),), examples=("facecap shout work/ingest work/shout",)),)
'''


def test_a_stage_in_its_own_folder_runs_through_facecap_run(tmp_path):
    folder = tmp_path / "plugins" / "toy_shout"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text(TOY_STAGE)
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
