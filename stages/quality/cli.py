"""``facecap quality`` (alias ``filter``): its flags, and ``--explain`` on a finished quality dataset."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from rich.table import Table

from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.options import Flag, Invocation, StageCommand, Switch
from facecap.stages.quality.explain import MeasureCost, RuleEffect, costs, explain
from facecap.stages.quality.stage import QualityConfig


def explain_rules(call: Invocation) -> bool:
    """``--explain DIR``: each rule's effect on a finished quality dataset, and at other thresholds."""
    if not call.switches.get("explain"):
        return False
    directory, plot = call.input, call.switches.get("plot")
    dataset = Dataset.at(directory)
    manifest = dataset.require_manifest()
    if manifest.stage != "quality":
        raise FacecapError(f"{directory} is a '{manifest.stage}' dataset; --explain reads facecap quality's output")
    rules = QualityConfig.model_validate(manifest.config).rules
    tables = [dataset.read_shard(i) for i in dataset.done_shards()]
    if not tables:
        raise FacecapError(f"{directory} has no finished shards yet")
    rows = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    judged, effects = explain(rows, rules)
    table = Table(title=f"quality rules of {directory}: {judged:,} face rows judged")
    columns = (
        "rule",
        "keeps rows where",
        "rejects alone",
        "fails",
        "not measured (cascade)",
        "at other thresholds: fails",
    )
    for column in columns:
        table.add_column(column, overflow="fold")
    for effect in effects:
        others = "\n".join(f"{condition}: {count:,}" for condition, count in effect.alternatives) or "-"
        table.add_row(
            effect.name, effect.condition, f"{effect.alone:,}", f"{effect.failing:,}", f"{effect.unmeasured:,}", others
        )
    call.print(table)
    if any(effect.unmeasured for effect in effects):
        call.print(
            "the cascade (quality.cascade) skipped measures for rows whose status an earlier rule had settled: "
            "statuses are as if everything were measured, but 'fails' and the other thresholds count only "
            "measured rows; rerun with --no-cascade to measure every row"
        )
    call.print(cost_table(costs(rows), directory))
    if plot is not None:
        plot_rules(effects, judged, plot)
        call.print(f"chart: {plot}")
    return True


def cost_table(measured: list[MeasureCost], directory: str) -> Table:
    """Each measure's cost as this dataset's run timed it (decoding apart), and what it skipped."""
    images = measured[0].images if measured else 0
    table = Table(title=f"measures of {directory}, cheapest first: cost over {images:,} images")
    for column in ("measure", "per", "rows measured", "rows skipped", "ms per item", "ms per image"):
        table.add_column(column)
    for cost in measured:
        per_item = "-" if cost.ms_per_item is None else f"{cost.ms_per_item:.2f}"
        per_image = "-" if cost.ms_per_image is None else f"{cost.ms_per_image:.2f}"
        name = "decode crop/image" if cost.name == "decode" else cost.name
        table.add_row(name, cost.per or "-", f"{cost.measured:,}", f"{cost.skipped:,}", per_item, per_image)
    return table


def plot_rules(effects: list[RuleEffect], judged: int, path: Path) -> None:
    """A bar chart of what each rule fails and what it rejects alone."""
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


COMMANDS = (
    StageCommand(
        stage="quality",
        aliases=("filter",),
        summary="IN: face rows (detect); OUT: the same rows with q_* measures, quality_failed and statuses "
        "quality:RULE. With --explain DIR: report on a finished quality dataset.",
        input_help="face dataset (detect), or with --explain a quality dataset",
        output_optional=True,
        switches=(
            Switch("--explain", bool, "explain the rules of the quality dataset IN", default=False),
            Switch("--plot", Path, "with --explain: also save a bar chart (PNG)"),
        ),
        flags=(Flag("cascade", help="measure cheapest first, skipping rows already settled (default on)"),),
        intercept=explain_rules,
        examples=(
            "facecap quality work/detect work/quality (measures + the recipe's rules; default: reject explicit images)",
            "facecap quality work/detect work/quality -c hq (FaceCaptionHQ-4M's filters)",
            "facecap quality --explain work/quality (what each rule rejects, and at other thresholds; no models run)",
            "facecap quality --explain work/quality --plot rules.png",
            "facecap quality work/detect work/quality --no-cascade (every measure on every row, for analysis)",
        ),
    ),
)
