"""`facecap filter --explain`: what each rule of a finished quality dataset rejects, and what other
thresholds would reject, computed from the stored measures (no model runs again)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from facecap.stages.quality.cascade import BY_COST, COSTS
from facecap.stages.quality.rules import Rule, evaluate, ranking_cutoff, threshold_of

FACTORS = (0.5, 0.75, 1.25, 1.5)


@dataclass
class RuleEffect:
    name: str
    condition: str
    alone: int  # rows this rule rejects and no other rule does
    failing: int  # rows that fail it at all
    alternatives: list[tuple[str, int]] = field(default_factory=list)  # (condition, rows failing)
    unmeasured: int = 0  # rows the cascade did not measure for it (their status was already settled)


@dataclass
class MeasureCost:
    name: str
    per: str  # "face", "image", or "" for decoding
    measured: int  # rows that got it
    skipped: int  # rows the cascade skipped
    items: int  # faces or images it ran on
    images: int  # images judged
    seconds: float

    @property
    def ms_per_item(self) -> float | None:
        return 1000 * self.seconds / self.items if self.items else None

    @property
    def ms_per_image(self) -> float | None:
        return 1000 * self.seconds / self.images if self.images else None


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
        effect.unmeasured = _unmeasured(rule, judged)
        effects.append(effect)
    return len(judged), effects


def _skipped(judged: pd.DataFrame) -> list[set[str]]:
    column = judged["quality_skipped"] if "quality_skipped" in judged.columns else [None] * len(judged)
    return [set() if names is None else set(names) for names in column]


def _unmeasured(rule: Rule, judged: pd.DataFrame) -> int:
    """Rows for which a measure the rule reads was skipped by the cascade."""
    reads = {m.name for m in BY_COST if set(m.columns) & rule.columns()}
    return sum(bool(names & reads) for names in _skipped(judged))


def costs(rows: pd.DataFrame) -> list[MeasureCost]:
    """What each measure (and decoding) cost over the judged rows, from ``quality_ms``."""
    judged = measured_rows(rows).reset_index(drop=True)
    if "quality_ms" not in judged.columns:
        return []
    timed = pd.DataFrame([ms if isinstance(ms, dict) else {} for ms in judged["quality_ms"]], columns=list(COSTS))
    skipped = _skipped(judged)
    per = {m.name: "image" if m.per_image else "face" for m in BY_COST}
    images = judged["image_key"].nunique() if "image_key" in judged.columns else len(judged)
    result = []
    for name in COSTS:
        taken = timed[name].notna().to_numpy()
        if name in per and per[name] == "image" and "image_key" in judged.columns:
            items = judged.loc[taken, "image_key"].nunique()
        else:
            items = int(taken.sum())
        result.append(
            MeasureCost(
                name=name,
                per=per.get(name, ""),
                measured=int(taken.sum()),
                skipped=sum(name in names for names in skipped),
                items=int(items),
                images=int(images),
                seconds=float(timed[name].sum(skipna=True)) / 1000,
            )
        )
    return result


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
