"""The detect stage on real photos: face rows, crops, the face policy and every rejection."""

from __future__ import annotations

import io
import json
import tarfile
from fractions import Fraction
from pathlib import Path

import cv2
import insightface
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import ingest, iou, ray_executor, read_all, run

from facecap.corpus_server import CorpusServer
from facecap.pipeline.dataset import Dataset, TarShardReader
from facecap.pipeline.models import ModelMissing
from facecap.pipeline.storage import Storage
from facecap.stages.detect.stage import DetectConfig, DetectStage
from facecap.stages.download.fetch import SafetySettings
from facecap.stages.download.stage import DownloadConfig, DownloadImageSettings, DownloadStage

GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
PORTRAITS = ["deepface/img1.jpg", "deepface/img10.jpg", "deepface/img11.jpg"]
NONFACE = ["nonface/dlib_cars.jpg", "nonface/sheep.jpg"]


@pytest.fixture(scope="module")
def downloaded(tmp_path_factory, face_photos):
    """ingest + download of a group photo, three portraits and two non-face photos."""
    root = tmp_path_factory.mktemp("detect")
    served = root / "served"
    served.mkdir()
    (served / "group.jpg").write_bytes(GROUP.read_bytes())
    names = ["group.jpg"]
    for name in PORTRAITS + NONFACE:
        flat = name.replace("/", "_")
        (served / flat).write_bytes((face_photos / name).read_bytes())
        names.append(flat)
    with CorpusServer(served) as server:
        csv = root / "urls.csv"
        csv.write_text("url,caption\n" + "\n".join(f"{server.url('/files/' + n)},{n}" for n in names) + "\n")
        ingest(csv, root / "ingest", shard_size=4)
        config = DownloadConfig(safety=SafetySettings(allow_private_networks=True))
        run(DownloadStage, root / "ingest", root / "download", config=config)
        small = DownloadConfig(
            safety=SafetySettings(allow_private_networks=True),
            image=DownloadImageSettings(resize_mode="keep_ratio_largest", image_size=640),
        )
        run(DownloadStage, root / "ingest", root / "download_small", config=small)
    return root


def detect(root: Path, name: str, parent: str = "download", executor=None, **config):
    result = run(DetectStage, root / parent, root / name, config=DetectConfig(**config), executor=executor)
    assert result.ok, result.failed
    return read_all(root / name).to_pandas()


def by_source(rows):
    return {caption: group for caption, group in rows.groupby("alt_text")}


def test_faces_become_rows_with_crops_and_the_funnel_adds_up(downloaded):
    rows = detect(
        downloaded, "faces", min_score=0.8, min_face_side=20, crops=["box", "square", "aligned", "aligned112"]
    )
    groups = by_source(rows)
    group = groups["group.jpg"]
    assert len(group) == 6 and (group.status == "ok").all()
    assert sorted(group.key) == [f"{group.image_key.iloc[0]}_f{i}" for i in range(6)]
    assert (group.num_faces == 6).all() and group.is_largest.sum() == 1
    for name in PORTRAITS:
        portrait = groups[name.replace("/", "_")]
        assert len(portrait) == 1 and portrait.status.iloc[0] == "ok", portrait[["status", "error"]]
    for name in NONFACE:
        assert groups[name.replace("/", "_")].status.iloc[0] in ("detect:no_face", "detect:low_score")
    summary = Dataset(Storage(str(downloaded / "faces"))).summary()
    assert summary["rows"] == sum(summary["by_status"].values()) == 6 + 3 + 2
    assert summary["rows_in"] == 6
    manifest = Dataset(Storage(str(downloaded / "faces"))).require_manifest()
    assert {"image", "box", "square", "aligned", "aligned112"} <= set(manifest.media)


def test_boxes_landmarks_and_crops(downloaded, face_photos):
    rows = detect(
        downloaded, "faces_crops", min_score=0.8, min_face_side=20, crops=["box", "square", "aligned", "aligned112"]
    )
    ok = rows[rows.status == "ok"].set_index("key")
    portrait = ok[ok.alt_text == "deepface_img1.jpg"].iloc[0]
    width, height = 1382, 1868
    x1, y1, x2, y2 = portrait.box
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    assert portrait.face_width == pytest.approx(x2 - x1) and portrait.face_area_ratio > 0.02
    marks = np.asarray(portrait.landmarks).reshape(5, 2)
    assert ((marks[:, 0] >= x1) & (marks[:, 0] <= x2) & (marks[:, 1] >= y1) & (marks[:, 1] <= y2)).all()
    assert marks[0, 1] < marks[3, 1] and marks[1, 1] < marks[4, 1]  # eyes above the mouth
    assert portrait.detector == "yunet" and len(portrait.detector_sha256) == 64
    with TarShardReader(Storage(str(downloaded / "faces_crops")), "part-00000.tar") as tar:
        crops = tar.get(portrait.name)
    assert set(crops) == {"box.jpg", "square.jpg", "aligned.jpg", "aligned112.jpg"}
    sizes = {
        ext: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape[:2] for ext, data in crops.items()
    }
    assert sizes["square.jpg"] == (512, 512) and sizes["aligned.jpg"] == (512, 512)
    assert sizes["aligned112.jpg"] == (112, 112)
    assert sizes["box.jpg"] == (round(y2) - round(y1), round(x2) - round(x1))


def test_boxes_are_in_original_pixels_when_the_download_resized(downloaded):
    full = detect(downloaded, "faces_full", min_score=0.8, min_face_side=20)
    small = detect(downloaded, "faces_small", parent="download_small", min_score=0.8, min_face_side=20)
    a = full[(full.alt_text == "deepface_img1.jpg") & (full.status == "ok")].iloc[0]
    b = small[(small.alt_text == "deepface_img1.jpg") & (small.status == "ok")].iloc[0]
    assert b.width <= 640 and a.width == 1382
    # Detection at another resolution moves a box a little; unscaled boxes would be 2.2x smaller.
    assert np.allclose(a.box, b.box, atol=0.06 * 1382)


@pytest.mark.parametrize(
    "config, image, status",
    [
        ({"min_score": 0.99999}, "deepface_img10.jpg", "detect:low_score"),
        ({"min_score": 0.8, "min_face_side": 5000}, "deepface_img10.jpg", "detect:face_too_small"),
        (
            {"min_score": 0.8, "min_face_side": 20, "min_relative_area": 0.9},
            "deepface_img11.jpg",
            "detect:face_too_small",
        ),
        ({"min_score": 0.8, "min_face_side": 20, "multi_face": "reject"}, "group.jpg", "detect:multi_face"),
        ({"min_score": 0.8, "min_face_side": 20, "max_faces": 3}, "group.jpg", "detect:multi_face"),
    ],
)
def test_policy_rejections_say_why(downloaded, config, image, status, request):
    rows = detect(downloaded, f"policy_{request.node.callspec.id}", **config)
    row = rows[rows.alt_text == image]
    assert len(row) == 1 and row.status.iloc[0] == status
    assert row.error.iloc[0]


def test_largest_keeps_one_face_per_image(downloaded):
    rows = detect(downloaded, "largest", min_score=0.8, min_face_side=20, multi_face="largest")
    group = rows[rows.alt_text == "group.jpg"]
    assert len(group) == 1 and group.is_largest.iloc[0] and group.num_faces.iloc[0] == 6


def test_undecodable_images_from_an_img2dataset_folder(tmp_path, face_photos):
    folder = tmp_path / "i2d"
    folder.mkdir()
    keys = ["000000000", "000000001"]
    pq.write_table(
        pa.table(
            {
                "key": keys,
                "url": ["http://a.example/0.jpg", "http://a.example/1.jpg"],
                "caption": ["good", "broken"],
                "status": ["success", "success"],
                "error_message": [None, None],
            }
        ),
        folder / "00000.parquet",
    )
    payloads = [(face_photos / PORTRAITS[1]).read_bytes(), b"\xff\xd8 not really a jpeg"]
    with tarfile.open(folder / "00000.tar", "w") as tar:
        for key, data in zip(keys, payloads, strict=True):
            for ext, body in (("jpg", data), ("json", json.dumps({"key": key}).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    ingest(folder, tmp_path / "ingest")
    rows = detect(tmp_path, "faces", parent="ingest", min_score=0.8, min_face_side=20)
    by_caption = dict(zip(rows.alt_text, rows.status, strict=True))
    assert by_caption == {"good": "ok", "broken": "detect:undecodable"}


@pytest.mark.slow
def test_detect_on_ray_as_an_actor_pool(downloaded, ray_local):
    rows = detect(downloaded, "faces_ray", executor=ray_executor(), min_score=0.8, min_face_side=20)
    assert (rows.status == "ok").sum() == 9


def test_other_detectors_and_missing_models(downloaded, shared, monkeypatch):
    monkeypatch.setenv("FACECAP_MODELS", str(shared / "models"))
    for detector in ("scrfd", "retinaface"):
        rows = detect(downloaded, f"faces_{detector}", detector=detector, min_score=0.7, min_face_side=20)
        group = rows[rows.alt_text == "group.jpg"]
        assert (group.status == "ok").sum() == 6, detector
        assert group.detector_model.iloc[0] in ("scrfd-500m", "retinaface-mnet025")
    monkeypatch.setenv("FACECAP_MODELS", str(downloaded / "nowhere"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(downloaded / "empty-cache"))
    with pytest.raises(ModelMissing, match="facecap models pull scrfd-500m"):
        run(DetectStage, downloaded / "download", downloaded / "faces_missing", config=DetectConfig(detector="scrfd"))
    assert not (downloaded / "faces_missing").exists()


def test_default_score_floor_is_the_detectors_equivalent_of_facecaptions(downloaded):
    assert DetectConfig().score_floor() == 0.85
    assert DetectConfig(detector="retinaface").score_floor() == 0.98
    assert DetectConfig(detector="scrfd", min_score=0.5).score_floor() == 0.5
    rows = detect(downloaded, "defaults", min_face_side=20)
    assert (rows[rows.alt_text == "group.jpg"].status == "ok").sum() == 6
    assert rows[rows.alt_text == "deepface_img10.jpg"].status.iloc[0] == "ok"


def test_default_crops_are_the_square_and_the_112_alignment(downloaded):
    detect(downloaded, "default_crops", min_score=0.8, min_face_side=20)
    manifest = Dataset(Storage(str(downloaded / "default_crops"))).require_manifest()
    assert {"square", "aligned112"} <= set(manifest.media) and "box" not in manifest.media
    detect(downloaded, "no_crops", min_score=0.8, min_face_side=20, crops=[])
    assert not (downloaded / "no_crops" / "part-00000.tar").exists()


def test_crops_from_a_reduced_decode_match_full_resolution_crops(face_photos):
    """Crops come from the coarsest decode that keeps their detail: the same pixels, within JPEG noise."""
    from facecap.stages.detect.align import aligned_crop, square_crop
    from facecap.stages.detect.decode import StoredImage
    from facecap.stages.detect.detectors import Face
    from facecap.stages.detect.stage import _crop_plan

    data = (face_photos / "deepface/img1.jpg").read_bytes()  # 1382 x 1868
    stored = StoredImage.open(data, 640)
    assert stored.factor[0] > 2.5  # detection works on a 3/8-scale decode (701 px)
    detector = DetectStage(DetectConfig(min_score=0.5, min_face_side=20))
    detector.setup()
    [face] = [f.scaled(*stored.factor) for f in detector.detector.detect_batch([stored.pixels])[0]][:1]
    limit, _ = _crop_plan(face, detector.config)
    assert limit > 2  # an 800 px square for a 512 crop: a 1/2-scale decode has every detail needed
    assert 0 < stored.crop_scale(limit) <= Fraction(1, 2)  # detection's 3/8 has not; full scale is not needed
    [(crops, _)] = detector._crops(stored, [Face(face.box, face.score, face.landmarks)])
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    expected = {
        "square": square_crop(full, face.box, 1.5, 512)[0],
        "aligned112": aligned_crop(full, face.landmarks, 112),
    }
    for name, reference in expected.items():
        got = cv2.imdecode(np.frombuffer(crops[name], np.uint8), cv2.IMREAD_COLOR)
        assert got.shape == reference.shape
        assert cv2.PSNR(got, reference) > 30, name


@pytest.mark.parametrize("width", [800, 1100, 1279, 2400])
def test_the_detection_view_finds_the_faces_the_detector_finds_in_the_full_image(width):
    """The stage shrinks a decode for the detector itself (bilinear below 1.5x, area above)."""
    from facecap.stages.detect.decode import StoredImage

    group = cv2.imread(str(GROUP))
    image = cv2.resize(group, (width, round(group.shape[0] * width / group.shape[1])), interpolation=cv2.INTER_CUBIC)
    data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    view, factor = StoredImage.open(data, 640).detection_view(640)
    assert max(view.shape[:2]) == 640
    stage = DetectStage(DetectConfig())
    stage.setup()
    ours = [face.scaled(*factor) for face in stage.detector.detect(view)]
    reference = stage.detector.detect(image)  # the detector's own INTER_AREA downscale
    assert len(ours) == len(reference) >= 6
    for face in reference:
        assert max(iou(face.box, other.box) for other in ours) > 0.85


def _enlarged_group(scale: float) -> bytes:
    group = cv2.imread(str(GROUP))
    size = (round(group.shape[1] * scale), round(group.shape[0] * scale))
    return cv2.imencode(".jpg", cv2.resize(group, size, interpolation=cv2.INTER_CUBIC), [cv2.IMWRITE_JPEG_QUALITY, 95])[
        1
    ].tobytes()


def _faces_and_crops(stage: DetectStage, data: bytes) -> tuple[list, list]:
    from facecap.stages.detect.decode import StoredImage

    stored = StoredImage.open(data, stage.config.max_side)
    view, factor = stored.detection_view(stage.config.max_side)
    faces = [face.scaled(*factor) for face in stage.detector.detect(view) if face.score >= 0.8]
    return faces, stage._crops(stored, faces)


def test_full_resolution_crops_come_from_a_region_decode_with_the_same_pixels(monkeypatch):
    """Crops that need every pixel decode only the faces' region: the same crops as from a whole decode."""
    from facecap.stages.detect import decode as detect_module
    from facecap.stages.detect.align import aligned_crop, box_crop, square_crop

    data = _enlarged_group(2.5)  # 3200 px wide: faces of 150-250 px, detected at 1/4 scale
    stage = DetectStage(DetectConfig(crops=["box", "square", "aligned", "aligned112"]))
    stage.setup()
    regions = []
    decode = detect_module.turbojpeg().decode
    monkeypatch.setattr(
        detect_module.TurboJpeg,
        "decode",
        lambda self, d, scale=1, region=None: regions.append(region) or decode(d, scale, region),
    )
    faces, crops = _faces_and_crops(stage, data)
    assert len(faces) == 6
    assert len([r for r in regions if r is not None]) == 1  # one region for all six faces
    x1, y1, x2, y2 = regions[-1]
    assert (x2 - x1) * (y2 - y1) < 0.6 * 3200 * 2140  # less than the whole photo
    full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    for face, (ours, _) in zip(faces, crops, strict=True):
        expected = {
            "box": box_crop(full, face.box)[0],
            "square": square_crop(full, face.box, 1.5, 512)[0],
            "aligned": aligned_crop(full, face.landmarks, 512),
            "aligned112": aligned_crop(full, face.landmarks, 112),
        }
        for name, reference in expected.items():
            got = cv2.imdecode(np.frombuffer(ours[name], np.uint8), cv2.IMREAD_COLOR)
            assert got.shape == reference.shape, name
            assert cv2.PSNR(got, reference) > 35, name  # the crop's own JPEG encode is the difference


def test_without_turbojpeg_opencv_decodes_the_same_faces_and_crops(monkeypatch):
    from facecap.stages.detect import decode as detect_module

    data = _enlarged_group(1.6)  # 2048 px: detected from a reduced decode either way
    stage = DetectStage(DetectConfig(crops=["square", "aligned112"]))
    stage.setup()
    faces, crops = _faces_and_crops(stage, data)
    monkeypatch.setattr(detect_module, "turbojpeg", lambda: None)
    faces_cv, crops_cv = _faces_and_crops(stage, data)
    assert len(faces) == len(faces_cv) == 6
    for face in faces:
        assert max(iou(face.box, other.box) for other in faces_cv) > 0.9
    nearest = [max(range(6), key=lambda j: iou(face.box, faces_cv[j].box)) for face in faces]
    for (ours, _), j in zip(crops, nearest, strict=True):
        for name in ("square", "aligned112"):
            got, reference = (
                cv2.imdecode(np.frombuffer(c[name], np.uint8), cv2.IMREAD_COLOR) for c in (ours, crops_cv[j][0])
            )
            assert cv2.PSNR(got, reference) > 25, name  # boxes differ by a pixel or two


@pytest.mark.parametrize("orientation", [6, 3])
def test_an_exif_rotated_jpeg_is_detected_upright(orientation):
    """Boxes are in the upright image's pixels, as OpenCV shows it (libjpeg alone would not turn it)."""
    from PIL import Image

    from facecap.stages.detect.decode import StoredImage

    group = cv2.imread(str(GROUP))
    big = cv2.resize(group, (group.shape[1] * 2, group.shape[0] * 2), interpolation=cv2.INTER_CUBIC)
    # Stored turned back, with the EXIF tag that turns it upright again.
    stored_pixels = cv2.rotate(big, cv2.ROTATE_90_COUNTERCLOCKWISE if orientation == 6 else cv2.ROTATE_180)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(cv2.cvtColor(stored_pixels, cv2.COLOR_BGR2RGB)).save(buffer, "JPEG", quality=95, exif=exif)
    data = buffer.getvalue()
    stored = StoredImage.open(data, 640)
    assert stored.size == (big.shape[1], big.shape[0])
    stage = DetectStage(DetectConfig(crops=["square"]))
    stage.setup()
    faces, crops = _faces_and_crops(stage, data)
    reference = stage.detector.detect(big)
    assert len(faces) == 6
    for face in faces:
        assert max(iou(face.box, other.box) for other in reference) > 0.85
    for ours, _ in crops:
        assert cv2.imdecode(np.frombuffer(ours["square"], np.uint8), cv2.IMREAD_COLOR).shape == (512, 512, 3)


def test_a_cmyk_jpeg_is_decoded_by_opencv(face_photos):
    from PIL import Image

    from facecap.stages.detect.decode import StoredImage

    buffer = io.BytesIO()
    Image.open(face_photos / PORTRAITS[0]).convert("CMYK").save(buffer, "JPEG", quality=95)
    stored = StoredImage.open(buffer.getvalue(), 640)
    assert stored is not None and stored.turbo is None
    assert stored.size == (1382, 1868) and stored.pixels.shape[2] == 3
