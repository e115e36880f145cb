"""Face crops: ArcFace alignment (synthetic dots and real faces), tight box and enlarged square crops."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from facecap.stages.detect.align import (
    ARCFACE_TEMPLATE_112,
    aligned_crop,
    alignment_matrix,
    box_crop,
    similarity_transform,
    square_crop,
)
from facecap.stages.detect.detectors import make_detector


def similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    angle = np.deg2rad(angle_deg)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return np.hstack([rotation, np.array(shift)[:, None]])


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def blob(shape: tuple[int, int], centre: np.ndarray, sigma: float) -> np.ndarray:
    """A BGR image with one Gaussian spot at a sub-pixel centre."""
    ys, xs = np.mgrid[: shape[0], : shape[1]]
    spot = 255 * np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma**2))
    return np.repeat(spot.round().astype(np.uint8)[:, :, None], 3, axis=2)


def centroid(image: np.ndarray) -> np.ndarray:
    weights = image[:, :, 0].astype(float)
    ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
    return np.array([(xs * weights).sum(), (ys * weights).sum()]) / weights.sum()


@pytest.fixture(scope="module")
def t1_faces(shared: Path):
    image = cv2.imread(str(shared / "data" / "faces" / "insightface" / "t1.jpg"))
    model = shared / "models" / "retinaface_mobilenet0.25_photo_analyze.onnx"
    faces = make_detector("retinaface", model, use_gpu=False).detect(image)
    assert len(faces) == 6
    return image, faces


def test_similarity_transform_recovers_a_known_one():
    truth = similarity(-23.0, 2.7, (140.0, 61.5))
    points = ARCFACE_TEMPLATE_112.astype(np.float64)
    assert np.allclose(similarity_transform(points, apply(truth, points)), truth, atol=1e-9)


@pytest.mark.parametrize("mirrored", [False, True])
def test_similarity_transform_is_the_least_squares_fit_of_noisy_points(mirrored):
    """Against a generic solver over (a, b, tx, ty); mirrored landmarks get the best rotation, never a flip."""
    rng = np.random.default_rng(7)
    for _ in range(50):
        src = rng.normal(0, 80, (5, 2))
        dst = apply(similarity(rng.uniform(-180, 180), rng.uniform(0.2, 5), (30.0, -8.0)), src)
        dst += rng.normal(0, 6, dst.shape)
        if mirrored:
            dst[:, 0] *= -1
        design = np.zeros((10, 4))
        design[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)])
        design[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(5), np.ones(5)])
        (a, b, tx, ty), *_ = np.linalg.lstsq(design, dst.reshape(-1), rcond=None)
        assert np.allclose(similarity_transform(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


@pytest.mark.parametrize("size", [112, 512])
def test_aligned_crop_puts_landmarks_on_the_template(size):
    """A spot at each landmark of a rotated, scaled, shifted face lands on its template point."""
    truth = similarity(31.0, 3.1, (250.0, 90.0))
    landmarks = apply(truth, ARCFACE_TEMPLATE_112.astype(np.float64)).astype(np.float32)
    template = ARCFACE_TEMPLATE_112 * size / 112
    for point, target in zip(landmarks, template, strict=True):
        crop = aligned_crop(blob((700, 700), point, sigma=8.0), landmarks, size)
        assert crop.shape == (size, size, 3) and crop.dtype == np.uint8
        assert np.linalg.norm(centroid(crop) - target) < 0.25  # measured: under 0.01 px
    warped = apply(alignment_matrix(landmarks, size), landmarks)
    assert np.abs(warped - template).max() < 1e-3


def test_aligned_crop_of_real_faces_is_the_least_squares_fit(t1_faces):
    """Real faces are not the template: the fit is the best similarity, and eyes land near theirs."""
    image, faces = t1_faces
    errors = []
    for face in faces:
        matrix = alignment_matrix(face.landmarks, 112)
        error = np.linalg.norm(apply(matrix, face.landmarks) - ARCFACE_TEMPLATE_112, axis=1)
        # No face matches the template: t1's turned heads leave 2.5-8 px mean residuals at 112 px.
        assert error.mean() < 10
        errors.append(error.mean())
        for method in (cv2.LMEDS, cv2.RANSAC):
            other, _ = cv2.estimateAffinePartial2D(face.landmarks, ARCFACE_TEMPLATE_112, method=method)
            other_error = np.linalg.norm(apply(other, face.landmarks) - ARCFACE_TEMPLATE_112, axis=1)
            assert (error**2).sum() <= (other_error**2).sum() + 1e-6
        crop = aligned_crop(image, face.landmarks, 112)
        assert np.array_equal(crop, cv2.warpAffine(image, matrix, (112, 112), borderValue=0))
    assert np.median(errors) < 5


@pytest.mark.filterwarnings("ignore::FutureWarning")  # scikit-image deprecates what insightface calls
def test_aligned_crop_matches_insightface(t1_faces):
    face_align = pytest.importorskip("insightface.utils.face_align")  # needs scikit-image
    _, faces = t1_faces
    for face in faces:
        for size in (112, 224):
            expected = face_align.estimate_norm(face.landmarks, size)
            assert np.allclose(alignment_matrix(face.landmarks, size), expected, atol=1e-3)


def test_aligned_crop_outside_the_image_is_black():
    image = np.full((300, 300, 3), 200, np.uint8)
    landmarks = ARCFACE_TEMPLATE_112 * 2 - 60  # the face's top left lies outside the image
    crop = aligned_crop(image, landmarks, 224)
    assert crop[0, 0].tolist() == [0, 0, 0]
    assert crop[-1, -1].tolist() == [200, 200, 200]


def test_box_crop_inside_is_the_exact_pixels(t1_faces):
    image, faces = t1_faces
    crop, padded = box_crop(image, faces[0].box)
    x1, y1, x2, y2 = (round(float(v)) for v in faces[0].box)
    assert not padded
    assert crop.shape == (y2 - y1, x2 - x1, 3)
    assert np.array_equal(crop, image[y1:y2, x1:x2])


def test_box_crop_at_the_edge_is_padded_black():
    image = np.full((100, 200, 3), 200, np.uint8)
    crop, padded = box_crop(image, np.array([-10.2, 80.4, 29.6, 130.0], np.float32))
    assert padded
    assert crop.shape == (50, 40, 3)  # rounded box: x -10..30, y 80..130
    assert (crop[:, :10] == 0).all() and (crop[20:, :] == 0).all()
    assert (crop[:20, 10:] == 200).all()


def test_box_crop_of_a_degenerate_box_has_a_pixel():
    crop, padded = box_crop(np.full((10, 10, 3), 9, np.uint8), np.array([4.2, 4.2, 4.3, 4.3]))
    assert crop.shape == (1, 1, 3) and not padded


def test_square_crop_is_centred_enlarged_and_resized():
    image = np.zeros((1000, 1000, 3), np.uint8)
    image[400:600, 450:550] = 255  # the "face": 100 wide, 200 high
    crop, padded = square_crop(image, np.array([450, 400, 550, 600], np.float32), scale=1.5, size=512)
    assert not padded and crop.shape == (512, 512, 3)
    # A 300 px square around (500, 500): the face spans 1/3 of the width and 2/3 of the height.
    ys, xs = np.nonzero(crop[:, :, 0] > 127)
    assert abs(xs.min() - 512 / 3) <= 2 and abs(xs.max() + 1 - 2 * 512 / 3) <= 2
    assert abs(ys.min() - 512 / 6) <= 2 and abs(ys.max() + 1 - 5 * 512 / 6) <= 2


def test_square_crop_at_the_edge_is_padded_black():
    image = np.full((400, 400, 3), 200, np.uint8)
    crop, padded = square_crop(image, np.array([0, 0, 100, 100], np.float32), scale=2.0, size=200)
    assert padded and crop.shape == (200, 200, 3)
    # The 200 px square spans -50..150: its first quarter rows and columns lie outside.
    assert (crop[:45, :] == 0).all() and (crop[:, :45] == 0).all()
    assert (crop[55:, 55:] == 200).all()


def test_square_crop_of_a_real_face(t1_faces):
    image, faces = t1_faces
    crop, padded = square_crop(image, faces[0].box, size=256)
    assert crop.shape == (256, 256, 3) and not padded
    assert crop.std() > 10  # a face, not padding
