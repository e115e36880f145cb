"""``facecap tag``: its flags, ``--calibrate`` of per-attribute thresholds on a tag dataset, and
``facecap tag train`` (a CelebA-40 classifier for the ``celeba`` backend)."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import pandas as pd
import pyarrow as pa
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.options import Flag, Invocation, StageCommand, Switch
from facecap.pipeline.storage import absolute
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


TRAIN_EXAMPLES = """Examples:

* `facecap tag train ~/data/celeba r50/ --init resnet50-0676ba61.pth` (FaceCaption-15M's ResNet-50 from
  torchvision's ImageNet weights file; without --init it starts from random weights)
* `facecap tag train celeba.parquet probe/ --model clip-probe --clip-pretrained openai --epochs 30`
* `facecap tag work/quality work/tag --backends celeba --set tag.celeba_checkpoint=r50/model.onnx`

DATA is the CelebA release as downloaded: `img_align_celeba/`, `list_attr_celeba.txt`,
`list_eval_partition.txt`; or Parquet (a file or a folder of them) with columns `image` (encoded
bytes), `file`, `partition` (0 train, 1 val, 2 test) and the 40 attribute columns (1/-1).
OUT gets `model.onnx` (image in, 40 logits out), `model.card.json` beside it (input transform,
per-attribute thresholds, test metrics; the tag stage reads it), `checkpoint.pt` after every
epoch and `train.json`. Rerunning the same command resumes after the last finished epoch; a larger
--epochs continues training. docs/attributes.md has the costs.
"""


def train(
    data: Annotated[str, typer.Argument(help="CelebA: the release's folder, or Parquet (file or folder)")],
    output: Annotated[str, typer.Argument(help="folder for model.onnx, model.card.json and the checkpoint")],
    model: Annotated[
        Literal["resnet50", "clip-probe"],
        typer.Option(
            help="resnet50: FaceCaption-15M's classifier, trained end to end; clip-probe: a linear "
            "probe on frozen open_clip features (much cheaper; needs --clip-pretrained)"
        ),
    ] = "resnet50",
    epochs: Annotated[int, typer.Option(min=1, help="passes over the train split")] = 10,
    batch_size: Annotated[int, typer.Option(min=1, help="images per step")] = 64,
    lr: Annotated[
        float | None, typer.Option(help="AdamW learning rate, constant (default 3e-4 resnet50, 1e-3 clip-probe)")
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(min=16, help="resnet50 input side (default 256, as FaceCaption-15M's)")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="use only the first N images of each split")] = None,
    target_precision: Annotated[
        float,
        typer.Option(
            help="each attribute's threshold: the lowest whose precision on val reaches this (0.5 when "
            "val has no positives or no negatives; best balanced accuracy when it is never reached)"
        ),
    ] = 0.85,
    seed: Annotated[int, typer.Option(help="shuffling, flips and initialisation")] = 0,
    init: Annotated[
        Path | None,
        typer.Option(help="resnet50: torchvision ImageNet weights file to start from (facecap downloads none)"),
    ] = None,
    clip_model: Annotated[str, typer.Option(help="clip-probe: open_clip model name")] = "ViT-B-32",
    clip_pretrained: Annotated[
        str | None, typer.Option(help="clip-probe: open_clip pretrained tag (files in its cache) or weights file")
    ] = None,
    clip_random_weights: Annotated[
        bool, typer.Option("--clip-random-weights", help="clip-probe, tests only: a randomly initialised encoder")
    ] = False,
    workers: Annotated[int, typer.Option(min=0, help="image-decoding processes (0: in this process)")] = 0,
    device: Annotated[str, typer.Option(help="auto (CUDA when there is one), cpu, cuda, cuda:1, ...")] = "auto",
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="replace a training run with other settings in OUT (only the files it wrote)"),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or tables (for scripts)")] = False,
) -> None:
    """Train a CelebA-40 attribute classifier for the tag stage's celeba backend: fit on CelebA's
    train split, per-attribute thresholds on val, accuracy and balanced accuracy on test, export
    ONNX and a model card."""
    from facecap.stages.tag.train import Reporter, TrainSettings, no_bar
    from facecap.stages.tag.train import train as run_training

    settings = TrainSettings(
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        image_size=image_size,
        limit=limit,
        seed=seed,
        target_precision=target_precision,
        init=absolute(str(init)) if init else None,
        clip_model=clip_model,
        clip_pretrained=clip_pretrained,
        clip_random_weights=clip_random_weights,
        workers=workers,
        device=device,
    )
    console = Console(stderr=True, soft_wrap=True)
    out = Console(soft_wrap=True)
    report = Reporter(bar=no_bar if quiet else _bar(console), line=(lambda _: None) if quiet else console.print)
    result = run_training(Path(data), Path(output), settings, report, overwrite=overwrite)
    if not quiet:
        out.print(metrics_table(result.card))
    card = result.card
    out.print(
        f"tag train: {settings.model}, {settings.epochs} epochs, test mean accuracy "
        f"{card['metrics']['mean_accuracy']:.3f}, balanced {card['metrics']['mean_balanced_accuracy']:.3f} -> "
        f"{result.output / card['onnx']['file']}",
        highlight=False,
    )


def _bar(console: Console):
    @contextmanager
    def bar(label: str, total: int):
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console, transient=True) as progress:
            task = progress.add_task(label, total=total)

            class Advance:
                def advance(self, n: int) -> None:
                    progress.advance(task, n)

            yield Advance()

    return bar


def metrics_table(card: dict) -> Table:
    """The model card's test metrics: one row per attribute."""
    metrics = card["metrics"]
    table = Table(title=f"{card['architecture']}: test split ({metrics['images']} images)", title_justify="left")
    for column in ("attribute", "positives", "threshold", "accuracy", "balanced acc.", "threshold from"):
        left = column in ("attribute", "threshold from")
        table.add_column(column, justify="left" if left else "right", no_wrap=column == "attribute")
    for attribute, row in metrics["attributes"].items():
        table.add_row(
            attribute,
            f"{row['positives']}/{row['positives'] + row['negatives']}",
            f"{card['thresholds'][attribute]:.3f}",
            f"{row['accuracy']:.3f}",
            _number(row["balanced_accuracy"]),
            card["threshold_sources"][attribute],
        )
    table.add_row(
        "mean", "", "", f"{metrics['mean_accuracy']:.3f}", _number(metrics["mean_balanced_accuracy"]), "", style="bold"
    )
    return table


def _number(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


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
            "facecap tag train celeba/ models/celeba-r50 --epochs 10 (train a CelebA-40 classifier for "
            "the celeba backend: `facecap tag train --help`)",
        ),
        subcommands=((train, TRAIN_EXAMPLES),),
    ),
)
