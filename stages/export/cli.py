"""``facecap export``: a finished dataset's ok rows as training shards (a sink, not a stage)."""

from __future__ import annotations

from typing import Annotated, Literal

import typer

from facecap.pipeline.storage import absolute

EXAMPLES = """Examples:

* `facecap export work/dedup shards/ --format webdataset` (KEY.jpg square crop, KEY.txt caption, KEY.json metadata)
* `facecap export work/dedup shards/ --crop aligned --val-fraction 0.01 --split-by identity --seed 7`
* `facecap export work/dedup facecaption/ --format parquet` (_id, url, caption, laion_caption, box + ours)
* `facecap export work/dedup shards/ --opt-out-embeddings optout.json` (leave out the faces of people on the list)
* `facecap export s3://bucket/work/dedup s3://bucket/shards/ --ray-address auto` (the passes on a Ray cluster)

The passes (count each input shard, permute each split with the seed, scatter each input shard
into buckets of whole output shards, write each bucket's shards) run on the process pool of this
machine, or on Ray with --ray-address; a rerun resumes.
"""


def export(
    directory: Annotated[str, typer.Argument(help="the last stage's dataset (e.g. work/dedup)")],
    output: Annotated[str, typer.Argument(help="folder for the shards (local or s3://)")],
    format: Annotated[Literal["webdataset", "parquet"], typer.Option(help="shard format")] = "webdataset",
    crop: Annotated[
        Literal["square", "aligned", "box", "aligned112"],
        typer.Option(help="the image of each sample: square (1.5x, 512), aligned (512), box"),
    ] = "square",
    caption: Annotated[Literal["first", "short"], typer.Option(help="first (of the caption list) or short")] = "first",
    shard_samples: Annotated[
        int, typer.Option(help="samples in a shard (the last of a split holds the rest)")
    ] = 10_000,
    shard_bytes: Annotated[
        int | None, typer.Option(help="aim for shards of about this many bytes (by the samples' measured sizes)")
    ] = None,
    seed: Annotated[int, typer.Option(help="global shuffle seed")] = 0,
    val_fraction: Annotated[float, typer.Option(help="share of samples in a validation split")] = 0.0,
    split_by: Annotated[
        Literal["key", "identity"], typer.Option(help="key (stable hash) or identity (no identity in both)")
    ] = "key",
    opt_out_embeddings: Annotated[
        str | None,
        typer.Option(help="an opt-out list file (facecap optout add): its people's faces are not exported"),
    ] = None,
    executor: Annotated[
        Literal["auto", "ray", "processes", "local"],
        typer.Option(help="'auto' (Ray with --ray-address, else a process pool here), 'ray', 'processes', 'local'"),
    ] = "auto",
    ray_address: Annotated[
        str | None, typer.Option("--ray-address", envvar="RAY_ADDRESS", help="join this Ray cluster")
    ] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="processes of the 'processes' executor")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or tables (for scripts)")] = False,
) -> None:
    """Export the ok rows of a finished dataset for training: WebDataset shards with a wids index, or
    FaceCaption v2-compatible Parquet."""
    from facecap.pipeline.config import RayConfig
    from facecap.pipeline.executors import make_executor
    from facecap.pipeline.progress import Bars, Quiet
    from facecap.stages.export.export import ExportSettings
    from facecap.stages.export.export import export as run_export

    settings = ExportSettings(
        format=format,
        crop=crop,
        caption=caption,
        shard_samples=shard_samples,
        shard_bytes=shard_bytes,
        seed=seed,
        val_fraction=val_fraction,
        split_by=split_by,
    )
    opt_out = absolute(opt_out_embeddings) if opt_out_embeddings else None
    runner = make_executor(executor, RayConfig(address=ray_address), workers)
    progress = Quiet() if quiet else Bars("export")
    result = run_export(
        absolute(directory), absolute(output), settings, opt_out=opt_out, executor=runner, progress=progress
    )
    if not quiet:
        if opt_out:
            typer.echo(f"export: {result.opted_out:,} face(s) of people on the opt-out list left out")
        for split, count in result.samples.items():
            shards = len(result.shards[split])
            typer.echo(f"export: {split}: {count:,} samples in {shards} shard(s) -> {result.output}")


# Commands that are not a stage run: (function, epilog).
EXTRA_COMMANDS = ((export, EXAMPLES),)
