"""Per-shard summaries a report merges, so that nothing on the driver grows with the dataset.

Every shard's stats (``_stats/part-NNNNN.json``) carry a small ``summary`` of its output rows,
made by the worker that wrote the shard: fixed-bin histograms, category counts, shares, a
distinct-count sketch, and a few example rows per status chosen by the smallest hash of their key
(so merging shards keeps exactly the examples one pass over all rows would). Stages declare what
is worth summarizing (``Stage.summaries``) for the columns they produce; the worker applies every
registered stage's declarations to the columns its shard has, since a report of the last stage
plots columns made earlier in the chain. Merging is addition (and keeping the smallest hashes), so
a report over 15M rows holds a few kilobytes per shard summary, never the rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from facecap.pipeline.status import OK

EXAMPLES = 24  # example rows kept per status (the report shows fewer)
EXAMPLE_COLUMNS = ("key", "image_key", "error", "duplicate_of", "caption", "alt_text")
SKETCH = 1024  # hashes kept by a distinct-count sketch (about 3% error)


@dataclass(frozen=True)
class Histogram:
    """Counts of a per-row number (of ok rows) in fixed bins; the value is made from the row's columns."""

    name: str
    columns: tuple[str, ...]
    edges: tuple[float, ...]
    value: Callable[[pd.DataFrame], pd.Series]


@dataclass(frozen=True)
class Categories:
    """Counts of a per-row label (of ok rows)."""

    name: str
    columns: tuple[str, ...]
    value: Callable[[pd.DataFrame], pd.Series]


@dataclass(frozen=True)
class Shares:
    """For each of several flags, how many ok rows have it set (and how many could say)."""

    name: str
    columns: tuple[str, ...]  # any of them present is enough; the value takes those there are
    value: Callable[[pd.DataFrame], dict[str, pd.Series]]  # flag -> bool/NA per row


@dataclass(frozen=True)
class Distinct:
    """How many distinct items the ok rows hold in all (a mergeable k-minimum-values sketch)."""

    name: str
    columns: tuple[str, ...]
    value: Callable[[pd.DataFrame], Iterable[Iterable[str]]]  # items per row


Measure = Histogram | Categories | Shares | Distinct


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def shard_summary(frame: pd.DataFrame, measures: Iterable[Measure]) -> dict[str, Any]:
    """The summary of one shard's output rows under ``measures`` (those whose columns are absent give nothing)."""
    ok = frame[frame["status"] == OK] if "status" in frame else frame.iloc[0:0]
    summary: dict[str, Any] = {"examples": _examples(frame)}
    for measure in measures:
        part = _measure(measure, ok)
        if part is not None:
            summary.setdefault(type(measure).__name__.lower(), {})[measure.name] = part
    return summary


def summary_frame(table: pa.Table, measures: Iterable[Measure]) -> pd.DataFrame:
    """The columns of a shard's output that its summary reads (not the rest: crops, embeddings)."""
    wanted = {"key", "status", *EXAMPLE_COLUMNS}
    for measure in measures:
        wanted.update(measure.columns)
    return table.select([c for c in table.column_names if c in wanted]).to_pandas()


def _measure(measure: Measure, ok: pd.DataFrame) -> Any:
    present = [c in ok.columns for c in measure.columns]
    if not (any(present) if isinstance(measure, Shares) else all(present)):
        return None
    values = measure.value(ok)
    if isinstance(measure, Histogram):
        numbers = pd.to_numeric(values, errors="coerce").dropna().to_numpy(float)
        inner, _ = np.histogram(np.clip(numbers, measure.edges[0], measure.edges[-1]), bins=measure.edges)
        return {"edges": list(measure.edges), "counts": inner.tolist()}
    if isinstance(measure, Categories):
        return {str(k): int(v) for k, v in values.dropna().astype(str).value_counts().items()}
    if isinstance(measure, Shares):
        return {flag: [int(s.fillna(False).astype(bool).sum()), int(s.notna().sum())] for flag, s in values.items()}
    rows = [list(items) for items in values]
    hashes = {_hash64(item) for items in rows for item in items}
    return {"items": sum(len(items) for items in rows), "smallest": sorted(hashes)[:SKETCH]}


def _examples(frame: pd.DataFrame) -> dict[str, list[dict[str, Any]]]:
    """Per status, the rows whose key hashes smallest (a uniform sample that merges exactly)."""
    if not len(frame) or "key" not in frame or "status" not in frame:
        return {}
    columns = [c for c in EXAMPLE_COLUMNS if c in frame.columns]
    ranked = frame.assign(_rank=[_hash64(str(k)) for k in frame["key"]])
    out: dict[str, list[dict[str, Any]]] = {}
    for status, rows in ranked.groupby("status", sort=False):
        chosen = rows.nsmallest(EXAMPLES, "_rank")
        out[str(status)] = [_plain({**{c: r[c] for c in columns}, "_rank": r["_rank"]}) for _, r in chosen.iterrows()]
    return out


def _plain(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready: arrays to lists, NaN to None, long text cut."""
    out = {}
    for key, value in record.items():
        if isinstance(value, np.ndarray):
            value = [str(v)[:300] for v in value.tolist()]
        elif isinstance(value, float) and np.isnan(value):
            value = None
        elif isinstance(value, np.integer):
            value = int(value)
        elif isinstance(value, str):
            value = value[:300]
        out[key] = value
    return out


def merge(summaries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One summary from many shards' (addition; the smallest hashes for examples and sketches)."""
    merged: dict[str, Any] = {"examples": {}, "histogram": {}, "categories": {}, "shares": {}, "distinct": {}}
    for summary in summaries:
        for status, rows in summary.get("examples", {}).items():
            kept = merged["examples"].setdefault(status, [])
            kept.extend(rows)
            kept.sort(key=lambda r: r["_rank"])
            del kept[EXAMPLES:]
        for name, part in summary.get("histogram", {}).items():
            into = merged["histogram"].setdefault(name, {"edges": part["edges"], "counts": [0] * len(part["counts"])})
            into["counts"] = [a + b for a, b in zip(into["counts"], part["counts"], strict=True)]
        for name, part in summary.get("categories", {}).items():
            into = merged["categories"].setdefault(name, {})
            for label, count in part.items():
                into[label] = into.get(label, 0) + count
        for name, part in summary.get("shares", {}).items():
            into = merged["shares"].setdefault(name, {})
            for flag, (hits, total) in part.items():
                old = into.get(flag, [0, 0])
                into[flag] = [old[0] + hits, old[1] + total]
        for name, part in summary.get("distinct", {}).items():
            into = merged["distinct"].setdefault(name, {"items": 0, "smallest": []})
            into["items"] += part["items"]
            into["smallest"] = sorted(set(into["smallest"]) | set(part["smallest"]))[:SKETCH]
    return merged


def distinct_estimate(sketch: Mapping[str, Any]) -> int:
    """Distinct items from a k-minimum-values sketch: exact below k, (k - 1) / k-th smallest hash above."""
    smallest = sketch["smallest"]
    if len(smallest) < SKETCH:
        return len(smallest)
    return round((SKETCH - 1) / (smallest[-1] / 2.0**64))
