"""The quality stage on real photos and synthetic degradations: each flips its own rule."""

from __future__ import annotations

from pathlib import Path

import cv2
import insightface
import numpy as np
import pytest
from helpers import detected_faces, ray_executor, read_all, run
from typer.testing import CliRunner

from facecap.cli import app
from facecap.stages.quality.rules import Rule
from facecap.stages.quality.stage import MEASURES, QualityConfig, QualityStage

GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
RULES = [
    Rule(name="nsfw", expr="q_nsfw < 0.5"),
    Rule(name="bright", expr="q_brightness >= 0.25"),  # before 'sharp': darkening also lowers contrast
    Rule(name="sharp", expr="q_sharpness >= 6000"),
    Rule(name="colour", expr="not q_grayscale"),
    Rule(name="little_text", expr="q_text_fraction < 0.04"),
]


def degraded(portrait: np.ndarray) -> dict[str, np.ndarray]:
    gray = cv2.cvtColor(cv2.cvtColor(portrait, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    text = portrait.copy()
    height, width = text.shape[:2]
    for line in range(6):
        y = int(height * (0.55 + 0.07 * line))
        cv2.putText(text, "SALE 50% OFF TODAY", (20, y), cv2.FONT_HERSHEY_SIMPLEX, width / 700, (255, 255, 255), 6)
    return {
        "sharp": portrait,
        "blurred": cv2.GaussianBlur(portrait, (0, 0), 6.0),
        "dark": (portrait * 0.2).astype(np.uint8),
        "gray": gray,
        "text": text,
    }


@pytest.fixture(scope="module")
def faces(tmp_path_factory, face_photos):
    """ingest -> download -> detect of a portrait, four degradations of it and a group photo."""
    portrait = cv2.imread(str(face_photos / "deepface" / "img1.jpg"))
    photos = {
        f"{name}.jpg": cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
        for name, pixels in degraded(portrait).items()
    }
    photos["group.jpg"] = GROUP.read_bytes()
    return detected_faces(tmp_path_factory.mktemp("quality"), photos)


def by_source(rows):
    return {name: group for name, group in rows.groupby("alt_text")}


def test_every_degradation_flips_its_own_rule_and_measures_are_stored(faces):
    result = run(QualityStage, faces / "detect", faces / "q", QualityConfig(rules=RULES, cascade=False))
    assert result.ok
    rows = read_all(faces / "q").to_pandas()
    detect = read_all(faces / "detect").to_pandas()
    assert sorted(rows.key) == sorted(detect.key) and len(rows) == len(detect)  # nothing lost
    source = by_source(rows[rows.key.str.contains("_f")])
    status = {name: group.status.iloc[0] for name, group in source.items() if name != "group.jpg"}
    assert status == {
        "sharp.jpg": "ok",
        "blurred.jpg": "quality:sharp",
        "dark.jpg": "quality:bright",
        "gray.jpg": "quality:colour",
        "text.jpg": "quality:little_text",
    }
    sharp = source["sharp.jpg"].iloc[0]
    assert set(MEASURES) <= set(rows.columns)
    assert sharp.q_grayscale == False and 0 <= sharp.q_frontalness <= 1  # noqa: E712 (a numpy bool)
    assert source["blurred.jpg"].iloc[0].q_brisque > sharp.q_brisque
    assert source["dark.jpg"].iloc[0].quality_failed.tolist()[0] == "bright"
    assert "q_brightness=" in source["dark.jpg"].iloc[0].error
    group = source["group.jpg"]
    assert (group.q_faces_in_image == len(group)).all() and group.q_is_largest.sum() == 1
    assert (group.q_nsfw < 0.2).all()


def test_the_cascade_keeps_every_status_and_skips_measures_of_settled_rows(faces):
    assert run(QualityStage, faces / "detect", faces / "q_on", QualityConfig(rules=RULES)).ok
    assert run(QualityStage, faces / "detect", faces / "q_off", QualityConfig(rules=RULES, cascade=False)).ok
    on = read_all(faces / "q_on").to_pandas().set_index("key").sort_index()
    off = read_all(faces / "q_off").to_pandas().set_index("key").sort_index()
    assert on.index.equals(off.index) and on.status.tolist() == off.status.tolist()  # one status a row, the same
    assert set(on.index[on.status == "ok"]) == set(off.index[off.status == "ok"])
    assert on.error.fillna("").tolist() == off.error.fillna("").tolist()
    assert not off.quality_skipped.map(len).any()  # off: everything measured
    faces_on = by_source(on[on.index.str.contains("_f")])
    blurred = faces_on["blurred.jpg"].iloc[0]  # fails 'sharp', the third rule: the 4th and 5th cannot matter
    assert blurred.status == "quality:sharp" and not np.isnan(blurred.q_nsfw)  # rule 1 reads NSFW: taken
    assert np.isnan(blurred.q_text_fraction) and np.isnan(blurred.q_brisque) and blurred.q_grayscale is None
    assert {"text", "brisque", "colour", "cartoon"} <= set(blurred.quality_skipped)
    off_blurred = by_source(off[off.index.str.contains("_f")])["blurred.jpg"].iloc[0]
    assert not np.isnan(off_blurred.q_text_fraction) and not np.isnan(off_blurred.q_brisque)
    sharp = faces_on["sharp.jpg"].iloc[0]
    assert sharp.status == "ok" and len(sharp.quality_skipped) == 0 and not np.isnan(sharp.q_text_fraction)
    assert sharp.quality_ms["text"] > 0 and sharp.quality_ms["decode"] > 0 and blurred.quality_ms["text"] is None
    group = faces_on["group.jpg"]  # five faces of one image: text detection once, its time shared
    measured = group[group.q_text_fraction.notna()]
    assert measured.q_text_fraction.nunique() <= 1


def test_a_ranking_rule_cuts_at_the_dataset_wide_threshold(faces, ray_local):
    config = QualityConfig(rules=[Rule(name="top_faces", by="q_face_side", top_k=3)], text=False, brisque=False)
    result = run(QualityStage, faces / "detect", faces / "q_top", config, executor=ray_executor())
    assert result.ok
    rows = read_all(faces / "q_top").to_pandas()
    judged = rows[rows.status.isin(["ok", "quality:top_faces"])]
    kept = judged[judged.status == "ok"]
    assert len(kept) == 3  # three across all shards, not three per shard
    assert kept.q_face_side.min() >= judged[judged.status != "ok"].q_face_side.max()
    assert "top cut-off" in judged[judged.status != "ok"].error.iloc[0]


def test_filter_and_explain_from_the_cli(faces, tmp_path):
    runner = CliRunner()
    config = tmp_path / "q.yaml"
    config.write_text("quality:\n  rules:\n" + "".join(f'    - {{name: {r.name}, expr: "{r.expr}"}}\n' for r in RULES))
    out = tmp_path / "quality"
    result = runner.invoke(app, ["quality", str(faces / "detect"), str(out), "-c", str(config), "--executor", "local"])
    assert result.exit_code == 0, result.output
    plot = tmp_path / "rules.png"
    # `filter`, the command's earlier name, still works.
    explained = runner.invoke(app, ["filter", "--explain", str(out), "--plot", str(plot)], env={"COLUMNS": "250"})
    assert explained.exit_code == 0, explained.output
    for name in ("sharp", "bright", "colour", "little_text", "q_sharpness >= 3000", "not measured", "ms per image"):
        assert name in explained.output
    assert "--no-cascade" in explained.output  # the blurred, dark, gray faces skipped text detection
    assert plot.stat().st_size > 5000
    wrong = runner.invoke(app, ["filter", "--explain", str(faces / "detect")])
    assert wrong.exit_code == 2 and "--explain reads facecap quality's output" in wrong.output


def test_no_cascade_from_the_cli_measures_every_row(faces, tmp_path):
    runner = CliRunner()
    config = tmp_path / "q.yaml"
    config.write_text("quality:\n  rules:\n" + "".join(f'    - {{name: {r.name}, expr: "{r.expr}"}}\n' for r in RULES))
    out = tmp_path / "everything"
    args = ["quality", str(faces / "detect"), str(out), "-c", str(config), "--no-cascade", "--executor", "local"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = read_all(out).to_pandas()
    judged = rows[rows.status.eq("ok") | rows.status.str.startswith("quality:")]
    assert (judged.status != "ok").any() and not judged.quality_skipped.map(len).any()
    assert judged.q_text_fraction.notna().all() and judged.q_brisque.notna().all()
    explained = runner.invoke(app, ["quality", "--explain", str(out)], env={"COLUMNS": "250"})
    assert explained.exit_code == 0 and "--no-cascade" not in explained.output  # nothing was skipped


def test_a_rule_on_an_unknown_column_is_a_clear_error(faces, tmp_path):
    from facecap.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown column"):
        QualityStage.preflight(QualityConfig(rules=[Rule(name="typo", expr="q_sharpnes > 3")]))
