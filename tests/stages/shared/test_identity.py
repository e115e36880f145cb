"""Identity helpers: reference photos of people (several photos, several faces, none), the opt-out
list file (round trip, another model refused), matching, and the embedding model's lookup."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest

import facecap.stages.detect  # noqa: F401  (registers yunet-int8, the reference photos' detector)
from facecap.pipeline.errors import ConfigError, FacecapError
from facecap.pipeline.models import ModelMissing
from facecap.stages.shared.identity import (
    IDENTITY_COSINE,
    FaceEmbedder,
    OptOutList,
    embedding_model,
    match,
    photos_by_person,
    reference_people,
)

MODEL_FILE = "mobilefacenet_128d_photo_analyze.onnx"


@pytest.fixture(autouse=True)
def shared_models(shared, monkeypatch):
    monkeypatch.setenv("FACECAP_MODELS", str(shared / "models"))


@pytest.fixture(scope="module")
def embedder(shared):
    return FaceEmbedder()  # conftest points FACECAP_MODELS at the shared models


def unit(*values: float) -> np.ndarray:
    vector = np.array(values, np.float32)
    return vector / np.linalg.norm(vector)


def test_a_folder_of_photos_is_a_person_per_subfolder_or_per_file(tmp_path):
    (tmp_path / "alice").mkdir()
    for name in ("alice/a.jpg", "alice/b.png", "bob.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    people = photos_by_person(tmp_path)
    assert sorted(people) == ["alice", "bob"]
    assert [p.name for p in people["alice"]] == ["a.jpg", "b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no photos there"):
        photos_by_person(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such folder"):
        photos_by_person(tmp_path / "missing")


def test_a_person_with_several_photos_gets_one_embedding_each_and_they_agree(tmp_path, face_photos, embedder):
    person = tmp_path / "photos" / "angelina"
    person.mkdir(parents=True)
    for name in ("img1.jpg", "img2.jpg", "img4.jpg"):
        shutil.copy(face_photos / "deepface" / name, person / name)
    shutil.copy(face_photos / "deepface" / "img12.jpg", tmp_path / "photos" / "someone.jpg")
    people = reference_people(tmp_path / "photos", embedder)
    assert sorted(people) == ["angelina", "someone"] and len(people["angelina"]) == 3 and len(people["someone"]) == 1
    own = np.stack(people["angelina"])
    assert np.allclose(np.linalg.norm(own, axis=1), 1.0, atol=1e-5)
    same = own @ own.T
    assert same[np.triu_indices(3, 1)].min() >= IDENTITY_COSINE  # three photos of one person match
    assert (own @ people["someone"][0]).max() < IDENTITY_COSINE


def test_a_photo_with_no_face_is_refused_in_one_line(tmp_path, face_photos, embedder):
    shutil.copy(face_photos / "nonface" / "apple.jpg", tmp_path / "apple.jpg")
    with pytest.raises(ConfigError) as error:
        reference_people(tmp_path, embedder)
    assert "apple.jpg: no face found" in str(error.value) and "\n" not in str(error.value)


def test_a_photo_with_several_faces_uses_the_clearly_largest_or_is_refused(tmp_path, face_photos, embedder):
    portrait = cv2.imread(str(face_photos / "deepface" / "img1.jpg"))
    other = cv2.imread(str(face_photos / "deepface" / "img12.jpg"))
    small = cv2.resize(other, (portrait.shape[1] // 4, round(other.shape[0] * portrait.shape[1] / 4 / other.shape[1])))
    composite = portrait.copy()
    composite[-small.shape[0] :, -small.shape[1] :] = small  # a bystander, much smaller, in a corner
    (tmp_path / "mixed").mkdir()
    cv2.imwrite(str(tmp_path / "mixed" / "angelina.jpg"), composite)
    (tmp_path / "alone").mkdir()
    shutil.copy(face_photos / "deepface" / "img1.jpg", tmp_path / "alone" / "angelina.jpg")
    from facecap.stages.shared.identity import ReferenceFaces

    assert len(ReferenceFaces().faces(composite)) == 2
    mixed = reference_people(tmp_path / "mixed", embedder)["angelina"]
    alone = reference_people(tmp_path / "alone", embedder)["angelina"]
    assert len(mixed) == 1 and float(mixed[0] @ alone[0]) > 0.9  # the portrait's face, not the bystander's
    # Every face of a group photo counts for an eval set; for a person who opts out it is refused.
    (tmp_path / "group").mkdir()
    shutil.copy(face_photos / "insightface" / "t1.jpg", tmp_path / "group" / "t1.jpg")
    assert len(reference_people(tmp_path / "group", embedder, every_face=True)["t1"]) == 6
    with pytest.raises(ConfigError, match=r"t1.jpg: 6 faces and none clearly the largest"):
        reference_people(tmp_path / "group", embedder)


def test_an_eval_folder_skips_photos_without_a_face_but_not_all_of_them(tmp_path, face_photos, embedder):
    shutil.copy(face_photos / "nonface" / "apple.jpg", tmp_path / "apple.jpg")
    with pytest.raises(ConfigError, match="no face found in any photo"):
        reference_people(tmp_path, embedder, every_face=True)
    shutil.copy(face_photos / "deepface" / "img12.jpg", tmp_path / "img12.jpg")
    assert sorted(reference_people(tmp_path, embedder, every_face=True)) == ["img12"]


def test_the_list_file_round_trips(tmp_path):
    listing = OptOutList(model="mobilefacenet", model_sha256="ab" * 32)
    listing.add("alice", [unit(1, 0, 0), unit(1, 1, 0)])
    listing.add("bob", [unit(0, 0, 1)])
    listing.add("alice", [unit(1, 0, 1)])  # a later photo of the same person joins her
    listing.save(tmp_path / "optout.json")
    again = OptOutList.load(tmp_path / "optout.json")
    assert (again.model, again.model_sha256, again.names) == ("mobilefacenet", "ab" * 32, ["alice", "bob"])
    assert again.people == 2 and len(again.vectors) == 4
    for index in range(2):  # the file holds each person's embeddings together, bit for bit
        assert np.array_equal(again.vectors[again.owner == index], listing.vectors[listing.owner == index])
    data = json.loads((tmp_path / "optout.json").read_text())
    assert data["format"] == "facecap-optout-list" and data["dim"] == 3
    assert [len(p["embeddings"]) for p in data["people"]] == [3, 1]
    assert not list(tmp_path.glob(".optout-*"))  # written through a temporary file, renamed


def test_a_list_made_with_another_model_is_refused_in_one_line():
    listing = OptOutList(model="mobilefacenet", model_sha256="ab" * 32)
    with pytest.raises(FacecapError) as error:
        listing.check_model("arcface.onnx", "cd" * 32, "this run")
    text = str(error.value)
    assert "mobilefacenet" in text and "arcface.onnx" in text and "\n" not in text
    listing.check_model("mobilefacenet", "ab" * 32)  # the same model passes


@pytest.mark.parametrize(
    ("content", "message"),
    [("not json", "not readable as JSON"), ('{"a": 1}', "not a facecap opt-out list"),
     ('{"format": "facecap-optout-list", "version": 9}', "version 9")],
)  # fmt: skip
def test_a_file_that_is_not_a_list_is_refused(tmp_path, content, message):
    (tmp_path / "list.json").write_text(content)
    with pytest.raises(ConfigError, match=message):
        OptOutList.load(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="no such file"):
        OptOutList.load(tmp_path / "missing.json")


def test_match_takes_the_best_photo_of_each_person_and_the_threshold():
    listing = OptOutList(model="m", model_sha256="0" * 64)
    listing.add("alice", [unit(1, 0, 0), unit(0, 1, 0)])
    listing.add("bob", [unit(0, 0, 1)])
    faces = np.stack([unit(0, 1, 0.1), unit(0.2, 0, 1), unit(1, 1, 1), unit(-1, 0, 0)])
    person, cosine = match(faces, listing, 0.9, chunk=2)
    assert person.tolist() == [0, 1, -1, -1]  # alice by her second photo; bob; nobody close enough
    assert cosine[0] > 0.99 and cosine[2] == pytest.approx(1 / np.sqrt(3), abs=1e-6)
    assert match(faces, OptOutList(model="m", model_sha256="0" * 64), 0.5)[0].tolist() == [-1] * 4


def test_the_embedding_model_comes_from_the_registry_or_a_users_onnx_file(shared, tmp_path, monkeypatch):
    name, path, sha256 = embedding_model()
    assert name == "mobilefacenet" and path.name == MODEL_FILE and len(sha256) == 64
    # A user's own model: a file name found in $FACECAP_MODELS, recorded by that name.
    assert embedding_model(MODEL_FILE)[0::2] == (MODEL_FILE, sha256)
    with pytest.raises(ConfigError, match="no such file"):
        embedding_model("arcface_r100.onnx")
    monkeypatch.setenv("FACECAP_MODELS", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(ModelMissing) as error:
        embedding_model()
    assert "mobilefacenet" in str(error.value) and "\n" not in str(error.value)
