"""``facecap tag train``: CelebA-format data in, a model the tag stage's celeba backend uses out.

The training data is a CelebA-format folder made here from the labelled shared photos: each photo
centre-cropped to CelebA's 178x218 aspect and resized. ``Male`` comes from the identity label
(the people named there, e.g. barack_obama, angelina_jolie); ``Bald`` is -1 for everyone (so val
has no positives and its fallback threshold is used); the other 38 attributes are random (seeded)
and mean nothing. The point is the machinery, not accuracy.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import detected_faces, read_all
from typer.testing import CliRunner

from facecap.cli import app
from facecap.pipeline import models
from facecap.stages.tag import train as train_module
from facecap.stages.tag.celeba_data import open_celeba
from facecap.stages.tag.learned import InputTransform, celeba_input, celeba_resnet50
from facecap.stages.tag.schema import CELEBA40
from facecap.stages.tag.train import choose_threshold

MEN = {
    "barack_obama", "john_salley", "john_savage", "john_schneider", "john_shimkus", "john_simm", "joe_biden",
    "alex_lacamoire", "kit_harington", "rob_lowe", "lin_manuel_miranda", "tom_cruise", "tom_hanks", "inspireface_kun",
}  # fmt: skip
WOMEN = {
    "angelina_jolie", "rose_leslie", "nathalie_baye", "mary_katherine_smart", "teresa_williams", "inspireface_yifei",
}  # fmt: skip
TINY = ["--image-size", "32", "--batch-size", "8", "--limit", "16", "--seed", "0"]  # ResNet-50: seconds an epoch


def celeba_like(photo: np.ndarray) -> np.ndarray:
    """The centre of ``photo`` at CelebA's 178x218 aspect, resized to 178x218."""
    height, width = photo.shape[:2]
    if width / height > 178 / 218:
        crop = round(height * 178 / 218)
        photo = photo[:, (width - crop) // 2 : (width - crop) // 2 + crop]
    else:
        crop = round(width * 218 / 178)
        photo = photo[(height - crop) // 2 : (height - crop) // 2 + crop]
    return cv2.resize(photo, (178, 218), interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def celeba(tmp_path_factory, face_photos) -> Path:
    """A CelebA release in its standard layout from the identity-labelled shared photos."""
    root = tmp_path_factory.mktemp("celeba")
    (root / "img_align_celeba").mkdir()
    with (face_photos / "images.csv").open() as f:
        labelled = [r for r in csv.DictReader(f) if r["identity"] in MEN | WOMEN]
    rng = np.random.default_rng(7)
    attributes, partitions = [], []
    for number, row in enumerate(labelled, start=1):
        name = f"{number:06d}.jpg"
        photo = cv2.imread(str(face_photos / row["file"]), cv2.IMREAD_COLOR)
        cv2.imwrite(str(root / "img_align_celeba" / name), celeba_like(photo))
        values = rng.choice([-1, 1], size=len(CELEBA40))
        values[CELEBA40.index("Male")] = 1 if row["identity"] in MEN else -1
        values[CELEBA40.index("Bald")] = -1
        attributes.append(f"{name} " + " ".join(f"{v:2d}" for v in values))
        partitions.append(f"{name} {[0, 0, 0, 1, 2][number % 5]}")
    header = f"{len(labelled)}\n" + " ".join(CELEBA40) + "\n"
    (root / "list_attr_celeba.txt").write_text(header + "\n".join(attributes) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(partitions) + "\n")
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_the_release_folder_and_its_parquet_twin_read_the_same(celeba, tmp_path):
    splits = open_celeba(celeba)
    assert {name: len(s) for name, s in splits.items()} == {"train": 62, "val": 21, "test": 21}
    male = splits["train"].labels[:, CELEBA40.index("Male")]
    assert 0 < male.mean() < 1 and splits["val"].labels[:, CELEBA40.index("Bald")].sum() == 0
    table = {"image": [], "file": [], "partition": [], **{a: [] for a in CELEBA40}}
    for number, split in enumerate(("train", "val", "test")):
        for i, file in enumerate(splits[split].files):
            table["image"].append((celeba / "img_align_celeba" / file).read_bytes())
            table["file"].append(file)
            table["partition"].append(number)
            for a, value in zip(CELEBA40, splits[split].labels[i], strict=True):
                table[a].append(1 if value else -1)
    pq.write_table(pa.table(table), tmp_path / "celeba.parquet")
    again = open_celeba(tmp_path / "celeba.parquet", limit=5)
    assert again["test"].files == splits["test"].files[:5]
    assert np.array_equal(again["test"].labels, splits["test"].labels[:5])
    assert np.array_equal(again["val"].image(2), splits["val"].image(2))


def test_thresholds_reach_the_target_precision_and_fall_back_sensibly():
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.3, 0.2])
    labels = np.array([1, 1, 0, 1, 0, 0, 1])
    threshold, how = choose_threshold(scores, labels, 0.75)  # top 4: 3 of 4 right
    assert 0.6 < threshold < 0.7 and "precision" in how
    assert ((scores > threshold) & (labels == 1)).sum() / (scores > threshold).sum() >= 0.75
    assert choose_threshold(scores, labels, 1.0)[0] > 0.8  # only the top two are sure
    assert choose_threshold(scores, np.zeros(7), 0.85) == (0.5, "0.5: no positives in val")
    assert choose_threshold(scores, np.ones(7), 0.85) == (0.5, "0.5: no negatives in val")
    low, how = choose_threshold(np.array([0.9, 0.8, 0.1]), np.array([0, 1, 0]), 0.9)  # the best is 1 of 2
    assert "balanced acc." in how and 0.1 < low < 0.8


@pytest.mark.slow
def test_resnet50_trains_resumes_after_an_interrupt_and_exports_a_matching_onnx(celeba, tmp_path, monkeypatch):
    out = tmp_path / "r50"
    fit = train_module.ResnetTrainer.fit_epoch
    calls = []

    def interrupted_in_epoch_two(self, *args):
        calls.append(args[-1])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return fit(self, *args)

    monkeypatch.setattr(train_module.ResnetTrainer, "fit_epoch", interrupted_in_epoch_two)
    result = invoke("tag", "train", str(celeba), str(out), "--epochs", "3", *TINY)
    assert result.exit_code == 130, result.output
    assert "rerun the same command to resume" in result.output
    first = json.loads((out / "train.json").read_text())
    assert first["files"] == ["checkpoint.pt"] and not (out / "model.onnx").exists()
    monkeypatch.setattr(train_module.ResnetTrainer, "fit_epoch", fit)

    result = invoke("tag", "train", str(celeba), str(out), "--epochs", "3", *TINY)
    assert result.exit_code == 0, result.output
    assert "resuming at epoch 2 of 3" in result.output and "epoch 1/3: train loss" not in result.output
    card = json.loads((out / "model.card.json").read_text())
    losses = [e["loss"] for e in card["training"]["history"]]
    assert [e["epoch"] for e in card["training"]["history"]] == [1, 2, 3]
    assert losses[2] < losses[0], losses  # the training loss falls
    assert card["onnx"]["sha256"] == models.sha256_of(out / "model.onnx")
    assert card["input_transform"]["size"] == 32 and card["attributes"] == list(CELEBA40)
    assert card["thresholds"]["Bald"] == 0.5 and card["threshold_sources"]["Bald"] == "0.5: no positives in val"
    assert set(card["metrics"]["attributes"]) == set(CELEBA40) and card["data"]["images"]["test"] == 16
    assert "balanced acc." in result.output and "Wearing_Necktie" in result.output  # the rich table

    # The ONNX export computes what the trained torch model computes.
    import onnxruntime
    import torch

    model = celeba_resnet50()
    model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=False)["model"])
    splits = open_celeba(celeba)
    batch = celeba_input([splits["test"].image(i) for i in range(4)], InputTransform(size=32))
    with torch.no_grad():
        expected = model.eval()(torch.from_numpy(batch)).numpy()
    got = onnxruntime.InferenceSession(str(out / "model.onnx")).run(None, {"input": batch})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)

    # The same command again has nothing left to do; other settings are refused.
    again = invoke("tag", "train", str(celeba), str(out), "--epochs", "3", *TINY)
    assert again.exit_code == 0 and "nothing to do" in again.output
    other = invoke("tag", "train", str(celeba), str(out), "--epochs", "3", *TINY, "--lr", "0.01")
    assert other.exit_code == 2 and "other settings (lr: 0.0003 -> 0.01)" in other.output


@pytest.mark.slow
def test_clip_probe_exports_encoder_and_probe_as_one_graph(celeba, tmp_path):
    import onnxruntime
    import torch

    refused = invoke("tag", "train", str(celeba), str(tmp_path / "none"), "--model", "clip-probe")
    assert refused.exit_code == 2 and "--clip-pretrained" in refused.output
    out = tmp_path / "probe"
    args = ["--model", "clip-probe", "--clip-model", "ViT-S-32", "--clip-random-weights", "--epochs", "4"]
    result = invoke(
        "tag", "train", str(celeba), str(out), *args, "--limit", "8", "--batch-size", "8", "--lr", "0.01", "-q"
    )
    assert result.exit_code == 0, result.output
    card = json.loads((out / "model.card.json").read_text())
    losses = [e["loss"] for e in card["training"]["history"]]
    assert losses[-1] < losses[0], losses
    assert card["architecture"].startswith("clip-probe: open_clip ViT-S-32") and "RANDOM" in card["init"]
    assert card["input_transform"]["size"] == 224 and card["input_transform"]["mean"][0] == pytest.approx(0.4815, 1e-3)
    assert sorted(p.name for p in out.glob("features-*.npy")) == ["features-test.npy", "features-train.npy",
                                                                   "features-val.npy"]  # fmt: skip

    # The graph that was exported (encoder + probe) against onnxruntime on the exported file.
    settings = train_module.TrainSettings(model="clip-probe", clip_model="ViT-S-32", clip_random_weights=True)
    torch.manual_seed(0)  # train() seeds before building the model: the same random encoder
    trainer = train_module.ProbeTrainer(settings, "cpu")
    trainer.load(torch.load(out / "checkpoint.pt", weights_only=False))
    splits = open_celeba(celeba)
    batch = celeba_input([splits["val"].image(i) for i in range(3)], trainer.transform)
    with torch.no_grad():
        expected = trainer.graph()(torch.from_numpy(batch)).numpy()
    got = onnxruntime.InferenceSession(str(out / "model.onnx")).run(None, {"input": batch})[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_overwrite_removes_only_what_training_wrote(tmp_path):
    from facecap.stages.tag.train import TrainError, _prepare_output

    out = tmp_path / "out"
    first = {"settings": {"lr": 0.001}, "data": {}}
    state = _prepare_output(out, first, overwrite=False)
    for name in ("checkpoint.pt", "model.onnx"):
        (out / name).write_text("written by training")
        state["files"].append(name)
    (out / "train.json").write_text(json.dumps(state))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(TrainError, match=r"other settings \(lr: 0.001 -> 0.01\).*--overwrite"):
        _prepare_output(out, {"settings": {"lr": 0.01}, "data": {}}, overwrite=False)
    assert _prepare_output(out, first, overwrite=False)["files"] == ["checkpoint.pt", "model.onnx"]  # same: resume
    fresh = _prepare_output(out, {"settings": {"lr": 0.01}, "data": {}}, overwrite=True)
    assert fresh["files"] == [] and sorted(p.name for p in out.iterdir()) == ["notes.txt", "train.json"]
    # Files of the same names that training did not write are never replaced, --overwrite or not.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.onnx").write_text("someone else's")
    with pytest.raises(TrainError, match=r"model\.onnx that facecap tag train did not write"):
        _prepare_output(foreign, first, overwrite=True)
    assert (foreign / "model.onnx").read_text() == "someone else's"


def test_a_folder_without_the_attribute_list_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "celeba" / "img_align_celeba").mkdir(parents=True)
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text("000001.jpg 0\n")
    result = invoke("tag", "train", str(tmp_path / "celeba"), str(tmp_path / "out"))
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "missing list_attr_celeba.txt" in result.output
    assert not (tmp_path / "out").exists()


def test_tag_help_still_runs_the_stage_and_names_train():
    result = invoke("tag", "--help")
    assert result.exit_code == 0 and "--backends" in result.output and "facecap tag train" in result.output
    result = invoke("tag", "train", "--help")
    assert result.exit_code == 0 and "--target-precision" in result.output and "--min-confident" not in result.output


@pytest.fixture(scope="module")
def trained(celeba, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained") / "model"
    args = ["--limit", "6", "--epochs", "1", "--image-size", "32", "--batch-size", "6", "--target-precision", "0.6"]
    result = invoke("tag", "train", str(celeba), str(out), *args, "-q")
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
def test_the_tag_stage_uses_the_cards_transform_and_thresholds(trained, tmp_path, face_photos, monkeypatch):
    names = ("deepface/img1.jpg", "face_recognition/obama.jpg")
    photos = {name.replace("/", "_"): (face_photos / name).read_bytes() for name in names}
    faces = detected_faces(tmp_path, photos, shard_size=2)
    card = json.loads((trained / "model.card.json").read_text())
    thresholds = card["thresholds"]
    assert len(set(thresholds.values())) > 2  # per attribute, not one number

    def tag(checkpoint: str, out: str, keep: int = 0):
        args = ["tag", str(faces / "detect"), str(tmp_path / out), "--backends", "celeba", "--min-confident", str(keep)]
        result = invoke(*args, "--set", f"tag.celeba_checkpoint={checkpoint}", "--executor", "local")
        assert result.exit_code == 0, result.output
        rows = read_all(tmp_path / out).to_pandas()
        return rows[rows.key.str.contains("_f")]

    rows = tag(str(trained / "model.onnx"), "tagged")
    assert len(rows) == 2
    for _, row in rows.iterrows():
        expected = [a for a in CELEBA40 if row[f"attr_{a}"] > thresholds[a]]
        assert list(row.confident_attributes) == expected
    strict = tag(str(trained / "model.onnx"), "strict", keep=40)
    assert (strict.status == "tag:too_few_attributes").all() and strict.error.str.contains("their thresholds").all()
    # The same model under a registry name (what a stage folder's models.yaml would declare).
    onnx = trained / "model.onnx"
    spec = models.ModelSpec(
        name="celeba-test-r50", file="model.onnx", sha256=card["onnx"]["sha256"], size=onnx.stat().st_size,
        task="CelebA-40", inputs="input", outputs="logits", licence="test", source="facecap tag train",
    )  # fmt: skip
    monkeypatch.setitem(models.REGISTRY, spec.name, spec)
    monkeypatch.setenv("FACECAP_MODELS", str(trained))
    by_name = tag(spec.name, "by_name")
    assert list(by_name.confident_attributes.map(list)) == list(rows.confident_attributes.map(list))
    # A card that does not belong to the file is refused.
    (trained / "model.card.json").write_text(json.dumps({**card, "onnx": {**card["onnx"], "sha256": "0" * 64}}))
    try:
        result = invoke("tag", str(faces / "detect"), str(tmp_path / "bad"), "--backends", "celeba", "--executor",
                        "local", "--set", f"tag.celeba_checkpoint={onnx}")  # fmt: skip
    finally:
        (trained / "model.card.json").write_text(json.dumps(card))
    assert result.exit_code != 0 and "does not match model.onnx" in result.output
