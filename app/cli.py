"""The ``facecap`` command line: the root that every command hangs from.

Stage commands are not written here: each stage folder declares its flags (``stages/<name>/cli.py``)
and ``app.commands`` builds the command from them. What is here is what no stage owns: running a
recipe, the funnel (``stats``), the report and the model registry.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
import pkgutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, ClassVar

import click
import typer
import typer.main
from rich.console import Console
from rich.table import Table
from typer.core import TyperCommand

from facecap import __version__
from facecap.commands import RUNNER_OPTIONS, build_stage_command, command_help, runner_overrides
from facecap.pipeline.chain import Step, plan_chain, skip_stage
from facecap.pipeline.config import RecipeBase, load_recipe, parse_set_options
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import FacecapError, storage_full
from facecap.pipeline.options import StageCommand
from facecap.pipeline.progress import Bars, Quiet
from facecap.pipeline.redact import redact, redact_text
from facecap.pipeline.registry import discover, plugin_modules
from facecap.pipeline.runner import StageResult, run_stage
from facecap.pipeline.stage import Stage
from facecap.pipeline.storage import Storage, absolute
from facecap.pipeline.worker import StageJob
from facecap.stages import STAGES_PACKAGE

EXIT_OK, EXIT_FAILED_SHARDS, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
RECIPES_PACKAGE = "facecap.configs"
REGISTRY: dict[str, type[Stage]] = discover(STAGES_PACKAGE)

app = typer.Typer(
    name="facecap",
    help=(
        "Build face image-text training corpora from raw image URLs.\n\n"
        "Each stage reads a dataset folder (Parquet + WebDataset shards) and writes the next one; "
        "rerunning a command resumes where it stopped. Start with `facecap run --config demo "
        "--output work/` or one stage at a time: `facecap ingest urls.parquet work/ingest`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


class RedactingConsole(Console):
    """A console that prints no credential: every text it is given goes through ``redact_text``
    (a URL's user-info and secret parameters, as in ``--set caption.openai.base_url=http://user:key@...``)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        super().print(*(redact_text(o) if isinstance(o, str) else o for o in objects), **kwargs)


out_console = RedactingConsole(soft_wrap=True)  # summary lines stay whole for grep and scripts
err_console = RedactingConsole(stderr=True, soft_wrap=True)

ConfigOpt, SetOpt, RayOpt, ExecutorOpt, RetriesOpt, OverwriteOpt, QuietOpt = (a for _, a, _ in RUNNER_OPTIONS)


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
    return load_recipe(config, REGISTRY, overrides, packaged=RECIPES_PACKAGE)


def choose_executor(recipe: RecipeBase, job: StageJob) -> tuple[str, str | None]:
    """The executor a stage runs on, and why when ``auto`` chose it (for the run's output)."""
    chosen = recipe.runner.executor
    if chosen != "auto":
        return chosen, None
    if recipe.ray.address or os.environ.get("RAY_ADDRESS"):
        return "ray", None  # a cluster was named: use it
    if job.resources.gpus > 0:
        return "ray", f"Ray, which schedules its {job.resources.gpus:g} GPU per worker"
    if job.spec.own_processes:
        return "ray", "Ray actors, since its engine starts processes of its own"
    # One machine, CPU work: Ray's start-up (5-11 s) and its own processes buy nothing here.
    from facecap.pipeline.executors import process_pool_plan

    plan = process_pool_plan(job.resources, recipe.ray, recipe.runner.workers)
    return "processes", f"a process pool on this machine, {plan.describe()} (no cluster named; --executor ray for Ray)"


def _make_executor(recipe: RecipeBase, name: str):
    from facecap.pipeline.executors import make_executor

    return make_executor(name, recipe.ray, recipe.runner.workers, recipe.runner.max_in_flight)


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
        output=absolute(output),
        parent=absolute(parent),
        storage=options,
        revisit=retry_failed,
    )
    source = stage_cls.open_source(config, options) if stage_cls.source else None
    progress = Quiet() if quiet else Bars(stage_cls.name, err_console)
    executor, why = choose_executor(recipe, job)
    if why and not quiet:
        err_console.print(f"{stage_cls.name}: runs on {why}", highlight=False)
    result = run_stage(
        job,
        _make_executor(recipe, executor),
        runner=recipe.runner,
        progress=progress,
        source=source,
        overwrite=overwrite,
        recipe=recipe.model_dump(mode="json"),
    )
    if not quiet:
        _print_result(result)
    return result


def _print_result(result: StageResult) -> None:
    for note in result.notes:
        err_console.print(f"[yellow]{result.stage}: note:[/yellow] {note}", highlight=False)
    if result.nothing_to_do:
        out_console.print(f"{result.stage}: all {result.shards} shards already done in {result.output}; nothing to do")
        return
    summary = Dataset.at(result.output).summary()
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


def _run_stage_command(
    stage_cls: type[Stage],
    parent: str | None,
    output: str,
    options: dict[str, Any],
    overrides: dict[str, Any],
    retry_failed: bool = False,
) -> None:
    """What every stage command does: build the recipe, run the stage, exit with its outcome."""
    recipe = _recipe(options["config"], options["set_"], overrides)
    result = _run_one(recipe, stage_cls, parent, output, options["overwrite"], options["quiet"], retry_failed)
    _exit_for([result])


def _exit_for(results: list[StageResult]) -> None:
    failed = sum(len(r.failed) for r in results)
    if failed:
        err_console.print(
            f"[red]facecap: {failed} shard(s) failed[/red]; the rest completed. Rerun the same command to retry them.",
            highlight=False,
        )
        raise typer.Exit(EXIT_FAILED_SHARDS)


def _add_stage_commands() -> None:
    """The commands every stage folder declares (built from its options), then plain ones (export)
    and groups of them (``facecap optout add``).

    A registered stage that declares no command still gets one: ``facecap NAME IN OUT``.
    """
    modules = _command_modules()
    specs = [spec for module in modules for spec in getattr(module, "COMMANDS", ())]
    declared = {spec.stage for spec in specs}
    specs += [StageCommand(stage=name) for name in REGISTRY if name not in declared]
    for spec in sorted(specs, key=lambda spec: list(REGISTRY).index(spec.stage)):  # pipeline order
        _add_stage_command(spec)
    for module in modules:
        for function, epilog in getattr(module, "EXTRA_COMMANDS", ()):
            app.command(epilog=epilog)(friendly(function))
        for name, text, commands in getattr(module, "EXTRA_GROUPS", ()):
            group = typer.Typer(help=text, no_args_is_help=True)
            for command, function, epilog in commands:
                group.command(command, epilog=epilog)(friendly(function))
            app.add_typer(group, name=name)


def _show(renderable: Any) -> None:
    out_console.print(renderable, highlight=False)


def _add_stage_command(spec: StageCommand) -> None:
    stage_cls = REGISTRY[spec.stage]
    command = friendly(build_stage_command(spec, stage_cls, _run_stage_command, _show, _recipe))
    text, epilog = command_help(spec, stage_cls)
    cls = None
    if spec.subcommands:
        subcommands = {}
        for function, sub_epilog in spec.subcommands:
            single = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode="markdown")
            single.command(epilog=sub_epilog)(friendly(function))
            sub = typer.main.get_command(single)
            subcommands[sub.name] = sub
            first = (sub.help or "").split("\n\n")[0].replace("\n", " ")
            text += f"\n\n`facecap {spec.command} {sub.name} ...`: {first} (`facecap {spec.command} {sub.name} --help`)"
        cls = type(f"{spec.command.title()}Command", (WithSubcommands,), {"subcommands": subcommands})
    for name in (spec.command, *spec.aliases):
        app.command(name=name, help=text, epilog=epilog, hidden=name in spec.aliases, cls=cls)(command)


class WithSubcommands(TyperCommand):
    """A stage command with commands under it: ``facecap tag train DATA OUT`` runs ``train``, any
    other first argument runs the stage (``facecap tag IN OUT``), so the stage command is unchanged."""

    subcommands: ClassVar[dict[str, click.Command]] = {}

    @property
    def commands(self) -> dict[str, click.Command]:
        """The commands under this one (what tools that walk the command tree look for)."""
        return self.subcommands

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] in self.subcommands:
            ctx.meta["facecap.subcommand"] = (args[0], args[1:])
            return []
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context) -> Any:
        chosen = ctx.meta.pop("facecap.subcommand", None)
        if chosen is None:
            return super().invoke(ctx)
        name, rest = chosen
        command = self.subcommands[name]
        # No parent context: the usage line is `facecap tag train ...`, without the stage's IN OUT.
        with command.make_context(f"{ctx.command_path} {name}", rest) as sub:
            return command.invoke(sub)


def _command_modules() -> list[ModuleType]:
    """The ``cli`` module of every stage folder, then those of the plugin packages."""
    package = importlib.import_module(STAGES_PACKAGE)
    names = [f"{STAGES_PACKAGE}.{info.name}.cli" for info in pkgutil.iter_modules(package.__path__) if info.ispkg]
    names += [f"{plugin}.cli" for plugin in plugin_modules()]  # a plugin package laid out like a folder
    return [importlib.import_module(name) for name in names if _exists(name)]


def _exists(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a plugin that is a plain module has no sub-modules
        return False


_add_stage_commands()


RUN_EXAMPLES = """Examples:

* `facecap run -c configs/default.yaml -i 'laion-face/*.parquet' -o work/`
* `facecap run -c configs/default.yaml -o work/ --dry-run` (the plan and each stage's state)
* `facecap run -c configs/default.yaml -o work/ --from download --to detect`
* `facecap run -c configs/default.yaml -o s3://bucket/work --ray-address HEAD:6379`
"""


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
    from facecap.report import write_report

    skipped: list[str] = []
    path = write_report(absolute(directory) or directory, str(out), skipped=skipped)
    if not quiet:
        for name in skipped:
            out_console.print(f"report: skipped {name}: not a stage dataset", highlight=False)
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
    no_fuse: Annotated[
        bool,
        typer.Option(
            "--no-fuse",
            help="run every stage on its own, each reading the previous stage's folder "
            "(default: consecutive per-shard stages run in one task per shard; recipe: runner.fuse)",
        ),
    ] = False,
) -> None:
    recipe = _recipe(
        config,
        set_,
        {
            **{f"{name}.input": [input] for name, cls in REGISTRY.items() if cls.source and input},
            **runner_overrides({"ray_address": ray_address, "executor": executor, "max_retries": max_retries}),
            **({"runner.fuse": False} if no_fuse else {}),
        },
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
    index = 0
    while index < len(steps):
        step = steps[index]
        if _skipped(recipe, step):
            skip_stage(steps, index)
            if not quiet:
                out_console.print(f"{step.stage.name}: skipped, {step.input} already has its media", highlight=False)
            index += 1
            continue
        group = _fusable_run(recipe, steps, index)
        if len(group) > 1:
            results += _run_fused(recipe, group, overwrite, quiet)
        else:
            results.append(_run_one(recipe, step.stage, step.input, step.output, overwrite, quiet))
        index += len(group)
    if not quiet:
        out_console.print(f"done: {len(steps)} stage(s); see `facecap stats {work}`", highlight=False)
    _exit_for(results)


def _step_job(recipe: RecipeBase, step: Step, retry_failed: bool = False) -> StageJob:
    return StageJob(
        stage_cls=step.stage,
        config=getattr(recipe, step.stage.name),
        output=absolute(step.output),
        parent=absolute(step.input),
        storage=recipe.storage.options(),
        revisit=retry_failed,
    )


def _fusable_run(recipe: RecipeBase, steps: list[Step], start: int) -> list[Step]:
    """The steps from ``start`` that run fused in one task per shard (just ``steps[start]`` when
    none can follow it): per-shard stages on the same executor with the same GPU share. A stage
    that may be skipped for its parent's media ends the run of steps: that is known only once its
    parent has run."""
    from facecap.pipeline.fused import can_follow, why_not_fused

    first = steps[start]
    if not recipe.runner.fuse or why_not_fused(_step_job(recipe, first).spec, first.stage.source):
        return [first]
    group = [first]
    for step in steps[start + 1 :]:
        previous, job = _step_job(recipe, group[-1]), _step_job(recipe, step)
        if (
            step.stage.skip_if_parent_has
            or why_not_fused(job.spec, step.stage.source)
            or not can_follow(previous.spec, job.spec)
            or choose_executor(recipe, job)[0] != choose_executor(recipe, previous)[0]
        ):
            break
        group.append(step)
    return group


def _run_fused(recipe: RecipeBase, group: list[Step], overwrite: bool, quiet: bool) -> list[StageResult]:
    """Run consecutive per-shard stages in one task per shard; each still fills its own folder."""
    from facecap.pipeline.fused import FusedJob, run_fused

    jobs = [_step_job(recipe, step) for step in group]
    fused = FusedJob(jobs)
    executor, why = choose_executor(recipe, jobs[0])
    if not quiet:
        err_console.print(
            f"{fused.name}: fused, one task per shard (rows and media passed in memory; --no-fuse: one by one)",
            highlight=False,
        )
        if why:
            err_console.print(f"{fused.name}: runs on {why}", highlight=False)
    results = run_fused(
        jobs,
        _make_executor(recipe, executor),
        runner=recipe.runner,
        progress=Quiet() if quiet else Bars(fused.name, err_console),
        overwrite=overwrite,
        recipe=recipe.model_dump(mode="json"),
    )
    if not quiet:
        for result in results:
            _print_result(result)
    return results


def _skipped(recipe: RecipeBase, step: Step) -> bool:
    """A stage whose media its parent already holds (download after an img2dataset ingest)."""
    if not step.stage.skip_if_parent_has or step.input is None:
        return False
    manifest = Dataset.at(step.input, recipe.storage.options()).manifest()
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
        res = step.stage.spec(getattr(recipe, step.stage.name)).resources
        kind = "actors" if res.actor else "tasks"
        reads = step.input or ", ".join(getattr(recipe, step.stage.name).input) or "(input)"
        manifest = Dataset.at(step.output, recipe.storage.options()).manifest()
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
        root = redact_text(storage.root)
        payload = (
            summaries[0]
            if len(summaries) == 1 and summaries[0]["dataset"] == root
            else {"run": root, "stages": summaries}
        )
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    for summary in summaries:
        _print_summary(summary)


def _summaries(storage: Storage) -> list[dict[str, Any]]:
    """The funnel of a dataset or of each stage of a run folder, redacted for printing."""
    dataset = Dataset(storage)
    manifest, why_not = dataset.stage_manifest()
    if manifest is not None:
        return [redact(dataset.summary())]
    if why_not != "no _manifest.json":
        raise FacecapError(f"{storage.root}: {why_not}, not a stage dataset")
    found = []
    for name in REGISTRY:  # a run folder: one dataset per stage, in pipeline order
        child = Dataset.at(storage.uri(name), storage.options)
        manifest, why_not = child.stage_manifest()
        if manifest is not None:
            found.append(redact(child.summary()))
        elif why_not != "no _manifest.json":
            err_console.print(f"stats: skipped {storage.uri(name)}: {why_not}, not a stage dataset", highlight=False)
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
    from facecap.pipeline import models

    rows = []
    for spec in models.specs():
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
    from facecap.pipeline import models

    for name in names:
        path = models.pull(name)
        out_console.print(f"{name}: ok ({path})", highlight=False)


@models_app.command("verify", help="Check the sha256 of every model file present; exit 1 on a mismatch.")
@friendly
def models_verify() -> None:
    from facecap.pipeline import models

    bad = 0
    for spec in models.specs():
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
