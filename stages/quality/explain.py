"""`facecap filter --explain`: what each rule of a finished quality dataset rejects, and what other
thresholds would reject, computed from the stored measures (no model runs again)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from facecap.stages.quality.rules import Rule, evaluate, ranking_cutoff, threshold_of

FACTORS = (0.5, 0.75, 1.25, 1.5)


@dataclass
class RuleEffect:
    name: str
    condition: str
    alone: int  # rows this rule rejects and no other rule does
    failing: int  # rows that fail it at all
    alternatives: list[tuple[str, int]] = field(default_factory=list)  # (condition, rows failing)


def measured_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows the quality stage judged (ok or quality:*), not those rejected earlier."""
    status = rows["status"].astype(str)
    return rows[(status == "ok") | status.str.startswith("quality:")]


def explain(rows: pd.DataFrame, rules: list[Rule]) -> tuple[int, list[RuleEffect]]:
    """(rows judged, the effect of each rule) for a quality dataset's rows and its rules."""
    judged = measured_rows(rows).reset_index(drop=True)
    failed = [list(names) if names is not None else [] for names in judged.get("quality_failed", [])]
    effects = []
    for rule in rules:
        failing_rows = sum(rule.name in names for names in failed)
        alone = sum(names == [rule.name] for names in failed)
        effect = RuleEffect(rule.name, _condition(rule), alone, failing_rows)
        effect.alternatives = _alternatives(rule, judged)
        effects.append(effect)
    return len(judged), effects


def _condition(rule: Rule) -> str:
    if rule.ranking:
        share = f"top {rule.top_fraction:.0%}" if rule.top_fraction is not None else f"top {rule.top_k:,}"
        return f"{share} by {rule.by}"
    return rule.expr or ""


def _alternatives(rule: Rule, judged: pd.DataFrame) -> list[tuple[str, int]]:
    if not len(judged):
        return []
    if rule.ranking:
        results = []
        for fraction in (0.25, 0.5, 0.75, 0.9):
            other = rule.model_copy(update={"top_fraction": fraction, "top_k": None})
            cutoff = ranking_cutoff(judged[rule.by], other)
            values = pd.to_numeric(judged[rule.by], errors="coerce")
            results.append((f"top {fraction:.0%} by {rule.by}", int((values < cutoff).sum())))
        return results
    threshold = threshold_of(rule)
    if threshold is None or threshold[0] not in judged.columns:
        return []
    column, symbol, value = threshold
    results = []
    for factor in FACTORS:
        candidate = round(value * factor, 6)
        condition = f"{column} {symbol} {candidate:g}"
        results.append((condition, int((~evaluate(condition, judged)).sum())))
    return results
