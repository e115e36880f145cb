"""Quality rules: small, safe expressions over a row's columns, evaluated on whole frames.

A rule is ``{name, expr}`` (``det_score >= 0.98``, ``not q_grayscale``, ``q_nsfw < 0.2 and
q_text_fraction < 0.05``) or a ranking rule ``{name, by, top_fraction | top_k}`` that keeps the
best rows of the whole dataset. Expressions allow column names, numbers, True/False, the
comparisons, ``and``/``or``/``not``, ``+ - * /`` and parentheses; nothing else is accepted (they
are parsed with ``ast`` and walked, never ``eval``-ed). A row whose measure is missing (null) is
not failed by a rule on it: a rule can only reject what was measured.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

COMPARE = {
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
}
ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class RuleError(ValueError):
    pass


class Rule(BaseModel):
    """One keep-rule: rows for which it is false get ``quality:<name>``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$", description="becomes the status quality:<name>")
    expr: str | None = Field(None, description="kept when true, e.g. 'q_sharpness >= 40'")
    by: str | None = Field(None, description="ranking rules: the column to rank by (larger is better)")
    top_fraction: float | None = Field(None, gt=0, le=1, description="keep this share of rows, best first")
    top_k: int | None = Field(None, ge=1, description="keep this many rows, best first")

    @field_validator("expr")
    @classmethod
    def _parses(cls, expr: str | None) -> str | None:
        if expr is not None:
            columns_of(expr)  # raises RuleError with what is wrong
        return expr

    @model_validator(mode="after")
    def _one_kind(self) -> Rule:
        ranking = self.by is not None
        if ranking == (self.expr is not None):
            raise ValueError(f"rule {self.name}: give either expr, or by with top_fraction/top_k")
        if ranking and (self.top_fraction is None) == (self.top_k is None):
            raise ValueError(f"rule {self.name}: a ranking rule needs exactly one of top_fraction, top_k")
        return self

    @property
    def ranking(self) -> bool:
        return self.by is not None

    def columns(self) -> set[str]:
        return {self.by} if self.by else columns_of(self.expr or "")


def _parse(expr: str) -> ast.expr:
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as exc:
        raise RuleError(f"cannot parse rule '{expr}': {exc.msg}") from None
    for node in ast.walk(tree):
        allowed = (
            ast.Expression,
            ast.BoolOp,
            ast.And,
            ast.Or,
            ast.UnaryOp,
            ast.Not,
            ast.USub,
            ast.Compare,
            ast.BinOp,
            ast.Name,
            ast.Load,
            ast.Constant,
            *COMPARE,
            *ARITHMETIC,
        )
        if not isinstance(node, allowed):
            raise RuleError(f"rule '{expr}': {type(node).__name__} is not allowed (use columns, numbers, comparisons)")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, bool)):
            raise RuleError(f"rule '{expr}': only numbers and True/False may appear, not {node.value!r}")
    return tree.body


def columns_of(expr: str) -> set[str]:
    return {n.id for n in ast.walk(_parse(expr)) if isinstance(n, ast.Name) and n.id not in ("True", "False")}


@dataclass
class _Value:
    values: np.ndarray  # float or bool
    missing: np.ndarray  # bool: a null took part


def evaluate(expr: str, frame: pd.DataFrame) -> np.ndarray:
    """True where the row passes (missing measures pass), as a boolean array."""
    result = _eval(_parse(expr), frame)
    passed = result.values.astype(bool) if result.values.dtype == bool else result.values != 0
    return passed | result.missing


def _column(frame: pd.DataFrame, name: str) -> _Value:
    if name not in frame.columns:
        raise RuleError(f"rule refers to column '{name}', which the rows do not have")
    series = frame[name]
    missing = series.isna().to_numpy()
    if pd.api.types.is_bool_dtype(series) or series.dropna().map(lambda v: isinstance(v, (bool, np.bool_))).all():
        return _Value(series.fillna(False).astype(bool).to_numpy(), missing)
    return _Value(pd.to_numeric(series, errors="coerce").fillna(0.0).to_numpy(np.float64), missing)


def _eval(node: ast.expr, frame: pd.DataFrame) -> _Value:
    n = len(frame)
    if isinstance(node, ast.Constant):
        return _Value(np.full(n, node.value), np.zeros(n, bool))
    if isinstance(node, ast.Name):
        return _column(frame, node.id)
    if isinstance(node, ast.UnaryOp):
        inner = _eval(node.operand, frame)
        if isinstance(node.op, ast.Not):
            return _Value(~inner.values.astype(bool), inner.missing)
        return _Value(-inner.values, inner.missing)
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, frame), _eval(node.right, frame)
        with np.errstate(divide="ignore", invalid="ignore"):
            values = ARITHMETIC[type(node.op)](left.values.astype(float), right.values.astype(float))
        return _Value(values, left.missing | right.missing | ~np.isfinite(values))
    if isinstance(node, ast.BoolOp):
        parts = [_eval(v, frame) for v in node.values]
        # A missing part counts as passing, so it neither fails an 'and' nor decides an 'or'.
        if isinstance(node.op, ast.And):
            values = np.logical_and.reduce([p.values.astype(bool) | p.missing for p in parts])
        else:
            values = np.logical_or.reduce([p.values.astype(bool) & ~p.missing for p in parts])
            values |= np.logical_and.reduce([p.missing for p in parts])
        return _Value(values, np.zeros(n, bool))
    if isinstance(node, ast.Compare):
        left = _eval(node.left, frame)
        values = np.ones(n, bool)
        missing = left.missing.copy()
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _eval(right_node, frame)
            values &= COMPARE[type(op)](left.values, right.values)
            missing |= right.missing
            left = right
        return _Value(values, missing)
    raise RuleError(f"unsupported expression {ast.dump(node)}")


def ranking_cutoff(values: pd.Series, rule: Rule) -> float:
    """The smallest value a row needs to be among the rule's best rows (nulls rank last)."""
    present = values.dropna().sort_values(ascending=False)
    if present.empty:
        return float("inf")
    keep = rule.top_k if rule.top_k is not None else max(1, int(np.ceil(rule.top_fraction * len(values))))
    return float(present.iloc[min(keep, len(present)) - 1])


def failing(rules: list[Rule], frame: pd.DataFrame, cutoffs: dict[str, float] | None = None) -> list[list[str]]:
    """For each row, the names of the rules it fails, in rule order."""
    failed = [[] for _ in range(len(frame))]
    for rule in rules:
        if rule.ranking:
            cutoff = (cutoffs or {}).get(rule.name)
            if cutoff is None:
                continue  # only the global pass knows the cut-off
            values = pd.to_numeric(frame[rule.by], errors="coerce").to_numpy(np.float64)
            passed = ~(values < cutoff)  # NaN compares false: a row with no value is not failed
        else:
            passed = evaluate(rule.expr or "True", frame)
        for index in np.flatnonzero(~passed):
            failed[index].append(rule.name)
    return failed


def threshold_of(rule: Rule) -> tuple[str, str, float] | None:
    """(column, operator, number) for a plain threshold rule like 'q_sharpness >= 40', else None."""
    if rule.expr is None:
        return None
    node = _parse(rule.expr)
    if (
        isinstance(node, ast.Compare)
        and len(node.ops) == 1
        and isinstance(node.left, ast.Name)
        and isinstance(node.comparators[0], ast.Constant)
        and isinstance(node.comparators[0].value, (int, float))
        and not isinstance(node.comparators[0].value, bool)
    ):
        symbol = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}
        return node.left.id, symbol[type(node.ops[0])], float(node.comparators[0].value)
    return None
