"""The tag stage on real photos: the schema filled, provenance recorded, the keep-rule applied."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import insightface
import pandas as pd
import pytest
from helpers import detected_faces, ray_executor, read_all, run
from typer.testing import CliRunner

from facecap.cli import app
from facecap.pipeline import models
from facecap.pipeline.errors import ConfigError
from facecap.stages.tag.schema import CELEBA40, COLUMNS
from facecap.stages.tag.stage import TagConfig, TagStage

GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
PHOTOS = ["deepface/img1.jpg", "face_recognition/obama.jpg", "insightface/inspireface_emotion_happy.png"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory, face_photos):
    photos = {"group.jpg": GROUP.read_bytes()}
    photos.update({name.replace("/", "_"): (face_photos / name).read_bytes() for name in PHOTOS})
    return detected_faces(tmp_path_factory.mktemp("tag"), photos, shard_size=2)


@pytest.fixture(autouse=True)
def shared_models(shared, monkeypatch):
    monkeypatch.setenv("FACECAP_MODELS", str(shared / "models"))


def face_rows(folder: Path) -> pd.DataFrame:
    rows = read_all(folder).to_pandas()
    return rows[rows.key.str.contains("_f")]


def test_offline_backends_fill_what_they_can_and_leave_the_rest_null(faces):
    result = run(TagStage, faces / "detect", faces / "tag", TagConfig(min_confident=0))
    assert result.ok
    rows = face_rows(faces / "tag")
    assert set(COLUMNS) <= set(rows.columns) and (rows.status == "ok").all()
    assert rows.age.notna().all() and rows.gender.isin(["female", "male"]).all() and rows.pose_bin.notna().all()
    assert rows.skin_monk.between(1, 10).all() and rows.attr_Male.notna().all()
    for column in ("attr_Bald", "attr_Wearing_Hat", "emotion", "hair_color"):  # no backend produced them
        assert rows[column].isna().all(), column
    backends = json.loads(rows.attr_backends.iloc[0])
    assert backends["age"] == "agegender" and backends["yaw"] == "geometry" and backends["skin_ita"] == "skin"
    for confident, male in zip(rows.confident_attributes, rows.attr_Male, strict=True):
        assert set(confident) <= set(CELEBA40) and ("Male" in confident) == (male > 0.85)


def test_later_backends_fill_only_what_earlier_ones_left(faces):
    config = TagConfig(backends=["genderage", "agegender", "emotion"], min_confident=0)
    assert run(TagStage, faces / "detect", faces / "tag_order", config).ok
    rows = face_rows(faces / "tag_order")
    backends = [json.loads(b) for b in rows.attr_backends]
    assert all(b["gender"] == "genderage" and b["age"] == "genderage" and b["age_std"] == "agegender" for b in backends)
    assert rows.emotion.notna().all()
    assert rows[rows.alt_text.str.contains("happy")].emotion.iloc[0] == "happy"


def test_the_keep_rule_rejects_faces_with_too_few_confident_attributes(faces):
    assert run(TagStage, faces / "detect", faces / "tag_rule", TagConfig(min_confident=2, threshold=0.5)).ok
    rows = face_rows(faces / "tag_rule")
    rejected = rows[rows.status == "tag:too_few_attributes"]
    kept = rows[rows.status == "ok"]
    assert len(rejected) and len(kept)
    assert (rejected.confident_attributes.map(len) < 2).all() and (kept.confident_attributes.map(len) >= 2).all()
    assert rejected.error.str.contains("need 2").all()


def test_celeba_backend_fills_all_40_from_a_checkpoint_on_ray(faces, tmp_path, ray_local):
    import torch

    from facecap.stages.tag.learned import celeba_resnet50

    checkpoint = tmp_path / "celeba.pth"
    torch.save(celeba_resnet50().state_dict(), checkpoint)
    config = TagConfig(backends=["celeba", "agegender"], celeba_checkpoint=str(checkpoint), min_confident=0)
    assert run(TagStage, faces / "detect", faces / "tag_celeba", config, executor=ray_executor()).ok
    rows = face_rows(faces / "tag_celeba")
    for name in CELEBA40:
        assert rows[f"attr_{name}"].between(0, 1).all(), name
    assert all(json.loads(b)["Male"] == "celeba" and json.loads(b)["age"] == "agegender" for b in rows.attr_backends)


def test_missing_checkpoint_and_unknown_thresholds_are_clear_errors():
    with pytest.raises(ConfigError, match=r"tag\.celeba_checkpoint"):
        TagStage.preflight(TagConfig(backends=["celeba"]))
    with pytest.raises(ConfigError, match="not CelebA attributes: Beard"):
        TagStage.preflight(TagConfig(thresholds={"Beard": 0.5}))


def test_a_keep_rule_the_backends_cannot_meet_is_refused_before_any_shard(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty"))
    with pytest.raises(ConfigError, match=r"tag\.min_confident 5 cannot be met.*at most 4 .*--min-confident 4"):
        TagStage.preflight(TagConfig(backends=["agegender", "geometry", "skin"], min_confident=5))
    # A fresh machine: no model folder, and still the Face Landmarker from its wheel.
    monkeypatch.setenv("FACECAP_MODELS", str(tmp_path / "no-models"))
    with pytest.raises(ConfigError, match=r"at most 4 CelebA attributes here \(Male, Mouth_Slightly_Open, Smiling"):
        TagStage.preflight(TagConfig(min_confident=5))
    # Without any face mesh, geometry sets no CelebA attribute: only agegender's Male and Young are left.
    spec = models.REGISTRY["face-landmarker"]
    monkeypatch.setitem(models.REGISTRY, "face-landmarker", replace(spec, package=("no_such_package", "x.task")))
    with pytest.raises(ConfigError, match=r"at most 2 CelebA attributes here \(Male, Young\)"):
        TagStage.preflight(TagConfig(min_confident=3))
    assert TagStage.preflight(TagConfig(min_confident=2)) == []
    assert TagStage.preflight(TagConfig(backends=["celeba"], celeba_checkpoint="x.pt", min_confident=5)) == []


def test_the_default_keep_rule_adapts_to_the_backends_and_says_so(faces, tmp_path):
    """At its defaults, tag keeps the faces its backends can judge instead of rejecting every one."""
    notes = TagStage.preflight(TagConfig())
    assert len(notes) == 1 and "keeping faces with 4 confident CelebA attributes" in notes[0]
    assert TagStage(TagConfig()).min_confident == 4 and TagStage(TagConfig(backends=["clip"])).min_confident == 5
    out = tmp_path / "defaults"
    result = CliRunner().invoke(app, ["tag", str(faces / "detect"), str(out), "--executor", "local"])
    assert result.exit_code == 0, result.output
    assert "tag: note: keeping faces with 4 confident CelebA attributes" in result.output
    rows = face_rows(out)
    assert set(rows.status) <= {"ok", "tag:too_few_attributes"}
    kept = rows[rows.status == "ok"]
    assert all(len(confident) >= 4 for confident in kept.confident_attributes)
    assert all(len(confident) < 4 for confident in rows[rows.status != "ok"].confident_attributes)


def test_tag_at_its_defaults_sets_eye_state_on_a_fresh_machine(faces, tmp_path, monkeypatch):
    """No model folder, no cache: eyes, mouth and smile come from the Face Landmarker in its wheel."""
    monkeypatch.setenv("FACECAP_MODELS", str(tmp_path / "no-models"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert run(TagStage, faces / "detect", faces / "tag_fresh", TagConfig()).ok
    rows = face_rows(faces / "tag_fresh")
    portraits = rows[~rows.alt_text.str.contains("group")]
    assert len(portraits) == 3 and portraits.eyes_open.between(0.5, 1).all()
    assert rows.eyes_open.notna().sum() >= len(rows) - 1 and rows.eyes_open.dropna().between(0, 1).all()
    backends = json.loads(portraits.attr_backends.iloc[0])
    assert backends["eyes_open"] == backends["Smiling"] == "geometry"
    happy = portraits[portraits.alt_text.str.contains("happy")]
    assert happy.attr_Smiling.iloc[0] > 0.85 and "Smiling" in happy.confident_attributes.iloc[0]


def test_the_clip_backend_refuses_random_weights_unless_asked():
    with pytest.raises(ConfigError, match=r"tag\.clip_pretrained"):
        TagStage.preflight(TagConfig(backends=["clip"]))
    assert TagStage.preflight(TagConfig(backends=["clip"], clip_random_weights=True)) == []
    from facecap.stages.tag.learned import ClipZeroShot

    with pytest.raises(ConfigError, match="randomly initialised"):
        ClipZeroShot("ViT-S-32", pretrained=None)


def test_tag_from_the_cli(faces, tmp_path):
    out = tmp_path / "tagged"
    args = ["tag", str(faces / "detect"), str(out), "--backends", "agegender,geometry", "--min-confident", "0"]
    result = CliRunner().invoke(app, [*args, "--executor", "local"])
    assert result.exit_code == 0, result.output
    assert (face_rows(out).status == "ok").all()


def test_calibration_picks_a_threshold_at_least_as_good_as_the_default(faces, tmp_path):
    from facecap.stages.tag.calibrate import calibrate

    assert run(TagStage, faces / "detect", faces / "tag_cal", TagConfig(backends=["agegender"], min_confident=0)).ok
    rows = face_rows(faces / "tag_cal")
    # Labels: the portrait is a woman, Obama a man, the group photo's faces labelled by the model
    # itself at 0.5 (so a perfect threshold exists), the happy photo left out.
    labels = pd.DataFrame({"key": rows.key, "Male": (rows.attr_Male > 0.5).astype(int)})
    labels.loc[rows.alt_text.str.contains("img1").to_numpy(), "Male"] = 0
    labels.loc[rows.alt_text.str.contains("obama").to_numpy(), "Male"] = 1
    labels = labels[~rows.alt_text.str.contains("happy").to_numpy()]
    [male] = calibrate(rows, labels)
    assert male.attribute == "Male" and male.labelled == len(labels)
    assert male.balanced_accuracy >= male.at_default
    csv = tmp_path / "labels.csv"
    labels.to_csv(csv, index=False)
    result = CliRunner().invoke(app, ["tag", str(faces / "tag_cal"), "--calibrate", str(csv)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "thresholds:" in result.output and "Male:" in result.output
