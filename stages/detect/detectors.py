"""Face detectors behind one interface: YuNet (OpenCV), SCRFD (insightface) and RetinaFace (our decoder).

Every detector takes a BGR uint8 image and returns ``Face``s in that image's pixels, sorted by
score, with five landmarks in ArcFace order (image-left eye, image-right eye, nose, image-left
mouth corner, image-right mouth corner). Images larger than ``max_side`` are shrunk for detection
and the results scaled back, so callers never see the detection resolution.

Threading: a detector holds mutable native state (YuNet's ``cv2.FaceDetectorYN`` keeps its input
size and buffers; it is not thread-safe), so use one detector per worker thread or process. The
ONNX Runtime based ones (SCRFD, RetinaFace) only read their state after construction, but the
same rule keeps the callers simple. Nothing here is global: two detectors never share a session.

Scores are each model's own and not comparable across detectors, so a policy threshold belongs
to a detector: on the shared test photos the best score anywhere is 0.96 for YuNet, 0.93 for
SCRFD-500M and 0.92 for SCRFD-2.5G, while RetinaFace scores clear faces at 0.99-1.0. FaceCaption-15M's
"score > 0.98" is a RetinaFace score (bench/eval_detect.py measures all of this).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import cv2
import numpy as np
import onnxruntime as ort

from facecap.pipeline.threads import worker_threads

log = logging.getLogger(__name__)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass
class Face:
    box: np.ndarray  # float32 [x1, y1, x2, y2] in the input image's pixels; may reach past its edges
    score: float
    landmarks: np.ndarray  # float32 (5, 2), ArcFace order (see the module docstring)

    def scaled(self, fx: float, fy: float) -> Face:
        factor = np.array([fx, fy], np.float32)
        return Face(self.box * np.tile(factor, 2), self.score, self.landmarks * factor)


def onnx_providers(use_gpu: bool | None) -> list[str]:
    """ONNX Runtime providers: CUDA first when wanted (None = when available), CPU always last."""
    cuda = CUDA in ort.get_available_providers()
    if use_gpu and not cuda:
        log.warning("a GPU was asked for but this onnxruntime has no CUDA provider; running on CPU")
    return [CUDA, CPU] if cuda and use_gpu is not False else [CPU]


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # exported models warn about unused initializers on every load
    options.intra_op_num_threads = worker_threads()
    return options


def onnx_session(model_path: Path, use_gpu: bool | None) -> ort.InferenceSession:
    options = session_options()
    try:
        return ort.InferenceSession(str(model_path), sess_options=options, providers=onnx_providers(use_gpu))
    except Exception as exc:  # onnxruntime's errors derive from Exception only
        raise ValueError(f"{model_path} is not a loadable ONNX model: {_first_line(exc)}") from exc


class FaceDetector(ABC):
    name: ClassVar[str]

    def __init__(
        self,
        model_path: Path,
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
        max_side: int = 1280,
        use_gpu: bool | None = None,
    ):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"{self.name} model file not found: {self.model_path}")
        if not 0.0 <= threshold <= 1.0 or not 0.0 < nms_threshold <= 1.0:
            raise ValueError(f"threshold {threshold} and nms_threshold {nms_threshold} must lie in [0, 1]")
        if max_side < 32:
            raise ValueError(f"max_side {max_side} is too small to detect anything")
        self.threshold = float(threshold)
        self.nms_threshold = float(nms_threshold)
        self.max_side = int(max_side)
        self.use_gpu = use_gpu

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in a BGR uint8 HxWx3 image (gray and BGRA are converted), best score first."""
        image = as_bgr(image)
        small, fx, fy = downscale(image, self.max_side)
        faces = self._detect(small)
        if small is not image:
            faces = [face.scaled(fx, fy) for face in faces]
        return sorted(faces, key=lambda face: -face.score)

    def detect_batch(self, images: list[np.ndarray]) -> list[list[Face]]:
        # The exported models take batch 1, so a loop is as fast as stacking would be.
        return [self.detect(image) for image in images]

    @abstractmethod
    def _detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an image no larger than max_side, in its pixels."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_path.name}, threshold={self.threshold})"


class YuNetDetector(FaceDetector):
    """OpenCV's FaceDetectorYN; runs on OpenCV's CPU DNN whatever ``use_gpu`` says (pip OpenCV has no CUDA)."""

    name = "yunet"

    def __init__(self, model_path: Path, **kwargs):
        super().__init__(model_path, **kwargs)
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(self.model_path), "", (320, 320), self.threshold, self.nms_threshold, 5000
            )
            # A model of another kind loads fine and fails at its first forward: find out now.
            self._net.setInputSize((64, 64))
            self._net.detect(np.zeros((64, 64, 3), np.uint8))
        except cv2.error as exc:
            raise ValueError(
                f"{self.model_path} is not a YuNet model for cv2.FaceDetectorYN: {_cv_error(exc)}"
            ) from None

    def _detect(self, image: np.ndarray) -> list[Face]:
        height, width = image.shape[:2]
        self._net.setInputSize((width, height))
        _, rows = self._net.detect(image)
        if rows is None:
            return []
        # Rows: x, y, w, h, 5 landmarks (subject's right eye first = image-left), score.
        return [
            Face(
                box=np.array([r[0], r[1], r[0] + r[2], r[1] + r[3]], np.float32),
                score=float(r[14]),
                landmarks=np.asarray(r[4:14], np.float32).reshape(5, 2),
            )
            for r in rows
        ]


class SCRFDDetector(FaceDetector):
    """SCRFD with keypoints through insightface's model zoo, letterboxed into 640x640."""

    name = "scrfd"
    input_size = (640, 640)

    def __init__(self, model_path: Path, **kwargs):
        super().__init__(model_path, **kwargs)
        from insightface.model_zoo import get_model
        from insightface.model_zoo.scrfd import SCRFD

        providers = onnx_providers(self.use_gpu)
        options = session_options()
        try:
            model = get_model(str(self.model_path), providers=providers, sess_options=options)
        except Exception as exc:
            raise ValueError(f"{self.model_path} is not a loadable ONNX model: {_first_line(exc)}") from exc
        # insightface routes any model with >= 5 outputs to SCRFD (YuNet too) and square inputs to ArcFace.
        if not isinstance(model, SCRFD) or not hasattr(model, "fmc") or not model.use_kps:
            raise ValueError(f"{self.model_path} is not an SCRFD detector with keypoints (9 or 15 outputs)")
        model.prepare(
            ctx_id=0 if providers[0] == CUDA else -1,
            input_size=self.input_size,
            det_thresh=self.threshold,
            nms_thresh=self.nms_threshold,
        )
        self._model = model

    def _detect(self, image: np.ndarray) -> list[Face]:
        # Our letterbox, not insightface's: it would enlarge small images, and SCRFD then misses
        # faces that fill them (48% recall on 150 px portrait crops, against 96% unenlarged).
        canvas, scale = letterbox(image, *self.input_size, fill=(0, 0, 0))
        boxes, keypoints = self._model.detect(canvas, max_num=0)
        return [
            Face(
                np.asarray(b[:4], np.float32) / scale,
                float(b[4]),
                np.asarray(k, np.float32).reshape(5, 2) / scale,
            )
            for b, k in zip(boxes, keypoints, strict=True)
        ]


class RetinaFaceDetector(FaceDetector):
    """biubug6/Pytorch_Retinaface (MobileNet-0.25) ONNX export, decoded here.

    The image is letterboxed (aspect kept, shrunk but never enlarged, padded right and bottom
    with the mean colour as in training) into the network's input, the 16,800 prior boxes are decoded with the training
    variances, thresholded and suppressed, and mapped back to the image's pixels.
    """

    name = "retinaface"
    mean = np.array([104.0, 117.0, 123.0], np.float32)  # BGR, as in training
    min_sizes = ((16, 32), (64, 128), (256, 512))
    steps = (8, 16, 32)
    variances = (0.1, 0.2)

    def __init__(self, model_path: Path, **kwargs):
        super().__init__(model_path, **kwargs)
        self._session = onnx_session(self.model_path, self.use_gpu)
        self._input, self._height, self._width = self._input_spec()
        self._priors = retinaface_priors(self._height, self._width, self.min_sizes, self.steps)
        self._outputs = self._output_names()
        # Some exports end with softmax, others with logits: look once, on a blank image.
        _, conf, _ = self._run(np.zeros((1, 3, self._height, self._width), np.float32))
        self._softmaxed = bool(np.allclose(conf.sum(axis=1), 1.0, atol=1e-3))

    def _input_spec(self) -> tuple[str, int, int]:
        inputs = self._session.get_inputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"{self.model_path} is not a RetinaFace model: expected one NCHW 3-channel input")
        fixed = [d if isinstance(d, int) and d > 0 else 640 for d in shape[2:]]
        return inputs[0].name, fixed[0], fixed[1]

    def _output_names(self) -> list[str]:
        """Names of the (boxes, scores, landmarks) outputs, told apart by their last axis: 4, 2, 10."""
        by_width = {o.shape[-1]: o for o in self._session.get_outputs() if len(o.shape) == 3}
        found = [by_width.get(width) for width in (4, 2, 10)]
        anchors = len(self._priors)
        if any(o is None or (isinstance(o.shape[1], int) and o.shape[1] != anchors) for o in found):
            raise ValueError(
                f"{self.model_path} is not a RetinaFace model: expected outputs [1, {anchors}, 4 | 2 | 10]"
            )
        return [o.name for o in found]

    def _run(self, blob: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        loc, conf, landmarks = self._session.run(self._outputs, {self._input: blob})
        return loc[0], conf[0], landmarks[0]

    def _detect(self, image: np.ndarray) -> list[Face]:
        blob, scale = self._blob(image)
        loc, conf, landmarks = self._run(blob)
        scores = conf[:, 1] if self._softmaxed else _softmax(conf)[:, 1]
        keep = np.flatnonzero(scores >= self.threshold)
        if keep.size == 0:
            return []
        priors = self._priors[keep]
        boxes = decode_boxes(loc[keep], priors, self.variances)
        points = decode_landmarks(landmarks[keep], priors, self.variances)
        size = np.array([self._width, self._height], np.float32)
        boxes = boxes * np.tile(size, 2) / scale
        points = points * size / scale
        chosen = nms(boxes, scores[keep], self.nms_threshold)
        return [Face(boxes[i], float(scores[keep][i]), points[i]) for i in chosen]

    def _blob(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        canvas, scale = letterbox(image, self._width, self._height, fill=tuple(self.mean))
        blob = canvas.astype(np.float32) - self.mean  # the padding becomes zero
        return blob.transpose(2, 0, 1)[None].copy(), scale


def letterbox(image: np.ndarray, width: int, height: int, fill: tuple[float, float, float]) -> tuple[np.ndarray, float]:
    """The image on a width x height canvas at its top left, shrunk to fit but never enlarged.

    Enlarging small images makes the faces that fill them bigger than the detectors' largest
    anchors; at their own size they are found. Returns the canvas and the scale applied.
    """
    rows, cols = image.shape[:2]
    scale = min(1.0, width / cols, height / rows)
    if scale < 1.0:
        cols, rows = max(1, min(width, round(cols * scale))), max(1, min(height, round(rows * scale)))
        image = cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA)
    canvas = np.empty((height, width, 3), np.uint8)
    canvas[:] = np.asarray(fill, np.float32).round().astype(np.uint8)
    canvas[:rows, :cols] = image
    return canvas, scale


def retinaface_priors(
    height: int, width: int, min_sizes: tuple[tuple[int, ...], ...], steps: tuple[int, ...]
) -> np.ndarray:
    """Prior boxes (cx, cy, w, h) relative to the input, in Pytorch_Retinaface's PriorBox order.

    That order is: per level, per row, per column, per anchor size.
    """
    levels = []
    for sizes, step in zip(min_sizes, steps, strict=True):
        rows, cols = -(-height // step), -(-width // step)  # ceil, like the training code
        grid = np.empty((rows, cols, len(sizes), 4), np.float32)
        grid[..., 0] = ((np.arange(cols) + 0.5) * step / width)[None, :, None]
        grid[..., 1] = ((np.arange(rows) + 0.5) * step / height)[:, None, None]
        grid[..., 2] = np.asarray(sizes, np.float32) / width
        grid[..., 3] = np.asarray(sizes, np.float32) / height
        levels.append(grid.reshape(-1, 4))
    return np.concatenate(levels)


def decode_boxes(loc: np.ndarray, priors: np.ndarray, variances: tuple[float, float]) -> np.ndarray:
    centres = priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:]
    sizes = priors[:, 2:] * np.exp(loc[:, 2:] * variances[1])
    return np.hstack([centres - sizes / 2, centres + sizes / 2]).astype(np.float32)


def decode_landmarks(pre: np.ndarray, priors: np.ndarray, variances: tuple[float, float]) -> np.ndarray:
    offsets = pre.reshape(-1, 5, 2) * variances[0] * priors[:, None, 2:]
    return (priors[:, None, :2] + offsets).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression (IoU > threshold suppresses), best first."""
    x1, y1, x2, y2 = boxes.T
    areas = np.maximum(0.0, x2 - x1) * np.maximum(0.0, y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(int(best))
        w = np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]))
        h = np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]))
        inter = w * h
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-9)
        order = rest[iou <= threshold]
    return keep


def as_bgr(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.size == 0:
        raise ValueError("expected a non-empty uint8 numpy image")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 BGR image, got shape {image.shape}")
    return image


def downscale(image: np.ndarray, max_side: int, linear_below: float = 1.0) -> tuple[np.ndarray, float, float]:
    """The image shrunk so its longer side is at most max_side, and the factors back to the original.

    Area averaging, except bilinear for a shrink of less than ``linear_below`` times: much cheaper
    than INTER_AREA's non-integer path, and a small shrink aliases too little to matter.
    """
    height, width = image.shape[:2]
    if max(height, width) <= max_side:
        return image, 1.0, 1.0
    scale = max_side / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    interpolation = cv2.INTER_LINEAR if 1 / scale < linear_below else cv2.INTER_AREA
    small = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    return small, width / new_w, height / new_h


DETECTORS: dict[str, type[FaceDetector]] = {cls.name: cls for cls in (YuNetDetector, SCRFDDetector, RetinaFaceDetector)}


def make_detector(kind: str, model_path: Path, **kwargs) -> FaceDetector:
    """A detector of ``kind`` ("yunet", "scrfd" or "retinaface") over ``model_path``."""
    if kind not in DETECTORS:
        raise ValueError(f"unknown detector '{kind}' (known: {', '.join(DETECTORS)})")
    return DETECTORS[kind](Path(model_path), **kwargs)


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def _cv_error(exc: cv2.error) -> str:
    # OpenCV errors carry "file:line: error: (-2:...) message in function ..." over several lines.
    text = " ".join(str(exc).split())
    return text[text.find("error:") :][:300] if "error:" in text else text[:300]
