"""The quality cascade: measures run in order of cost, and a row stops being measured once its
status is settled.

The status of a row is its first failing rule in the recipe's order, whatever is measured. A rule
can be judged once every measure it reads exists, so after each measure the cascade judges the
rules that just became judgeable and remembers, per row, the earliest rule (in recipe order) it
fails. A later measure is then skipped for a row when every rule that reads it comes after that
rule: nothing it could show would change the status. Measures no rule reads are skipped for every
row that has failed a rule. So with the cascade on or off, every row gets the same status and the
same rows end ``ok``; what differs is that ``quality_failed`` can only list rules whose measures
were taken, and the skipped measures are null (named in ``quality_skipped``).

Two things are never skipped: a column a ranking rule reads (its cut-off is taken over every
row), and anything while the cascade is off (``quality.cascade: false``, ``--no-cascade``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from facecap.stages.quality.rules import Rule, evaluate


@dataclass(frozen=True)
class Measure:
    name: str  # the config switch that turns it on (``row`` is always on), and its cost's name
    columns: tuple[str, ...]
    per_image: bool  # computed once per image and shared by its faces


# Cheapest first, by the milliseconds an item of `make bench-quality` (docs/quality.md): a face's
# row arithmetic and landmarks, then the 112 px crop (decoded once for both), then the whole image
# (decoded once for all four), then the models.
BY_COST = (
    Measure(
        "row",
        (
            "q_face_side",
            "q_image_side",
            "q_relative_area",
            "q_aspect",
            "q_faces_in_image",
            "q_is_largest",
            "q_max_overlap",
        ),
        False,
    ),
    Measure("pose", ("q_yaw", "q_pitch", "q_roll", "q_frontalness"), False),
    Measure("sharpness", ("q_sharpness", "q_gradient"), False),
    Measure("exposure", ("q_brightness", "q_dark_fraction", "q_bright_fraction", "q_contrast"), False),
    Measure("colour", ("q_channel_std", "q_grayscale"), True),
    Measure("cartoon", ("q_cartoon",), False),
    Measure("brisque", ("q_brisque",), False),
    Measure("nsfw", ("q_nsfw",), True),
    Measure("text", ("q_text_fraction",), True),
    Measure("clip_iqa", ("q_clip_iqa",), False),
)
MEASURED = {column for measure in BY_COST for column in measure.columns}
# What quality_ms times besides the measures: decoding the stored crop and image.
COSTS = ("decode", *(measure.name for measure in BY_COST))


class Cascade:
    """Which rows of one batch still need each measure, as the measures come in."""

    def __init__(self, rules: list[Rule], rows: int, on: bool = True):
        self.on = on
        self.plain = [(index, rule) for index, rule in enumerate(rules) if not rule.ranking]
        self.ranked = {column for rule in rules if rule.ranking for column in rule.columns()}
        self.judged: set[int] = set()
        self.available: set[str] = set()
        self.first_failed = np.full(rows, np.inf)  # recipe index of the earliest rule each row fails
        self.skipped: list[list[str]] = [[] for _ in range(rows)]

    def needs(self, measure: Measure) -> np.ndarray:
        """True for the rows that must get ``measure``."""
        everyone = np.ones(len(self.first_failed), bool)
        if not self.on or set(measure.columns) & self.ranked:
            return everyone
        readers = [index for index, rule in self.plain if rule.columns() & set(measure.columns)]
        earliest = min(readers, default=np.inf)
        # Unsettled rows, and rows whose earliest failure comes after a rule that reads this measure.
        return np.isinf(self.first_failed) | (self.first_failed > earliest)

    def measured(self, measure: Measure, needed: np.ndarray | None, frame: pd.DataFrame) -> None:
        """Record ``measure`` as taken for the ``needed`` rows (``None``: switched off, so null for
        all and skipped for none), then judge the rules that became judgeable.

        ``frame`` holds the rows with every measure so far (null where not taken)."""
        if needed is not None:
            for row in np.flatnonzero(~needed):
                self.skipped[row].append(measure.name)
        self.available.update(measure.columns)
        self.judge(frame)

    def judge(self, frame: pd.DataFrame) -> None:
        """Judge every rule not judged yet whose measures all exist (first: those on detect's columns)."""
        for index, rule in self.plain:
            if index in self.judged or any(c in MEASURED and c not in self.available for c in rule.columns()):
                continue
            self.judged.add(index)
            failed = ~evaluate(rule.expr or "True", frame)
            self.first_failed[failed] = np.minimum(self.first_failed[failed], index)
