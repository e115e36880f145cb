"""Tag benchmark: faces/s per core for each attribute backend, in batches of 64 faces.

The faces are the largest face of each fixture photo (aligned 112 and 1.5x square crops made
once, outside the timing). One core (OMP_NUM_THREADS=1), as a Ray worker gets. The CelebA ResNet-50
and CLIP backends run with random weights of their real architectures (timing does not depend on
the weights).
"""

from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"

import sys
import tempfile
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(Path(__file__).parent))
SHARED = Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared"))
os.environ.setdefault("FACECAP_MODELS", str(SHARED / "models"))
from common import machine  # noqa: E402


def fixture_faces(limit: int = 192):
    from facecap.stages.detect.align import aligned_crop, square_crop
    from facecap.stages.detect.stage import DetectConfig, DetectStage
    from facecap.stages.tag.offline import Faces

    stage = DetectStage(DetectConfig(min_score=0.5, min_face_side=40))
    stage.setup()
    aligned, landmarks, squares = [], [], []
    for path in sorted((SHARED / "data" / "faces").rglob("*.jpg")):
        image = cv2.imread(str(path))
        found = stage.detector.detect_batch([image])[0] if image is not None else []
        if not found:
            continue
        face = max(found, key=lambda f: float(f.box[2] - f.box[0]))
        aligned.append(aligned_crop(image, face.landmarks, 112))
        landmarks.append(face.landmarks)
        squares.append(square_crop(image, face.box)[0])
        if len(aligned) >= limit:
            break
    return Faces(aligned, landmarks, squares)


def backends(workdir: Path):
    import torch

    from facecap.stages.tag.learned import CelebaResnet, ClipZeroShot, celeba_resnet50
    from facecap.stages.tag.offline import AgeGender, Emotion, Geometry, InsightGenderAge, Skin

    yield "agegender", AgeGender()
    yield "genderage", InsightGenderAge()
    yield "emotion", Emotion()
    # The Face Landmarker is mediapipe's graph: its own threads, not OMP_NUM_THREADS.
    yield "geometry (face landmarker)", Geometry(mesh="face-landmarker")
    yield "geometry (face-mesh ONNX)", Geometry(mesh="face-mesh")
    yield "skin", Skin()
    checkpoint = workdir / "celeba.pth"
    torch.save(celeba_resnet50().state_dict(), checkpoint)
    torch.set_num_threads(1)
    yield "celeba ResNet-50 (torch)", CelebaResnet(str(checkpoint))
    # Random weights: throughput does not depend on the weights' values.
    yield "clip ViT-B-32 zero-shot", ClipZeroShot("ViT-B-32", None, random_weights=True)


def main() -> None:
    from facecap.stages.tag.offline import Faces

    faces = fixture_faces()
    print(f"machine: {machine()}; one core; {len(faces)} faces, batches of 64")
    print(f"{'backend':<30}{'faces/s':>10}{'ms/face':>10}")
    with tempfile.TemporaryDirectory() as folder:
        for name, backend in backends(Path(folder)):
            started = time.perf_counter()
            for start in range(0, len(faces), 64):
                part = slice(start, start + 64)
                backend.predict(Faces(faces.aligned[part], faces.landmarks[part], faces.squares[part]))
            seconds = time.perf_counter() - started
            print(f"{name:<30}{len(faces) / seconds:>10.1f}{1000 * seconds / len(faces):>10.2f}")


if __name__ == "__main__":
    main()
