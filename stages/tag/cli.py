"""``facecap tag``: its flags, and ``--calibrate`` of per-attribute thresholds on a tag dataset."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
from rich.table import Table

from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.options import Flag, Invocation, StageCommand, Switch
from facecap.stages.tag.calibrate import calibrate


def calibrate_thresholds(call: Invocation) -> bool:
    """``--calibrate LABELS.csv IN``: per-attribute thresholds for a finished tag dataset."""
    labels_path = call.switches.get("calibrate")
    if labels_path is None:
        return False
    directory = call.input
    dataset = Dataset.at(directory)
    if dataset.require_manifest().stage != "tag":
        raise FacecapError(f"{directory} is not a tag dataset; --calibrate reads the output of facecap tag")
    tagged = pa.concat_tables([dataset.read_shard(i) for i in dataset.done_shards()]).to_pandas()
    try:
        labels = pd.read_csv(labels_path, dtype={"key": str})
    except (OSError, ValueError) as exc:
        raise FacecapError(f"{labels_path}: cannot read the labels ({exc})") from None
    results = calibrate(tagged, labels)
    if not results:
        raise FacecapError(f"{labels_path}: no labelled CelebA attribute matches a tagged face key")
    table = Table(title=f"calibrated on {labels_path}")
    for column in ("attribute", "labelled", "threshold", "balanced acc.", "at 0.85"):
        table.add_column(column)
    for r in results:
        table.add_row(
            r.attribute, str(r.labelled), f"{r.threshold:.3f}", f"{r.balanced_accuracy:.3f}", f"{r.at_default:.3f}"
        )
    call.print(table)
    call.print("tag:\n  thresholds:")
    for r in results:
        call.print(f"    {r.attribute}: {r.threshold:.3f}")
    return True


COMMANDS = (
    StageCommand(
        stage="tag",
        summary="IN: face rows with crops (detect or quality); OUT: attribute columns (attr_* for the 40 CelebA "
        "attributes, age, gender, emotion, pose, skin tone, ...) and tag:too_few_attributes.",
        input_help="face dataset (detect or quality); with --calibrate a tag dataset",
        output_optional=True,
        flags=(
            Flag(
                "backends",
                help="comma-separated, in order: agegender, genderage, emotion, geometry, skin, celeba, clip, vlm",
            ),
            Flag("threshold", help="an attribute counts above this probability (0.85)"),
            Flag(
                "min_confident",
                help="keep faces with at least this many (default 5, or as many as the backends can set)",
            ),
        ),
        switches=(
            Switch("--calibrate", Path, "labels CSV (key + 0/1 CelebA columns): print per-attribute thresholds for IN"),
        ),
        intercept=calibrate_thresholds,
        examples=(
            "facecap tag work/quality work/tag (offline: age/gender, pose, eyes/mouth/smile with the face mesh, "
            "skin tone)",
            "facecap tag work/quality work/tag --backends celeba,agegender,geometry "
            "--set tag.celeba_checkpoint=celeba_r50.pth",
            "facecap tag work/quality work/tag --min-confident 3 --threshold 0.8",
            "facecap tag work/quality work/tag --backends vlm,geometry --set tag.vlm.model=Qwen/Qwen2.5-VL-7B-Instruct "
            "--set tag.vlm.openai.base_url=http://localhost:8000/v1 (a VLM answers all 40 as JSON)",
        ),
    ),
)
