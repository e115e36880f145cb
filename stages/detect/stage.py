"""Detect and align: each downloaded image becomes one row per kept face, with crops.

Policy (FaceCaption-15M's by default in configs/default.yaml): a face counts when its score is
at least ``min_score``; it is kept when both box sides are at least ``min_face_side`` original
pixels and it covers at least ``min_relative_area`` of the image; ``multi_face`` keeps all, the
largest, or rejects images with more than one (FaceCaptionHQ-4M drops group photos), and
``max_faces`` rejects images with more confident faces than that (FaceID-6M: 3).

Statuses: ``detect:no_face``, ``detect:low_score``, ``detect:face_too_small``,
``detect:multi_face``, ``detect:undecodable``. A face row's key is ``IMAGEKEY_fN``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import Field

from facecap.pipeline import models
from facecap.pipeline.registry import register
from facecap.pipeline.stage import Batch, Output, Resources, Stage, StageConfig, StageSpec
from facecap.pipeline.summary import Histogram
from facecap.stages.detect.align import aligned_crop, alignment_matrix, box_crop, square_crop
from facecap.stages.detect.decode import CropSource, StoredImage
from facecap.stages.detect.detectors import Face, make_detector

CropName = Literal["box", "square", "aligned", "aligned112"]
DEFAULT_MODELS = {"yunet": "yunet-int8", "scrfd": "scrfd-500m", "retinaface": "retinaface-mnet025"}
# Scores are not comparable across detectors: FaceCaption-15M's "score > 0.98" is on RetinaFace's
# scale. On the single-face fixture portraits (docs/models.md) RetinaFace scores all of them at
# >= 0.98, while YuNet's median is 0.94 and SCRFD's 0.83; these floors keep the same faces.
EQUIVALENT_MIN_SCORE = {"retinaface": 0.98, "yunet": 0.85, "scrfd": 0.7}


class DetectConfig(StageConfig):
    detector: Literal["yunet", "scrfd", "retinaface"] = "yunet"
    model: str | None = Field(None, description="registry name or .onnx path; default per detector (yunet-int8, ...)")
    threshold: float = Field(0.5, ge=0, le=1, description="the detector's own candidate threshold")
    nms_threshold: float = Field(0.4, gt=0, le=1)
    max_side: int = Field(
        640, ge=64, description="images are detected at most this large (boxes mapped back); YuNet splits big faces"
    )
    gpus: float = Field(0.0, ge=0, le=8, description="GPU share per worker; > 0 runs onnxruntime on CUDA")
    min_score: float | None = Field(
        None, ge=0, le=1, description="a face counts from this score on; default: the detector's equivalent of 0.98"
    )
    min_face_side: int = Field(128, ge=0, description="both box sides, in original pixels")
    min_relative_area: float = Field(0.0, ge=0, le=1, description="face box area / image area (FaceID-6M: 0.04)")
    multi_face: Literal["all", "largest", "reject"] = "all"
    max_faces: int | None = Field(None, ge=1, description="reject images with more confident faces")
    crops: list[CropName] = Field(
        # Each stored crop is a JPEG encode per face (about 1 ms for a 512 crop): keep the trainer
        # crop and the 112 alignment for embeddings by default; the box is in the row anyway.
        default_factory=lambda: ["square", "aligned112"],
        description="box: tight, no resize; square: 1.5x box side, 512; aligned: ArcFace 512; aligned112",
    )
    square_scale: float = Field(1.5, ge=1.0, le=4.0)
    crop_size: int = Field(512, ge=64, le=2048, description="side of the square and aligned crops")
    quality: int = Field(95, ge=1, le=100, description="JPEG quality of the crops")

    def model_name(self) -> str:
        return self.model or DEFAULT_MODELS[self.detector]

    def score_floor(self) -> float:
        return self.min_score if self.min_score is not None else EQUIVALENT_MIN_SCORE[self.detector]


# What the report plots of this stage's rows (summarized per shard by the workers).
FACE_SIDE_EDGES = (0, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1024, 1_000_000)


def face_side(rows: pd.DataFrame) -> pd.Series:
    return np.minimum(rows["face_width"], rows["face_height"])


SUMMARIES = (Histogram("face side (px)", ("face_width", "face_height"), FACE_SIDE_EDGES, face_side),)


@register
class DetectStage(Stage):
    name = "detect"
    order = 30
    help = "Find faces (YuNet, SCRFD or RetinaFace), apply the face policy, store box/square/aligned crops."
    config_model = DetectConfig
    consumes = ("key",)
    summaries = SUMMARIES
    produces: ClassVar[dict[str, pa.DataType]] = {
        "image_key": pa.string(),
        "face_index": pa.int16(),
        "box": pa.list_(pa.float32()),
        "landmarks": pa.list_(pa.float32()),
        "det_score": pa.float32(),
        "face_width": pa.float32(),
        "face_height": pa.float32(),
        "face_area_ratio": pa.float32(),
        "faces_detected": pa.int16(),
        "num_faces": pa.int16(),
        "is_largest": pa.bool_(),
        "crop_padded": pa.bool_(),
        "detector": pa.string(),
        "detector_model": pa.string(),
        "detector_sha256": pa.string(),
    }
    reads_media: ClassVar[dict[str, str]] = {"image": "key"}
    writes_media = ("box", "square", "aligned", "aligned112")
    resources = Resources(cpus=1, batch_size=32, actor=True)

    def __init__(self, config: DetectConfig):
        super().__init__(config)
        self.config: DetectConfig = config
        self.detector = None
        self.model_sha256: str | None = None

    @classmethod
    def spec(cls, config: DetectConfig) -> StageSpec:
        return StageSpec(
            resources=Resources(cpus=1, gpus=config.gpus, batch_size=32, actor=True),
            reads=dict(cls.reads_media),
            writes={name: f"{name}.jpg" for name in config.crops},
        )

    @classmethod
    def preflight(cls, config: DetectConfig) -> None:
        _model_path(config.model_name())  # a missing model fails here, once, with what to do

    def setup(self) -> None:
        path = _model_path(self.config.model_name())
        self.model_sha256 = models.sha256_of(path)
        self.detector = make_detector(
            self.config.detector,
            path,
            threshold=self.config.threshold,
            nms_threshold=self.config.nms_threshold,
            max_side=self.config.max_side,
            # Ray gives a worker a GPU only when the stage asks for a share of one.
            use_gpu=self.config.gpus > 0,
        )

    def process(self, batch: Batch) -> Output:
        records = batch.rows.to_dict("records")
        images = [StoredImage.open(batch.media_of("image", r["key"]), self.config.max_side) for r in records]
        decodable = [i for i, image in enumerate(images) if image is not None]
        views = [images[i].detection_view(self.config.max_side) for i in decodable]
        found = self.detector.detect_batch([pixels for pixels, _ in views])
        faces_by_row = {
            i: [f.scaled(*factor) for f in faces] for i, faces, (_, factor) in zip(decodable, found, views, strict=True)
        }
        rows: list[dict[str, Any]] = []
        media: dict[str, dict[str, bytes]] = {}
        for index, record in enumerate(records):
            if images[index] is None:  # undecodable
                rows.append(
                    {**record, "status": self.reject("undecodable"), "error": "the stored image does not decode"}
                )
                continue
            rows.extend(self._rows_for(record, images[index], faces_by_row[index], media))
        return Output(rows=pd.DataFrame(rows), media=media)

    def _rows_for(self, record: dict, image: StoredImage, faces: list[Face], media: dict) -> list[dict]:
        cfg = self.config
        width, height = image.size
        sx, sy = _scale_to_original(record, width, height)
        if not faces:
            return [{**record, "status": self.reject("no_face"), "error": None, "faces_detected": 0, "num_faces": 0}]
        floor = cfg.score_floor()
        confident = [f for f in faces if f.score >= floor]
        counts = {"faces_detected": len(faces), "num_faces": len(confident)}
        if not confident:
            best = max(f.score for f in faces)
            return [
                {
                    **record,
                    **counts,
                    "status": self.reject("low_score"),
                    "error": f"best face score {best:.3f} < min_score {floor}",
                }
            ]
        limit = _face_limit(cfg)
        if limit is not None and len(confident) > limit:
            return [
                {
                    **record,
                    **counts,
                    "status": self.reject("multi_face"),
                    "error": f"{len(confident)} confident faces (at most {limit} allowed)",
                }
            ]
        area = float(width * height)
        sized = [f for f in confident if _big_enough(f, sx, sy, area, cfg)]
        if not sized:
            return [
                {
                    **record,
                    **counts,
                    "status": self.reject("face_too_small"),
                    "error": _too_small_detail(confident, sx, sy, area, cfg),
                }
            ]
        largest = max(sized, key=_area)
        kept = [largest] if cfg.multi_face == "largest" else sized
        rows = []
        crops_by_face = self._crops(image, kept) if cfg.crops else [({}, False)] * len(kept)
        for face_index, (face, (crops, padded)) in enumerate(zip(kept, crops_by_face, strict=True)):
            key = f"{record['key']}_f{face_index}"
            media[key] = crops
            rows.append(
                {
                    **record,
                    **counts,
                    **self._face_columns(face, sx, sy, area),
                    "key": key,
                    "image_key": record["key"],
                    "face_index": face_index,
                    "is_largest": face is largest,
                    "crop_padded": padded,
                    "status": self.ok(),
                    "error": None,
                }
            )
        return rows

    def _face_columns(self, face: Face, sx: float, sy: float, area: float) -> dict[str, Any]:
        x1, y1, x2, y2 = (float(v) for v in face.box)
        scale = np.array([sx, sy], np.float32)
        return {
            "box": [x1 * sx, y1 * sy, x2 * sx, y2 * sy],
            "landmarks": (face.landmarks * scale).reshape(-1).tolist(),
            "det_score": float(face.score),
            "face_width": (x2 - x1) * sx,
            "face_height": (y2 - y1) * sy,
            "face_area_ratio": _area(face) / area,
            "detector": self.config.detector,
            "detector_model": self.config.model_name(),
            "detector_sha256": self.model_sha256,
        }

    def _crops(self, stored: StoredImage, faces: list[Face]) -> list[tuple[dict[str, bytes], bool]]:
        """Each face's encoded crops and whether any reached outside the image; one decode per
        scale serves every face that needs it."""
        plans = [(stored.crop_scale(limit), bounds) for limit, bounds in (_crop_plan(f, self.config) for f in faces)]
        sources = {
            scale: stored.crop_source(scale, _union([bounds for s, bounds in plans if s == scale]))
            for scale in {s for s, _ in plans}
        }
        return [self._face_crops(sources[scale], face) for face, (scale, _) in zip(faces, plans, strict=True)]

    def _face_crops(self, source: CropSource, face: Face) -> tuple[dict[str, bytes], bool]:
        cfg = self.config
        (fx, fy), (ox, oy) = source.factor, source.origin
        box = face.box / np.array([fx, fy, fx, fy], np.float32) - np.array([ox, oy, ox, oy], np.float32)
        landmarks = face.landmarks / np.array([fx, fy], np.float32) - np.array([ox, oy], np.float32)
        image = source.pixels
        crops: dict[str, np.ndarray] = {}
        padded = False
        if "box" in cfg.crops:
            crops["box"], edge = box_crop(image, box)
            padded |= edge
        if "square" in cfg.crops:
            crops["square"], edge = square_crop(image, box, cfg.square_scale, cfg.crop_size)
            padded |= edge
        if "aligned" in cfg.crops:
            crops["aligned"] = aligned_crop(image, landmarks, cfg.crop_size)
        if "aligned112" in cfg.crops:
            crops["aligned112"] = aligned_crop(image, landmarks, 112)
        params = [cv2.IMWRITE_JPEG_QUALITY, cfg.quality]
        return {name: cv2.imencode(".jpg", pixels, params)[1].tobytes() for name, pixels in crops.items()}, padded


def _model_path(name: str) -> Path:
    path = Path(name).expanduser()
    if path.suffix == ".onnx" and path.is_file():
        return path
    return models.resolve(name)


def _crop_plan(face: Face, cfg: DetectConfig) -> tuple[float, tuple[float, float, float, float]]:
    """How many full pixels per decoded pixel still give every configured crop full detail, and
    the rectangle (full pixels) the crops take pixels from."""
    x1, y1, x2, y2 = (float(v) for v in face.box[:4])
    side = max(x2 - x1, y2 - y1)
    allowed = [8.0]
    xs, ys = [x1, x2], [y1, y2]
    if "box" in cfg.crops:
        allowed.append(1.0)  # the tight crop is stored at original resolution
    if "square" in cfg.crops:
        allowed.append(cfg.square_scale * side / cfg.crop_size)
        half = cfg.square_scale * side / 2 + 1  # + rounding
        xs += [(x1 + x2) / 2 - half, (x1 + x2) / 2 + half]
        ys += [(y1 + y2) / 2 - half, (y1 + y2) / 2 + half]
    for size in [cfg.crop_size] * ("aligned" in cfg.crops) + [112] * ("aligned112" in cfg.crops):
        matrix = alignment_matrix(face.landmarks, size)
        # Source pixels per crop pixel of the alignment: 1 / its scale.
        scale = float(np.linalg.norm(matrix[:, 0]))
        allowed.append(1.0 / scale if scale > 0 else 1.0)
        corners = cv2.invertAffineTransform(matrix) @ np.array([[0, size, 0, size], [0, 0, size, size], [1, 1, 1, 1]])
        xs += list(corners[0])
        ys += list(corners[1])
    return min(allowed), (min(xs), min(ys), max(xs), max(ys))


def _union(rectangles: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    x1s, y1s, x2s, y2s = zip(*rectangles, strict=True)
    return min(x1s), min(y1s), max(x2s), max(y2s)


def _scale_to_original(record: dict, width: int, height: int) -> tuple[float, float]:
    """Stored pixels -> original pixels (the download may have resized; FaceCaption boxes are original)."""
    ow, oh = record.get("original_width"), record.get("original_height")
    if not ow or not oh or pd.isna(ow) or pd.isna(oh):
        return 1.0, 1.0
    return float(ow) / width, float(oh) / height


def _face_limit(cfg: DetectConfig) -> int | None:
    limits = [n for n in (1 if cfg.multi_face == "reject" else None, cfg.max_faces) if n is not None]
    return min(limits) if limits else None


def _area(face: Face) -> float:
    x1, y1, x2, y2 = face.box
    return float(max(0.0, x2 - x1) * max(0.0, y2 - y1))


def _big_enough(face: Face, sx: float, sy: float, area: float, cfg: DetectConfig) -> bool:
    x1, y1, x2, y2 = face.box
    sides_ok = min((x2 - x1) * sx, (y2 - y1) * sy) >= cfg.min_face_side
    return sides_ok and _area(face) / area >= cfg.min_relative_area


def _too_small_detail(faces: list[Face], sx: float, sy: float, area: float, cfg: DetectConfig) -> str:
    biggest = max(faces, key=_area)
    x1, y1, x2, y2 = biggest.box
    side = min((x2 - x1) * sx, (y2 - y1) * sy)
    return (
        f"largest confident face {side:.0f} px on its short side, {100 * _area(biggest) / area:.1f}% of the "
        f"image (need {cfg.min_face_side} px and {100 * cfg.min_relative_area:.1f}%)"
    )
