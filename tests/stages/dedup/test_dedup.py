"""Dedup on real photos: labelled duplicate groups of ../shared/data/faces plus planted re-encodes,
resizes and crops are found, while different photos of one person are kept; eval decontamination
and the identity cap work end to end."""

from __future__ import annotations

import csv
import io
import re
import tarfile
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ray_executor, read_all, run
from typer.testing import CliRunner

from facecap.cli import app
from facecap.pipeline.executors import LocalExecutor
from facecap.pipeline.runner import run_stage
from facecap.pipeline.worker import StageJob
from facecap.stages.dedup.stage import DedupConfig, DedupStage
from facecap.stages.detect.stage import DetectConfig, DetectStage
from facecap.stages.ingest.readers import SourceConfig, open_source
from facecap.stages.ingest.stage import IngestConfig, IngestStage

SAME_PERSON_OTHER_PHOTOS = ["deepface/img2.jpg", "deepface/img4.jpg", "dlib_johns/John_Salley/000190_02159501.jpg"]
# images.csv does not group obama.jpg with the obama-240p..1080p ladder, but it is the same photo
# (the ladder is pillarboxed): the embedding kind finds it, so the test counts it in that group.
UNLABELLED_MEMBERS = {"face_recognition/obama.jpg": "dup06"}
PLANTED = ("q30", "half", "crop")


def corpus(face_photos: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    """Photos by name and their duplicate group (labelled groups, minus rotations; planted copies)."""
    with open(face_photos / "images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    photos, groups = {}, {}
    for row in rows:
        rotated = re.search(r"\b(90|180|270) deg", row["tests"]) is not None  # pHash is not rotation-invariant
        if row["dup_group"] and not rotated and "cartoon" not in row["tests"]:
            photos[row["file"]] = (face_photos / row["file"]).read_bytes()
            groups[row["file"]] = row["dup_group"]
    for name in [*SAME_PERSON_OTHER_PHOTOS, "deepface/img1.jpg", *UNLABELLED_MEMBERS]:
        photos[name] = (face_photos / name).read_bytes()
    groups.update(UNLABELLED_MEMBERS)
    image = cv2.imread(str(face_photos / "deepface" / "img1.jpg"))
    height, width = image.shape[:2]
    planted = {
        "q30": cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 30])[1].tobytes(),
        "half": cv2.imencode(".jpg", cv2.resize(image, (width // 2, height // 2)))[1].tobytes(),
        "crop": cv2.imencode(".jpg", image[height // 40 : -height // 40, width // 40 : -width // 40])[1].tobytes(),
    }
    for name, data in planted.items():
        photos[f"planted/{name}.jpg"] = data
        groups[f"planted/{name}.jpg"] = "planted"
    groups["deepface/img1.jpg"] = "planted"
    return photos, groups


def img2dataset_folder(folder: Path, photos: dict[str, bytes]) -> dict[str, str]:
    folder.mkdir()
    keys = {name: f"{i:09d}" for i, name in enumerate(sorted(photos))}
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for name, key in keys.items():
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(photos[name])
            tar.addfile(info, io.BytesIO(photos[name]))
    table = pa.table(
        {
            "key": list(keys.values()),
            "url": [f"http://faces.example/{n}" for n in keys],
            "caption": list(keys),
            "status": ["success"] * len(keys),
        }
    )
    pq.write_table(table, folder / "00000.parquet")
    return {key: name for name, key in keys.items()}


@pytest.fixture(autouse=True)
def shared_models(shared, monkeypatch):
    monkeypatch.setenv("FACECAP_MODELS", str(shared / "models"))  # MobileFaceNet for the embedding kinds


@pytest.fixture(scope="module")
def faces(tmp_path_factory, face_photos):
    root = tmp_path_factory.mktemp("dedup")
    photos, groups = corpus(face_photos)
    names = img2dataset_folder(root / "i2d", photos)
    config = IngestConfig(input=[str(root / "i2d")], shard_size=8)
    job = StageJob(stage_cls=IngestStage, config=config, output=str(root / "ingest"))
    assert run_stage(job, LocalExecutor(), source=open_source(SourceConfig(input=config.input, shard_size=8))).ok
    assert run(DetectStage, root / "ingest", root / "detect", DetectConfig(min_score=0.7, min_face_side=20)).ok
    return root, names, groups


def image_decisions(folder: Path, names: dict[str, str]) -> dict[str, set[str]]:
    rows = read_all(folder).to_pandas()
    rows = rows[rows.key.str.contains("_f")]
    by_image = defaultdict(set)
    for image_key, status in zip(rows.image_key, rows.status, strict=True):
        by_image[names[image_key]].add(status)
    return by_image


def test_labelled_and_planted_duplicates_are_found_and_other_photos_kept(faces, capsys):
    root, names, groups = faces
    config = DedupConfig(kinds=["exact", "near", "face", "embedding"])
    assert run(DedupStage, root / "detect", root / "dedup", config, executor=ray_executor()).ok
    decided = image_decisions(root / "dedup", names)
    members = defaultdict(list)
    for name, group in groups.items():
        if name in decided:
            members[group].append(name)
    true_positive = false_negative = 0
    for group, names_in_group in members.items():
        survivors = [n for n in names_in_group if "ok" in decided[n]]
        assert len(survivors) == 1, (group, {n: decided[n] for n in names_in_group})
        true_positive += len(names_in_group) - 1
        false_negative += 0
    duplicates_marked = [n for n, statuses in decided.items() if statuses & {"dedup:exact", "dedup:near_duplicate"}]
    false_positive = [n for n in duplicates_marked if n not in groups]
    assert not false_positive, false_positive  # other photos of the same people are kept
    for name in SAME_PERSON_OTHER_PHOTOS:
        assert "ok" in decided[name], name
    precision = true_positive / max(1, len(duplicates_marked))
    recall = true_positive / max(1, true_positive + false_negative)
    with capsys.disabled():
        print(f"\ndedup on fixture photos: {len(members)} groups, precision {precision:.2f}, recall {recall:.2f}")
    rows = read_all(root / "dedup").to_pandas()
    marked = rows[rows.status.isin(["dedup:exact", "dedup:near_duplicate"])]
    assert marked.duplicate_of.isin(rows[rows.status == "ok"].key).all()  # each points at a kept face
    assert marked.error.str.contains(" of ").all()


def test_eval_set_decontamination_and_identity_cap(faces, tmp_path, face_photos):
    root, names, _ = faces
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    image = cv2.imread(str(face_photos / "deepface" / "img2.jpg"))
    cv2.imwrite(str(evaluation / "held_out.jpg"), cv2.resize(image, (image.shape[1] // 3, image.shape[0] // 3)))
    result = CliRunner().invoke(
        app,
        [
            "dedup", str(root / "detect"), str(tmp_path / "clean"), "--against", str(evaluation),
            "--kinds", "exact,near,identity", "--identity-cap", "2", "--executor", "local",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    decided = image_decisions(tmp_path / "clean", names)
    assert decided["deepface/img2.jpg"] == {"dedup:eval_overlap"}
    rows = read_all(tmp_path / "clean").to_pandas()
    rows = rows[rows.key.str.contains("_f")]
    kept = rows[rows.status == "ok"]
    assert (kept.groupby("identity_cluster").size() <= 2).all()
    assert (rows.status == "dedup:identity_cap").any() and rows.identity_cluster_size.max() > 2


def test_a_missing_eval_folder_is_a_clear_error():
    from facecap.pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="no such folder"):
        DedupStage.preflight(DedupConfig(against="/nonexistent/eval"))


# Portraits of eight people (images.csv identities), each planted again cropped by 3% on every side.
CROPPED = [
    "deepface/img1.jpg",
    "deepface/img2.jpg",
    "dlib_johns/John_Salley/000190_02159501.jpg",
    "deepface/img4.jpg",
    "insightface/Tom_Hanks_54745.png",
    "face_recognition/obama.jpg",
    "face_recognition/biden.jpg",
    "deepface/couple.jpg",
]


@pytest.fixture(scope="module")
def cropped_copies(tmp_path_factory, face_photos):
    root = tmp_path_factory.mktemp("cropped")
    photos = {}
    for name in CROPPED:
        if not (face_photos / name).exists():
            continue
        image = cv2.imread(str(face_photos / name))
        height, width = image.shape[:2]
        dy, dx = round(height * 0.03), round(width * 0.03)
        photos[name] = (face_photos / name).read_bytes()
        photos[f"cropped/{name}"] = cv2.imencode(".jpg", image[dy : height - dy, dx : width - dx])[1].tobytes()
    names = img2dataset_folder(root / "i2d", photos)
    config = IngestConfig(input=[str(root / "i2d")], shard_size=8)
    job = StageJob(stage_cls=IngestStage, config=config, output=str(root / "ingest"))
    assert run_stage(job, LocalExecutor(), source=open_source(SourceConfig(input=config.input, shard_size=8))).ok
    assert run(DetectStage, root / "ingest", root / "detect", DetectConfig(min_score=0.7, min_face_side=20)).ok
    return root, names


def test_the_default_face_kind_finds_copies_cropped_by_a_few_percent(cropped_copies):
    # Before the face kind, the defaults (exact, near) kept most copies cropped by 3% a side.
    root, names = cropped_copies
    found = {}
    for label, kinds in (("before", ["exact", "near"]), ("default", DedupConfig().kinds)):
        assert run(DedupStage, root / "detect", root / label, DedupConfig(kinds=kinds)).ok
        decided = image_decisions(root / label, names)
        originals = [n for n in decided if not n.startswith("cropped/")]
        assert all("ok" in decided[n] for n in originals)  # an original always survives its copy
        found[label] = sorted(n for n in decided if n.startswith("cropped/") and "ok" not in decided[n])
    assert DedupConfig().kinds == ["exact", "near", "face"]
    assert len(found["default"]) > len(found["before"]), found
    assert len(found["before"]) == 5 and len(found["default"]) == 7, found  # of 8 (docs/dedup.md)


# Identity opt-out: every photo of five labelled people, a photo of two people (one of them
# Angelina Jolie) and a group photo; Angelina opts out with one photo that is not in the dataset.
OPT_OUT_PEOPLE = ("angelina_jolie", "deepface_person01", "joe_biden", "kit_harington", "deepface_person09")
OPT_OUT_REFERENCE = "deepface/img1.jpg"


@pytest.fixture(scope="module")
def people(tmp_path_factory, face_photos):
    root = tmp_path_factory.mktemp("optout")
    with open(face_photos / "images.csv", newline="") as f:
        labelled = {r["file"]: r["identity"] for r in csv.DictReader(f) if r["identity"] in OPT_OUT_PEOPLE}
    labelled.pop(OPT_OUT_REFERENCE)
    photos = {name: (face_photos / name).read_bytes() for name in [*labelled, "deepface/couple.jpg"]}
    photos["insightface/t1.jpg"] = (face_photos / "insightface" / "t1.jpg").read_bytes()
    names = img2dataset_folder(root / "i2d", photos)
    config = IngestConfig(input=[str(root / "i2d")], shard_size=8)
    job = StageJob(stage_cls=IngestStage, config=config, output=str(root / "ingest"))
    assert run_stage(job, LocalExecutor(), source=open_source(SourceConfig(input=config.input, shard_size=8))).ok
    assert run(DetectStage, root / "ingest", root / "detect", DetectConfig(min_score=0.7, min_face_side=20)).ok
    reference = root / "optout" / "angelina"
    reference.mkdir(parents=True)
    (reference / "photo.jpg").write_bytes((face_photos / OPT_OUT_REFERENCE).read_bytes())
    return root, names, labelled


def face_rows(folder: Path, names: dict[str, str]):
    rows = read_all(folder).to_pandas()
    rows = rows[rows.key.str.contains("_f")].copy()
    rows["photo"] = rows.image_key.map(names)
    return rows


def check_angelina_opted_out(rows, labelled, capsys) -> None:
    """Every other photo of hers loses its largest face, nobody else's face goes, the couple keeps him."""
    opted = rows[rows.status == "dedup:opted_out_identity"]
    assert set(opted.identity_match) == {"angelina"}
    assert not opted.error.str.contains("angelina").any()  # the name is in identity_match only
    hers = [n for n, identity in labelled.items() if identity == "angelina_jolie"]
    removed = [n for n in hers if n in set(opted.photo)]
    others = set(opted.photo) - set(hers)
    assert others == {"deepface/couple.jpg"}, others  # no photo of another identity
    couple = rows[rows.photo == "deepface/couple.jpg"]
    assert (couple.status == "dedup:opted_out_identity").sum() == 1 and (couple.status == "ok").sum() >= 1
    assert not rows[rows.photo == "insightface/t1.jpg"].status.eq("dedup:opted_out_identity").any()
    with capsys.disabled():
        print(f"\nopt-out with one photo: {len(removed)} of her {len(hers)} other photos removed, 0 of other people")
    assert len(removed) == len(hers) == 8  # recall 8/8 here; 99.4% over all labelled pairs (docs/dedup.md)


def test_opting_out_with_one_photo_removes_her_other_photos_and_nobody_else(people, tmp_path, capsys):
    root, names, labelled = people
    args = ["dedup", str(root / "detect"), str(tmp_path / "out"), "--opt-out-faces", str(root / "optout")]
    result = CliRunner().invoke(app, [*args, "--executor", "local"])
    assert result.exit_code == 0, result.output
    rows = face_rows(tmp_path / "out", names)
    check_angelina_opted_out(rows, labelled, capsys)
    assert rows.identity_match_cosine[rows.status == "dedup:opted_out_identity"].min() >= 0.45
    assert rows.identity_match[rows.status == "ok"].isna().all()


def test_the_opt_out_list_file_does_the_same_in_a_later_run(people, tmp_path, capsys):
    root, names, labelled = people
    listing = tmp_path / "optout.json"
    runner = CliRunner()
    added = runner.invoke(app, ["optout", "add", str(listing), str(root / "optout")])
    assert added.exit_code == 0, added.output
    assert "1 person(s) added" in added.output and "holds 1 people, 1 embeddings" in added.output
    shown = runner.invoke(app, ["optout", "list", str(listing)])
    assert shown.exit_code == 0 and "1 people, 1 embeddings; model mobilefacenet" in shown.output
    assert "angelina" not in shown.output  # counts, never names
    args = ["dedup", str(root / "detect"), str(tmp_path / "out"), "--opt-out-embeddings", str(listing)]
    result = runner.invoke(app, [*args, "--executor", "local"])
    assert result.exit_code == 0, result.output
    check_angelina_opted_out(face_rows(tmp_path / "out", names), labelled, capsys)


def test_faces_of_eval_set_identities_are_marked(people, tmp_path, face_photos):
    root, names, labelled = people
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "biden.jpg").write_bytes((face_photos / "face_recognition" / "biden.jpg").read_bytes())
    args = ["dedup", str(root / "detect"), str(tmp_path / "out"), "--against-identities", str(evaluation)]
    result = CliRunner().invoke(app, [*args, "--opt-out-faces", str(root / "optout"), "--executor", "local"])
    assert result.exit_code == 0, result.output
    rows = face_rows(tmp_path / "out", names)
    marked = rows[rows.status == "dedup:eval_identity"]
    biden = {n for n, identity in labelled.items() if identity == "joe_biden"}
    assert biden and set(marked.photo) == biden and set(marked.identity_match) == {"biden"}
    assert (rows.status == "dedup:opted_out_identity").sum() >= 8  # both at once


def test_without_an_embedding_model_the_identity_options_refuse_before_any_shard(people, tmp_path, monkeypatch):
    root, _, _ = people
    monkeypatch.setenv("FACECAP_MODELS", str(tmp_path / "none"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = ["dedup", str(root / "detect"), str(out), "--opt-out-faces", str(root / "optout"), "--executor", "local"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "--opt-out-faces needs a face-embedding model" in line and "mobilefacenet" in line
    assert not list(out.glob("part-*")) and not (out / "_summary").exists()


def test_a_list_made_with_another_model_is_refused_in_one_line(people, tmp_path):
    root, _, _ = people
    from facecap.stages.shared.identity import OptOutList

    listing = OptOutList(model="arcface.onnx", model_sha256="0" * 64)
    listing.add("someone", [np.ones(512, np.float32) / np.sqrt(512)])
    listing.save(tmp_path / "optout.json")
    args = ["dedup", str(root / "detect"), str(tmp_path / "out"), "--opt-out-embeddings", str(tmp_path / "optout.json")]
    result = CliRunner().invoke(app, [*args, "--executor", "local"])
    assert result.exit_code == 2 and "\n" not in result.output.strip()
    assert "made with the face-embedding model arcface.onnx" in result.output


def test_facecap_run_takes_the_recipe_key_and_refuses_before_the_first_stage(tmp_path, face_photos):
    photos = tmp_path / "optout"
    photos.mkdir()
    (photos / "apple.jpg").write_bytes((face_photos / "nonface" / "apple.jpg").read_bytes())
    (tmp_path / "urls.csv").write_text("url,caption\nhttp://127.0.0.1:9/a.jpg,a\n")
    args = ["run", "-c", "demo", "-i", str(tmp_path / "urls.csv"), "-o", str(tmp_path / "work"), "--executor", "local"]
    result = CliRunner().invoke(app, [*args, "--set", f"dedup.opt_out_faces={photos}"])
    assert result.exit_code == 2 and "apple.jpg: no face found" in result.output
    assert "\n" not in result.output.strip()
    assert not (tmp_path / "work" / "ingest").exists()  # refused before ingest ran
