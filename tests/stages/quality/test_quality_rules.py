"""The rule language: safe to parse, vectorised, and null measures never fail a row."""

from __future__ import annotations

import pandas as pd
import pytest
from pydantic import ValidationError

from facecap.stages.quality.explain import explain
from facecap.stages.quality.rules import Rule, RuleError, columns_of, evaluate, failing, ranking_cutoff, threshold_of

ROWS = pd.DataFrame(
    {
        "det_score": [0.99, 0.97, 0.995, None],
        "q_grayscale": [False, True, None, False],
        "q_text_fraction": [0.01, 0.2, 0.0, 0.5],
        "q_face_side": [300.0, 150.0, 90.0, 500.0],
    }
)


def test_comparisons_booleans_and_nulls():
    assert evaluate("det_score >= 0.98", ROWS).tolist() == [True, False, True, True]  # a null passes
    assert evaluate("not q_grayscale", ROWS).tolist() == [True, False, True, True]
    assert evaluate("q_text_fraction < 0.05 and det_score > 0.98", ROWS).tolist() == [True, False, True, False]
    assert evaluate("q_face_side / 2 >= 100", ROWS).tolist() == [True, False, False, True]
    assert evaluate("0.1 < q_text_fraction < 0.3", ROWS).tolist() == [False, True, False, False]
    assert evaluate("q_text_fraction > 0.3 or det_score < 0.98", ROWS).tolist() == [False, True, False, True]


@pytest.mark.parametrize(
    "expr", ["__import__('os').system('true')", "q_face_side.real > 1", "x[0] > 1", "'a' == q_face_side", "lambda: 1"]
)
def test_anything_but_plain_expressions_is_refused(expr):
    with pytest.raises((RuleError, ValidationError)):
        Rule(name="bad", expr=expr)


def test_rule_shapes_are_checked():
    with pytest.raises(ValidationError, match="either expr"):
        Rule(name="both", expr="det_score > 0", by="q_face_side", top_k=3)
    with pytest.raises(ValidationError, match="exactly one of"):
        Rule(name="ranking", by="q_face_side")
    assert columns_of("q_a > 1 and not q_b") == {"q_a", "q_b"}
    assert threshold_of(Rule(name="t", expr="q_sharpness >= 40")) == ("q_sharpness", ">=", 40.0)
    assert threshold_of(Rule(name="t", expr="not q_grayscale")) is None


def test_failing_lists_every_rule_in_order_and_ranking_needs_its_cutoff():
    rules = [
        Rule(name="score", expr="det_score >= 0.98"),
        Rule(name="text", expr="q_text_fraction < 0.05"),
        Rule(name="top", by="q_face_side", top_fraction=0.5),
    ]
    assert failing(rules, ROWS) == [[], ["score", "text"], [], ["text"]]  # no cut-off: ranking skipped
    cutoff = ranking_cutoff(ROWS["q_face_side"], rules[2])
    assert cutoff == 300.0
    assert failing(rules, ROWS, {"top": cutoff}) == [[], ["score", "text", "top"], ["top"], ["text"]]
    assert ranking_cutoff(ROWS["q_face_side"], Rule(name="k", by="q_face_side", top_k=1)) == 500.0


def test_explain_counts_alone_and_at_other_thresholds():
    rows = ROWS.assign(status=["ok", "quality:score", "ok", "quality:text"])
    rules = [Rule(name="score", expr="det_score >= 0.98"), Rule(name="text", expr="q_text_fraction < 0.05")]
    rows["quality_failed"] = failing(rules, rows)
    judged, effects = explain(rows, rules)
    assert judged == 4
    score, text = effects
    assert (score.failing, score.alone) == (1, 0)
    assert (text.failing, text.alone) == (2, 1)
    assert dict(text.alternatives)["q_text_fraction < 0.025"] == 2
    assert dict(text.alternatives)["q_text_fraction < 0.075"] == 2
    assert dict(score.alternatives)["det_score >= 0.49"] == 0
