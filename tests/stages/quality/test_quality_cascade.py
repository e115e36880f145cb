"""The cascade's bookkeeping: which rows still need a measure, and that statuses never change."""

from __future__ import annotations

import numpy as np
import pandas as pd

from facecap.stages.quality.cascade import BY_COST, MEASURED, Cascade
from facecap.stages.quality.explain import costs, explain
from facecap.stages.quality.rules import Rule, failing

MEASURE = {m.name: m for m in BY_COST}


def run_cascade(rules: list[Rule], full: pd.DataFrame, on: bool = True) -> tuple[pd.DataFrame, Cascade]:
    """What the stage does, on given measure values: each measure taken only where needed."""
    frame = full.copy()
    for column in MEASURED & set(frame.columns):
        frame[column] = None
    cascade = Cascade(rules, len(frame), on=on)
    cascade.judge(frame)
    for measure in BY_COST:
        needed = cascade.needs(measure)
        for column in set(measure.columns) & set(frame.columns):
            frame[column] = [v if take else None for v, take in zip(full[column], needed, strict=True)]
        cascade.measured(measure, needed, frame)
    return frame, cascade


def statuses(rules: list[Rule], frame: pd.DataFrame) -> list[str]:
    return ["ok" if not names else f"quality:{names[0]}" for names in failing(rules, frame)]


ROWS = pd.DataFrame(
    {
        "det_score": [0.99, 0.99, 0.90, 0.99],
        "q_face_side": [300.0, 60.0, 300.0, 300.0],
        "q_grayscale": [False, False, False, True],
        "q_nsfw": [0.1, 0.9, 0.1, 0.1],
        "q_text_fraction": [0.0, 0.3, 0.3, 0.3],
        "q_brisque": [20.0, 20.0, 20.0, 20.0],
    }
)


def test_a_row_failing_a_rule_is_not_measured_for_later_rules_only():
    rules = [
        Rule(name="score", expr="det_score >= 0.98"),  # detect's column: judged before any measure
        Rule(name="side", expr="q_face_side >= 128"),
        Rule(name="nsfw", expr="q_nsfw < 0.5"),
        Rule(name="colour", expr="not q_grayscale"),
        Rule(name="text", expr="q_text_fraction < 0.05"),
    ]
    frame, cascade = run_cascade(rules, ROWS)
    assert statuses(rules, frame) == statuses(rules, ROWS) == ["ok", "quality:side", "quality:score", "quality:colour"]
    # Row 1 fails 'side': NSFW, colour, text and BRISQUE (no rule reads it) can no longer matter.
    assert frame.loc[1, ["q_nsfw", "q_grayscale", "q_text_fraction", "q_brisque"]].isna().all()
    assert {"nsfw", "colour", "text", "brisque"} <= set(cascade.skipped[1])
    # Row 3 fails 'colour' (rule 3), but 'nsfw' (rule 2) comes first in the recipe: NSFW was
    # already taken (it is cheaper than text), text is skipped.
    assert frame.loc[3, "q_nsfw"] == 0.1 and pd.isna(frame.loc[3, "q_text_fraction"])
    assert cascade.skipped[0] == [] and frame.loc[0].notna().all()  # the row that passes gets everything


def test_a_measure_an_earlier_rule_reads_is_taken_even_after_a_later_cheap_rule_fails():
    rules = [Rule(name="text", expr="q_text_fraction < 0.05"), Rule(name="side", expr="q_face_side >= 128")]
    frame, cascade = run_cascade(rules, ROWS)
    # Row 1 fails 'side' (cheap) but 'text' comes first and fails too: its status must be 'text'.
    assert frame.loc[1, "q_text_fraction"] == 0.3 and "text" not in cascade.skipped[1]
    assert statuses(rules, frame) == statuses(rules, ROWS) == ["ok", "quality:text", "quality:text", "quality:text"]
    assert pd.isna(frame.loc[1, "q_nsfw"])  # no rule reads it and the row is settled


def test_off_measures_everything_and_ranking_columns_are_always_measured():
    rules = [Rule(name="score", expr="det_score >= 0.98"), Rule(name="best", by="q_brisque", top_fraction=0.5)]
    frame, cascade = run_cascade(rules, ROWS)
    assert frame["q_brisque"].notna().all()  # the cut-off is taken over every row
    assert pd.isna(frame.loc[2, "q_nsfw"])  # row 2 fails 'score' before anything is measured
    frame, cascade = run_cascade(rules, ROWS, on=False)
    assert frame.equals(ROWS) and not any(cascade.skipped)


def test_statuses_are_the_same_with_the_cascade_on_random_rules_and_rows():
    rng = np.random.default_rng(7)
    columns = ["det_score", "q_face_side", "q_sharpness", "q_grayscale", "q_cartoon", "q_brisque", "q_nsfw"]
    columns += ["q_text_fraction"]
    full = pd.DataFrame({c: rng.random(300) for c in columns})
    full["q_grayscale"] = full["q_grayscale"] < 0.2
    full.loc[rng.random(300) < 0.1, "q_brisque"] = None  # a measure that could not be taken stays null
    numeric = [c for c in columns if c != "q_grayscale"]
    checked = skipped = 0
    for _ in range(200):
        rules = []
        for index in range(int(rng.integers(1, 6))):
            a, b = rng.choice(numeric, 2, replace=False)
            expr = str(rng.choice([f"{a} < 0.8", f"{a} >= 0.15", "not q_grayscale", f"{a} < 0.9 or {b} > 0.7"]))
            rules.append(Rule(name=f"r{index}", expr=expr))
        frame, cascade = run_cascade(rules, full)
        assert statuses(rules, frame) == statuses(rules, full), [r.expr for r in rules]
        checked += 1
        skipped += sum(map(len, cascade.skipped))
    assert checked == 200 and skipped > 1000  # the cascade did skip a lot, and never changed a status


def test_explain_counts_what_the_cascade_skipped_and_what_each_measure_cost():
    rules = [Rule(name="side", expr="q_face_side >= 128"), Rule(name="text", expr="q_text_fraction < 0.05")]
    frame, cascade = run_cascade(rules, ROWS)
    frame["status"] = statuses(rules, frame)
    frame["quality_failed"] = failing(rules, frame)
    frame["quality_skipped"] = cascade.skipped
    frame["image_key"] = ["a", "a", "b", "c"]
    frame["quality_ms"] = [
        {"row": 0.01, "text": 10.0, "decode": 2.0},
        {"row": 0.01},
        {"row": 0.01, "text": 30.0, "decode": 4.0},
        {"row": 0.01, "text": 20.0, "decode": 3.0},
    ]
    _, (side, text) = explain(frame, rules)
    assert (side.unmeasured, text.unmeasured) == (0, 1)  # row 1 failed 'side': no text detection
    assert text.failing == 2  # only measured rows can fail
    by_name = {cost.name: cost for cost in costs(frame)}
    text_cost = by_name["text"]
    assert (text_cost.measured, text_cost.skipped, text_cost.items, text_cost.images) == (3, 1, 3, 3)
    assert abs(text_cost.ms_per_image - 20.0) < 1e-9 and abs(by_name["decode"].ms_per_item - 3.0) < 1e-9
    assert by_name["brisque"].measured == 0 and by_name["brisque"].ms_per_item is None
