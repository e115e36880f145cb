"""Attribute backends with learned heads for all 40 CelebA attributes (need the torch extra).

- ``celeba``: FaceCaption-15M's classifier: a torchvision ResNet-50 whose fc maps 2048 -> 40,
  sigmoid outputs; input the centre square of the face crop, resized to 256 (bicubic),
  normalised with mean 0.5 and std 0.5. Loaded from a user checkpoint (a state dict, optionally
  under ``state_dict``/``model`` and with ``module.`` prefixes from DataParallel) or an ONNX export.
  The real weights are not public; tests save and load a randomly initialised one. An ONNX file
  with a model card beside it (``NAME.card.json``, written by ``facecap tag train``) brings its own
  input transform and per-attribute thresholds, and the card's sha256 must match the file. The
  checkpoint may also be a name in the model registry (``facecap models list``).
- ``clip``: open_clip zero-shot: for each attribute a prompt ensemble for "has it" and one for "does
  not", and the probability of the first under a softmax of the two similarities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from facecap.pipeline import models
from facecap.pipeline.errors import ConfigError
from facecap.pipeline.models import sha256_of
from facecap.stages.tag.offline import Backend, Faces, session
from facecap.stages.tag.schema import CELEBA40

CELEBA_SIZE = 256
CARD_SUFFIX = ".card.json"


@dataclass(frozen=True)
class InputTransform:
    """How a face image becomes the model's input: the centre square of the BGR image, resized
    (bicubic) to ``size``, as RGB, scaled to 0..1, then ``(x - mean) / std`` per channel."""

    size: int = CELEBA_SIZE
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def card(self) -> dict[str, Any]:
        return {
            "crop": "centre square",
            "size": self.size,
            "interpolation": "bicubic",
            "channels": "RGB",
            "scale": "1/255",
            "mean": list(self.mean),
            "std": list(self.std),
            "layout": "NCHW float32",
        }

    @classmethod
    def from_card(cls, entry: dict[str, Any]) -> InputTransform:
        return cls(int(entry["size"]), tuple(map(float, entry["mean"])), tuple(map(float, entry["std"])))


def celeba_input(squares: list[np.ndarray], transform: InputTransform | None = None) -> np.ndarray:
    """[N, 3, S, S] float32: centre square, bicubic S, RGB, (x/255 - mean) / std (256 and 0.5/0.5
    by default: FaceCaption-15M's classifier)."""
    transform = transform or InputTransform()
    size = transform.size
    mean = np.asarray(transform.mean, np.float32)
    std = np.asarray(transform.std, np.float32)
    batch = []
    for crop in squares:
        height, width = crop.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = cv2.resize(crop[top : top + side, left : left + side], (size, size), interpolation=cv2.INTER_CUBIC)
        batch.append(((square[..., ::-1].astype(np.float32) / 255.0) - mean) / std)
    return np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2))


def card_path(model: Path) -> Path:
    """The model card beside an exported model: ``celeba.onnx`` -> ``celeba.card.json``."""
    return model.with_name(model.stem + CARD_SUFFIX)


def read_card(model: Path) -> dict[str, Any] | None:
    """The card beside ``model``, checked against it; None when there is none."""
    path = card_path(model)
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text())
        attributes, digest = card["attributes"], card["onnx"]["sha256"]
        InputTransform.from_card(card["input_transform"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a facecap model card ({exc!r})") from None
    if list(attributes) != list(CELEBA40):
        raise ConfigError(f"{path}: its attributes are not CelebA's 40 in list_attr_celeba.txt order")
    if sha256_of(model) != digest:
        raise ConfigError(f"{path}: its sha256 {digest[:12]}... does not match {model.name}; re-export both together")
    unknown = sorted(set(card.get("thresholds", {})) - set(CELEBA40))
    if unknown:
        raise ConfigError(f"{path}: thresholds for unknown attributes {', '.join(unknown)}")
    return card


def resolve_checkpoint(checkpoint: str) -> Path:
    """A checkpoint path, or the file of a registered model of that name (``facecap models list``)."""
    path = Path(checkpoint).expanduser()
    if not path.exists() and checkpoint in models.REGISTRY:
        return models.resolve(checkpoint)
    return path


def celeba_resnet50():
    """The architecture: torchvision's ResNet-50 with a 40-way fc (sigmoid applied outside)."""
    import torch
    import torchvision

    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Linear(2048, len(CELEBA40))
    return model


def load_celeba_checkpoint(path: Path):
    """A ResNet-50 CelebA-40 model from a checkpoint file, in eval mode."""
    import torch

    payload = torch.load(str(path), map_location="cpu", weights_only=False)
    if hasattr(payload, "state_dict") and not isinstance(payload, dict):
        payload = payload.state_dict()  # a whole pickled model
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(payload, dict) and isinstance(payload.get(key), dict):
            payload = payload[key]
    state = {k.removeprefix("module."): v for k, v in payload.items()}
    model = celeba_resnet50()
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit
        raise ValueError(f"{path}: not a ResNet-50 with a 40-way fc ({str(exc).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a ResNet-50 with a 40-way fc "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    return model.eval()


class CelebaResnet(Backend):
    name = "celeba"

    def __init__(self, checkpoint: str, use_gpu: bool = False):
        path = resolve_checkpoint(checkpoint)
        card = read_card(path) if path.suffix == ".onnx" else None
        self.transform = InputTransform.from_card(card["input_transform"]) if card else InputTransform()
        self.thresholds = {a: float(t) for a, t in card.get("thresholds", {}).items()} if card else {}
        self._onnx = session(path, use_gpu) if path.suffix == ".onnx" else None
        self._torch = None if self._onnx is not None else load_celeba_checkpoint(path)
        self._device = "cuda" if use_gpu and self._torch is not None and _cuda() else "cpu"
        if self._torch is not None:
            self._torch.to(self._device)

    def probabilities(self, squares: list[np.ndarray]) -> np.ndarray:
        batch = celeba_input(squares, self.transform)
        if self._onnx is not None:
            logits = self._onnx.run(None, {self._onnx.get_inputs()[0].name: batch})[0]
        else:
            import torch

            with torch.inference_mode():
                logits = self._torch(torch.from_numpy(batch).to(self._device)).float().cpu().numpy()
        return 1.0 / (1.0 + np.exp(-logits))

    def predict(self, faces: Faces) -> list[dict[str, Any]]:
        usable = [i for i, s in enumerate(faces.squares) if s is not None]
        out: list[dict[str, Any]] = [{} for _ in range(len(faces))]
        if usable:
            probabilities = self.probabilities([faces.squares[i] for i in usable])
            for i, row in zip(usable, probabilities, strict=True):
                out[i] = {name: float(p) for name, p in zip(CELEBA40, row, strict=True)}
        return out


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# Readable phrases for the zero-shot prompts; the rest are the CelebA names with spaces.
PHRASES = {
    "5_o_Clock_Shadow": "a five o'clock shadow",
    "Male": "a man",
    "Young": "a young person",
    "Attractive": "an attractive person",
    "Bald": "a bald person",
    "Blurry": "a blurry photo",
    "Chubby": "a chubby person",
    "Smiling": "a smiling person",
    "No_Beard": "a person without a beard",
    "Pale_Skin": "a person with pale skin",
}
POSITIVE = ("a photo of {}.", "a close-up photo of {}.", "a face photo showing {}.")
NEGATIVE = ("a photo of a face.", "a close-up photo of a person.", "a face photo.")


def phrase(attribute: str) -> str:
    if attribute in PHRASES:
        return PHRASES[attribute]
    words = attribute.replace("_", " ").lower()
    return (
        f"a person wearing {words.removeprefix('wearing ')}"
        if words.startswith("wearing")
        else f"a person with {words}"
    )


class ClipZeroShot(Backend):
    name = "clip"

    def __init__(self, model_name: str, pretrained: str | None, use_gpu: bool = False, random_weights: bool = False):
        if not pretrained and not random_weights:
            raise ConfigError(
                "tag backend clip needs tag.clip_pretrained (an open_clip pretrained tag whose files are in its "
                "cache, or a weights file): without it the model is randomly initialised and tags nothing real"
            )
        import open_clip
        import torch

        self._torch = torch
        self._device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained or None)
        self._model = model.eval().to(self._device)
        self._preprocess = preprocess
        tokenizer = open_clip.get_tokenizer(model_name)
        with torch.inference_mode():
            negative = self._text(tokenizer, list(NEGATIVE))
            positives = [self._text(tokenizer, [t.format(phrase(a)) for t in POSITIVE]) for a in CELEBA40]
        self._classes = torch.stack([torch.stack([p, negative]) for p in positives])  # [40, 2, D]
        self._scale = float(model.logit_scale.detach().exp()) if hasattr(model, "logit_scale") else 100.0

    def _text(self, tokenizer, prompts: list[str]):
        features = self._model.encode_text(tokenizer(prompts).to(self._device)).float()
        features = features / features.norm(dim=-1, keepdim=True)
        mean = features.mean(dim=0)
        return mean / mean.norm()

    def predict(self, faces: Faces) -> list[dict[str, Any]]:
        from PIL import Image

        torch = self._torch
        images = [s if s is not None else a for s, a in zip(faces.squares, faces.aligned, strict=True)]
        batch = torch.stack([self._preprocess(Image.fromarray(i[..., ::-1].copy())) for i in images]).to(self._device)
        with torch.inference_mode():
            features = self._model.encode_image(batch).float()
            features = features / features.norm(dim=-1, keepdim=True)
            logits = self._scale * torch.einsum("nd,akd->nak", features, self._classes)
            probabilities = logits.softmax(dim=-1)[..., 0].cpu().numpy()
        return [{name: float(p) for name, p in zip(CELEBA40, row, strict=True)} for row in probabilities]
