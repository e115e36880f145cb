"""Per-shard summaries: merging shards' summaries gives what one summary of all their rows gives."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa

from facecap.pipeline.summary import (
    EXAMPLES,
    Categories,
    Distinct,
    Histogram,
    Shares,
    distinct_estimate,
    merge,
    shard_summary,
    summary_frame,
)


def side(rows: pd.DataFrame) -> pd.Series:
    return rows["side"]


def colour(rows: pd.DataFrame) -> pd.Series:
    return rows["colour"]


def flags(rows: pd.DataFrame) -> dict[str, pd.Series]:
    return {"tall": rows["side"] > 50, "red": (rows["colour"] == "red").where(rows["colour"].notna())}


def words(rows: pd.DataFrame) -> list[list[str]]:
    return [[f"w{v % 3000}"] for v in rows["n"]]


MEASURES = (
    Histogram("side", ("side",), (0, 25, 50, 75, 100), side),
    Categories("colour", ("colour",), colour),
    Shares("flags", ("side", "colour"), flags),
    Distinct("words", ("n",), words),
    Histogram("absent", ("nope",), (0, 1), side),  # its column is not there: no entry
)


def table(rng: np.random.Generator, start: int, n: int) -> pa.Table:
    return pa.table(
        {
            "key": [f"{i:06d}" for i in range(start, start + n)],
            "status": rng.choice(["ok", "ok", "ok", "detect:no_face"], n).tolist(),
            "error": [None] * n,
            "side": rng.uniform(0, 120, n),
            "colour": rng.choice(["red", "blue", None], n).tolist(),
            "n": rng.integers(0, 10**9, n),
            "pixels": [b"x" * 10] * n,  # a column no measure reads
        }
    )


def test_merged_shard_summaries_equal_one_summary_of_all_rows():
    rng = np.random.default_rng(0)
    shards = [table(rng, i * 1000, 1000) for i in range(5)]
    parts = [shard_summary(summary_frame(t, MEASURES), MEASURES) for t in shards]
    whole = shard_summary(summary_frame(pa.concat_tables(shards), MEASURES), MEASURES)
    merged = merge(json.loads(json.dumps(parts)))  # as stored in the stats files
    assert "pixels" not in summary_frame(shards[0], MEASURES).columns
    assert merged["histogram"]["side"] == whole["histogram"]["side"] and "absent" not in merged["histogram"]
    assert merged["categories"]["colour"] == whole["categories"]["colour"]
    assert merged["shares"]["flags"] == whole["shares"]["flags"]
    ok = sum(t.column("status").to_pylist().count("ok") for t in shards)
    assert merged["distinct"]["words"]["items"] == whole["distinct"]["words"]["items"] == ok  # one word a row
    assert merged["distinct"]["words"]["smallest"] == whole["distinct"]["words"]["smallest"]
    exact = len(
        {
            f"w{v % 3000}"
            for t in shards
            for v, s in zip(t["n"].to_pylist(), t["status"].to_pylist(), strict=True)
            if s == "ok"
        }
    )
    assert abs(distinct_estimate(merged["distinct"]["words"]) - exact) < 0.06 * exact  # KMV: ~3% error
    for status in ("ok", "detect:no_face"):
        assert [r["key"] for r in merged["examples"][status]] == [r["key"] for r in whole["examples"][status]]
        assert len(merged["examples"][status]) == EXAMPLES
    assert len(json.dumps(merged)) < 40_000  # small, whatever the number of rows
