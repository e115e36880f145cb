"""``facecap run``: the stages of a recipe, one after another, each in its own folder."""

from __future__ import annotations

from dataclasses import dataclass

from facecap.pipeline.config import RecipeBase
from facecap.pipeline.errors import ConfigError
from facecap.pipeline.stage import Stage
from facecap.pipeline.storage import join


@dataclass
class Step:
    stage: type[Stage]
    input: str | None  # parent dataset folder; None for the source stage
    output: str


def stage_folder(output: str, stage: str) -> str:
    return join(output, stage)


def plan_chain(
    recipe: RecipeBase,
    registry: dict[str, type[Stage]],
    output: str,
    start: str | None = None,
    stop: str | None = None,
) -> list[Step]:
    """The steps of ``recipe.stages`` from ``start`` to ``stop`` (inclusive), with their folders."""
    names = list(recipe.stages)
    for flag, name in (("--from", start), ("--to", stop)):
        if name is not None and name not in names:
            raise ConfigError(f"{flag} {name}: not a stage of this recipe (stages: {', '.join(names)})")
    first = names.index(start) if start else 0
    last = names.index(stop) if stop else len(names) - 1
    if first > last:
        raise ConfigError(f"--from {start} comes after --to {stop} in the recipe")
    steps = []
    for position in range(first, last + 1):
        cls = registry[names[position]]
        if not cls.source and position == 0:
            raise ConfigError(f"stage {cls.name} needs an earlier stage; put a source stage (ingest) first")
        parent = None if cls.source else stage_folder(output, names[position - 1])
        steps.append(Step(stage=cls, input=parent, output=stage_folder(output, cls.name)))
    return steps


def skip_stage(steps: list[Step], index: int) -> None:
    """Drop a skipped step: the next one reads what the skipped one would have read."""
    if index + 1 < len(steps):
        steps[index + 1].input = steps[index].input
