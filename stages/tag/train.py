"""``facecap tag train``: a CelebA-40 attribute classifier from the public CelebA release.

Two models, both ending in 40 logits (sigmoid gives the probabilities the tag stage reads):

- ``resnet50``: FaceCaption-15M's classifier (``learned.celeba_resnet50``), trained end to end.
  ImageNet weights cannot be downloaded by facecap: ``init`` names a torchvision ResNet-50
  weights file (its ``fc`` is replaced), otherwise the network starts from random weights.
- ``clip-probe``: a linear layer on frozen, L2-normalised open_clip image features. The features
  of every image are computed once (cached in OUT), so an epoch costs a few matrix products.
  It needs real open_clip weights (``clip_pretrained``); ``clip_random_weights`` is for tests.

The train split fits the model; on the val split every attribute gets the lowest threshold whose
precision reaches ``target_precision`` (fallbacks in ``choose_threshold``); the test split is
measured at those thresholds (accuracy and balanced accuracy per attribute). The result is
``OUT/model.onnx`` (image in, 40 logits out; for clip-probe the image encoder and the probe in one
graph) and ``OUT/model.card.json`` beside it, which the tag stage's ``celeba`` backend reads for
the input transform and the thresholds.

Resumable: ``OUT/checkpoint.pt`` is written (atomically) after every epoch and ``OUT/train.json``
records the settings; rerunning the same command continues after the last finished epoch (a
larger ``epochs`` continues too: the learning rate is constant). Other settings are refused
unless ``overwrite``, which removes only the files an earlier run listed in ``train.json``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from facecap.pipeline.errors import FacecapError
from facecap.pipeline.models import sha256_of
from facecap.stages.tag.celeba_data import SPLITS, CelebaSplit, ParquetImages, open_celeba
from facecap.stages.tag.learned import InputTransform, card_path, celeba_input, celeba_resnet50
from facecap.stages.tag.schema import CELEBA40

ModelKind = Literal["resnet50", "clip-probe"]
MODEL_FILE = "model.onnx"
CHECKPOINT = "checkpoint.pt"
STATE = "train.json"
DEFAULT_LR = {"resnet50": 3e-4, "clip-probe": 1e-3}
OPSET = 17  # the TorchScript exporter's (the dynamo exporter needs onnxscript, not a dependency)


@dataclass(frozen=True)
class TrainSettings:
    model: ModelKind = "resnet50"
    epochs: int = 10
    batch_size: int = 64
    lr: float | None = None  # None: DEFAULT_LR of the model
    image_size: int | None = None  # resnet50: default 256 (celeba_input's); clip-probe: the encoder's
    limit: int | None = None  # first N images of each split
    seed: int = 0
    target_precision: float = 0.85
    init: str | None = None  # resnet50: torchvision weights file
    clip_model: str = "ViT-B-32"
    clip_pretrained: str | None = None
    clip_random_weights: bool = False
    workers: int = 0  # image-decoding processes (torch DataLoader)
    device: str = "auto"

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.model]

    def fingerprint(self, data: dict[str, Any]) -> dict[str, Any]:
        """What must match for a rerun to continue (not epochs, workers or device)."""
        settings = asdict(self)
        for loose in ("epochs", "workers", "device"):
            settings.pop(loose)
        settings["lr"] = self.learning_rate
        if settings["init"]:
            settings["init_sha256"] = sha256_of(Path(settings["init"]))
        return {"settings": settings, "data": data}


@dataclass
class Reporter:
    """What training shows: ``bar(label, total)`` gives a context with ``advance(n)``; ``line(text)``."""

    bar: Callable[[str, int], Any]
    line: Callable[[str], None]


@dataclass
class TrainResult:
    output: Path
    card: dict[str, Any]
    resumed_at: int  # first epoch trained now (1 for a fresh run; epochs + 1 when nothing was left)
    history: list[dict[str, float]] = field(default_factory=list)


class TrainError(FacecapError):
    """Training cannot start or continue as asked."""


def train(data: Path, output: Path, settings: TrainSettings, report: Reporter, overwrite: bool = False) -> TrainResult:
    """Fit, calibrate on val, measure on test, export ONNX and its card into ``output``."""
    _check(settings)
    import torch

    splits = open_celeba(data, settings.limit)
    if len(splits["train"]) < 2:
        raise TrainError(f"{data}: the train partition needs at least 2 images")
    output = Path(output).expanduser()
    data_info = {
        "source": str(Path(data).expanduser().resolve()),
        "format": "parquet" if isinstance(splits["train"].source, ParquetImages) else "folder",
        "images": {name: len(split) for name, split in splits.items()},
        "files_sha256": _files_digest(splits),
    }
    fingerprint = settings.fingerprint(data_info)
    state = _prepare_output(output, fingerprint, overwrite)
    card_file = card_path(output / MODEL_FILE)
    if state.get("epochs_done") == settings.epochs and card_file.exists() and (output / MODEL_FILE).exists():
        card = json.loads(card_file.read_text())
        if card.get("training", {}).get("epochs") == settings.epochs:
            report.line(f"all {settings.epochs} epochs already done in {output}; nothing to do")
            return TrainResult(output, card, settings.epochs + 1, card["training"]["history"])
    torch.manual_seed(settings.seed)
    device = _device(settings.device)
    model = ProbeTrainer(settings, device) if settings.model == "clip-probe" else ResnetTrainer(settings, device)
    checkpoint = output / CHECKPOINT
    history: list[dict[str, float]] = []
    start = 1
    if checkpoint.exists():
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if saved["fingerprint"] != fingerprint:
            raise TrainError(f"{checkpoint}: made with other settings than {output / STATE}; rerun with --overwrite")
        model.load(saved)
        history = saved["history"]
        start = saved["epoch"] + 1
        if start > settings.epochs + 1:
            raise TrainError(
                f"{output} already holds {saved['epoch']} epochs, more than --epochs {settings.epochs}; "
                "raise --epochs, or --overwrite to start again"
            )
        if start <= settings.epochs:
            report.line(f"resuming at epoch {start} of {settings.epochs} ({saved['epoch']} done in {output})")
    model.prepare(splits, output, report, state)
    for epoch in range(start, settings.epochs + 1):
        began = time.perf_counter()
        # Each epoch's order and flips come from (seed, epoch), so a resumed epoch draws as a fresh one would.
        torch.manual_seed(settings.seed * 100_003 + epoch)
        generator = torch.Generator().manual_seed(settings.seed * 100_003 + epoch)
        loss = model.fit_epoch(splits["train"], generator, report, f"epoch {epoch}/{settings.epochs}")
        history.append({"epoch": epoch, "loss": loss, "seconds": round(time.perf_counter() - began, 3)})
        report.line(f"epoch {epoch}/{settings.epochs}: train loss {loss:.4f} ({history[-1]['seconds']:.1f}s)")
        _remember(output, state, CHECKPOINT)
        _save_atomic(
            lambda path, e=epoch: torch.save(
                {"epoch": e, "fingerprint": fingerprint, "history": history, **model.state()}, path
            ),
            checkpoint,
        )
        state["epochs_done"] = epoch
        _write_state(output, state)
    val = model.probabilities(splits["val"], report, "val")
    thresholds = {}
    sources = {}
    for index, attribute in enumerate(CELEBA40):
        thresholds[attribute], sources[attribute] = choose_threshold(
            val[:, index], splits["val"].labels[:, index], settings.target_precision
        )
    test = model.probabilities(splits["test"], report, "test")
    metrics = attribute_metrics(test, splits["test"].labels, thresholds)
    onnx_path = output / MODEL_FILE
    _remember(output, state, MODEL_FILE)
    _save_atomic(lambda path: model.export(path), onnx_path)
    card = {
        "format": "facecap CelebA-40 model card 1",
        "task": "CelebA-40 face attributes: 40 logits, sigmoid gives each attribute's probability",
        "architecture": model.architecture,
        "init": model.init_description,
        "input_transform": model.transform.card(),
        "onnx": {
            "file": MODEL_FILE,
            "sha256": sha256_of(onnx_path),
            "size": onnx_path.stat().st_size,
            "opset": OPSET,
            "input": f"input [N,3,{model.transform.size},{model.transform.size}] float32",
            "output": "logits [N,40] float32 (CelebA order)",
        },
        "attributes": list(CELEBA40),
        "target_precision": settings.target_precision,
        "thresholds": thresholds,
        "threshold_sources": sources,
        "metrics": {
            "split": "test",
            "images": len(splits["test"]),
            "mean_accuracy": _mean(m["accuracy"] for m in metrics.values()),
            "mean_balanced_accuracy": _mean(m["balanced_accuracy"] for m in metrics.values()),
            "attributes": metrics,
        },
        "data": data_info,
        "training": {
            "epochs": settings.epochs,
            "batch_size": settings.batch_size,
            "lr": settings.learning_rate,
            "optimizer": "AdamW (weight decay 1e-4), constant learning rate",
            "loss": "binary cross-entropy over the 40 attributes",
            "augmentation": "horizontal flip" if settings.model == "resnet50" else "none (features computed once)",
            "seed": settings.seed,
            "limit": settings.limit,
            "history": history,
            "device": str(device),
        },
        "facecap": _version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _remember(output, state, card_file.name)
    _save_atomic(lambda path: Path(path).write_text(json.dumps(card, indent=2) + "\n"), card_file)
    return TrainResult(output, card, start, history)


def choose_threshold(scores: np.ndarray, labels: np.ndarray, target: float) -> tuple[float, str]:
    """(threshold, how it was chosen) for one attribute on the val split; a score counts when above it.

    The lowest threshold whose precision on val reaches ``target`` (the most recall at that
    precision). Fallbacks: no positives in val, or no negatives: 0.5 (nothing to measure
    precision against); target never reached: the threshold of the best balanced accuracy.
    """
    scores = np.asarray(scores, np.float64)
    positive = np.asarray(labels) > 0.5
    if not positive.any():
        return 0.5, "0.5: no positives in val"
    if positive.all():
        return 0.5, "0.5: no negatives in val"
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], positive[order].astype(np.float64)
    cuts = np.flatnonzero(np.r_[ranked[1:] < ranked[:-1], True])  # last index of each distinct score
    true_pos = np.cumsum(hits)[cuts]
    predicted = cuts + 1
    precision = true_pos / predicted
    below = np.r_[ranked[cuts[1:]], ranked[-1] - 1e-6]  # the next lower score (or just under the lowest)
    thresholds = (ranked[cuts] + below) / 2  # between this score and the next: this one counts
    reached = np.flatnonzero(precision >= target)
    if reached.size:
        return float(thresholds[reached[-1]]), f"val precision >= {target:g}"
    recall = true_pos / positive.sum()
    specificity = 1 - (predicted - true_pos) / (~positive).sum()
    best = int(np.argmax((recall + specificity) / 2))
    return float(thresholds[best]), f"val best balanced acc. ({target:g} not reached)"


def attribute_metrics(
    probabilities: np.ndarray, labels: np.ndarray, thresholds: dict[str, float]
) -> dict[str, dict[str, Any]]:
    """Per attribute on one split: positives, accuracy and balanced accuracy at its threshold
    (balanced accuracy is the mean recall over the classes present)."""
    out = {}
    for index, attribute in enumerate(CELEBA40):
        predicted = probabilities[:, index] > thresholds[attribute]
        truth = labels[:, index] > 0.5
        recalls = [float((predicted[truth == c] == c).mean()) for c in (True, False) if (truth == c).any()]
        out[attribute] = {
            "positives": int(truth.sum()),
            "negatives": int((~truth).sum()),
            "accuracy": float((predicted == truth).mean()),
            "balanced_accuracy": float(np.mean(recalls)),
        }
    return out


class ResnetTrainer:
    """FaceCaption-15M's ResNet-50, trained on the images."""

    def __init__(self, settings: TrainSettings, device: str):
        import torch

        self.settings = settings
        self.device = device
        self.transform = InputTransform(size=settings.image_size or InputTransform().size)
        self.architecture = "resnet50: torchvision ResNet-50, fc 2048 -> 40"
        self.net = celeba_resnet50()
        self.init_description = "random (no ImageNet weights given: --init)"
        if settings.init:
            self.init_description = f"torchvision weights {settings.init} (sha256 {sha256_of(Path(settings.init))})"
            self._load_init(Path(settings.init))
        self.net.to(device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
        self.loss = torch.nn.BCEWithLogitsLoss()

    def _load_init(self, path: Path) -> None:
        import torch

        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise TrainError(f"--init {path}: cannot load torchvision weights ({exc})") from None
        payload = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
        if not isinstance(payload, dict):
            raise TrainError(f"--init {path}: not a state dict")
        state = {k.removeprefix("module."): v for k, v in payload.items()}
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}  # a 1000-way ImageNet fc
        missing, unexpected = self.net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise TrainError(
                f"--init {path}: not torchvision ResNet-50 weights (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )

    def load(self, saved: dict[str, Any]) -> None:
        self.net.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])

    def state(self) -> dict[str, Any]:
        return {"model": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def prepare(self, splits: dict[str, CelebaSplit], output: Path, report: Reporter, state: dict) -> None:
        return None

    def _loader(self, split: CelebaSplit, train: bool, generator=None):
        import torch

        batch = self.settings.batch_size
        return torch.utils.data.DataLoader(
            Images(split, self.transform, flip=train),
            batch_size=batch,
            shuffle=train,
            generator=generator,
            drop_last=train and len(split) % batch == 1,  # BatchNorm cannot train on one image
            num_workers=self.settings.workers,
            pin_memory=self.device != "cpu",
        )

    def fit_epoch(self, split: CelebaSplit, generator, report: Reporter, label: str) -> float:
        self.net.train()
        total, count = 0.0, 0
        with report.bar(label, len(split)) as bar:
            for images, labels in self._loader(split, True, generator):
                images, labels = images.to(self.device), labels.to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss(self.net(images), labels)
                loss.backward()
                self.optimizer.step()
                total += loss.item() * len(images)
                count += len(images)
                bar.advance(len(images))
        return total / max(count, 1)

    def probabilities(self, split: CelebaSplit, report: Reporter, label: str) -> np.ndarray:
        import torch

        self.net.eval()
        out = []
        with report.bar(label, len(split)) as bar, torch.inference_mode():
            for images, _ in self._loader(split, False):
                out.append(torch.sigmoid(self.net(images.to(self.device)).float()).cpu().numpy())
                bar.advance(len(images))
        return np.concatenate(out)

    def graph(self):
        return self.net

    def export(self, path: Path) -> None:
        export_onnx(self.graph(), self.transform.size, path)


class ProbeTrainer:
    """A linear probe on frozen open_clip image features (computed once per split, cached in OUT)."""

    def __init__(self, settings: TrainSettings, device: str):
        import open_clip
        import torch

        self.settings = settings
        self.device = device
        try:
            clip, _, _ = open_clip.create_model_and_transforms(
                settings.clip_model, pretrained=settings.clip_pretrained or None
            )
        except Exception as exc:  # an unknown tag, a file that is not there, weights that cannot be fetched
            raise TrainError(f"open_clip {settings.clip_model} / {settings.clip_pretrained}: {exc}") from None
        self.encoder = clip.visual.eval().to(device)
        for parameter in self.encoder.parameters():
            parameter.requires_grad_(False)
        config = getattr(self.encoder, "preprocess_cfg", {}) or {}
        size = self.encoder.image_size
        size = size[0] if isinstance(size, tuple | list) else size
        mean = tuple(config.get("mean", open_clip.OPENAI_DATASET_MEAN))
        std = tuple(config.get("std", open_clip.OPENAI_DATASET_STD))
        self.transform = InputTransform(int(size), mean, std)
        weights = settings.clip_pretrained or "RANDOM weights (tests only)"
        self.architecture = f"clip-probe: open_clip {settings.clip_model} image encoder (frozen) + linear probe"
        self.init_description = f"open_clip {settings.clip_model} pretrained={weights}"
        self.probe = torch.nn.Linear(int(clip.visual.output_dim), len(CELEBA40)).to(device)
        self.optimizer = torch.optim.AdamW(self.probe.parameters(), lr=settings.learning_rate, weight_decay=1e-4)
        self.loss = torch.nn.BCEWithLogitsLoss()
        self.features: dict[str, np.ndarray] = {}

    def load(self, saved: dict[str, Any]) -> None:
        self.probe.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])

    def state(self) -> dict[str, Any]:
        return {"model": self.probe.state_dict(), "optimizer": self.optimizer.state_dict()}

    def prepare(self, splits: dict[str, CelebaSplit], output: Path, report: Reporter, state: dict) -> None:
        """The normalised features of every split, from OUT/features-SPLIT.npy or computed now."""
        import torch

        for name in SPLITS:
            split = splits[name]
            cache = output / f"features-{name}.npy"
            if cache.exists():
                features = np.load(cache)
                if len(features) == len(split):
                    self.features[name] = features
                    continue
            chunks = []
            began = time.perf_counter()
            loader = torch.utils.data.DataLoader(
                Images(split, self.transform, flip=False),
                batch_size=self.settings.batch_size,
                num_workers=self.settings.workers,
            )
            with report.bar(f"features {name}", len(split)) as bar, torch.inference_mode():
                for images, _ in loader:
                    chunks.append(self._encode(images.to(self.device)).cpu().numpy())
                    bar.advance(len(images))
            self.features[name] = np.concatenate(chunks).astype(np.float32)
            seconds = time.perf_counter() - began
            report.line(f"features {name}: {len(split)} images in {seconds:.1f}s, cached in {cache.name}")
            _remember(output, state, cache.name)
            _save_atomic(lambda path, f=self.features[name]: _save_npy(path, f), cache)

    def _encode(self, images):
        features = self.encoder(images).float()
        return features / features.norm(dim=-1, keepdim=True)

    def fit_epoch(self, split: CelebaSplit, generator, report: Reporter, label: str) -> float:
        import torch

        features = torch.from_numpy(self.features[split.name])
        labels = torch.from_numpy(split.labels)
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        self.probe.train()
        with report.bar(label, len(order)) as bar:
            for start in range(0, len(order), self.settings.batch_size):
                chosen = order[start : start + self.settings.batch_size]
                self.optimizer.zero_grad(set_to_none=True)
                loss = self.loss(self.probe(features[chosen].to(self.device)), labels[chosen].to(self.device))
                loss.backward()
                self.optimizer.step()
                total += loss.item() * len(chosen)
                bar.advance(len(chosen))
        return total / len(order)

    def probabilities(self, split: CelebaSplit, report: Reporter, label: str) -> np.ndarray:
        import torch

        self.probe.eval()
        with torch.inference_mode():
            logits = self.probe(torch.from_numpy(self.features[split.name]).to(self.device))
        return torch.sigmoid(logits).cpu().numpy()

    def graph(self):
        import torch

        encoder, probe = self.encoder, self.probe

        class EncoderAndProbe(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.encoder, self.probe = encoder, probe

            def forward(self, images):
                features = self.encoder(images)
                return self.probe(features / features.norm(dim=-1, keepdim=True))

        return EncoderAndProbe().eval()

    def export(self, path: Path) -> None:
        export_onnx(self.graph(), self.transform.size, path)


class Images:
    """A torch dataset over one split: (input tensor, 40 labels), optionally flipped at random."""

    def __init__(self, split: CelebaSplit, transform: InputTransform, flip: bool):
        self.split, self.transform, self.flip = split, transform, flip

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        import torch

        image = self.split.image(index)
        if self.flip and float(torch.rand(())) < 0.5:
            image = image[:, ::-1]
        return torch.from_numpy(celeba_input([image], self.transform)[0]), torch.from_numpy(self.split.labels[index])


def export_onnx(module, size: int, path: Path) -> None:
    """``module`` (image batch -> 40 logits) as ONNX on CPU: input ``input``, output ``logits``."""
    import copy

    import torch

    graph = copy.deepcopy(module).cpu().eval()
    # Frozen or no-grad attention takes torch's fused fast path, which has no ONNX export.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        torch.onnx.export(
            graph,
            (torch.zeros(1, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _check(settings: TrainSettings) -> None:
    if settings.model == "clip-probe":
        if not settings.clip_pretrained and not settings.clip_random_weights:
            raise TrainError(
                "--model clip-probe needs --clip-pretrained (an open_clip pretrained tag whose files are in its "
                "cache, or a weights file): without it the encoder is random and the probe learns nothing real"
            )
        if settings.init:
            raise TrainError("--init is for --model resnet50; clip-probe takes --clip-pretrained")
        if settings.image_size is not None:
            raise TrainError("--image-size is for --model resnet50; clip-probe uses its encoder's input size")
    elif settings.clip_pretrained or settings.clip_random_weights:
        raise TrainError("--clip-pretrained and --clip-random-weights are for --model clip-probe")
    if settings.init and not Path(settings.init).expanduser().is_file():
        raise TrainError(f"--init {settings.init}: no such file")
    if not 0 < settings.target_precision <= 1:
        raise TrainError("--target-precision must be in (0, 1]")


def _device(choice: str) -> str:
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"--device {choice}: no CUDA device here")
    return choice


def _files_digest(splits: dict[str, CelebaSplit]) -> str:
    digest = hashlib.sha256()
    for name in SPLITS:
        digest.update(name.encode())
        digest.update("\n".join(splits[name].files).encode())
        digest.update(splits[name].labels.tobytes())
    return digest.hexdigest()


def _prepare_output(output: Path, fingerprint: dict[str, Any], overwrite: bool) -> dict[str, Any]:
    """The state file of ``output``: this run's, an earlier matching one, or refused."""
    state_file = output / STATE
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("fingerprint") == fingerprint:
            return state
        if not overwrite:
            changed = _changed(state.get("fingerprint", {}), fingerprint)
            raise TrainError(
                f"{output} holds a training run with other settings ({changed}); "
                "use another folder, or --overwrite to replace it"
            )
        for name in state.get("files", []):  # only what an earlier run wrote
            (output / name).unlink(missing_ok=True)
        state_file.unlink()
    foreign = [
        name
        for name in (MODEL_FILE, card_path(Path(MODEL_FILE)).name, CHECKPOINT, *(f"features-{s}.npy" for s in SPLITS))
        if (output / name).exists()
    ]
    if foreign:
        raise TrainError(
            f"{output} holds {', '.join(foreign)} that facecap tag train did not write; use another folder"
        )
    output.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fingerprint, "files": []}
    _write_state(output, state)
    return state


def _changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    differences = [
        f"{key}: {old.get('settings', {}).get(key)!r} -> {value!r}"
        for key, value in new["settings"].items()
        if old.get("settings", {}).get(key) != value
    ]
    if old.get("data") != new["data"]:
        differences.append("the data")
    return "; ".join(differences[:4]) or "another version"


def _remember(output: Path, state: dict[str, Any], name: str) -> None:
    if name not in state["files"]:
        state["files"].append(name)
        _write_state(output, state)


def _write_state(output: Path, state: dict[str, Any]) -> None:
    _save_atomic(lambda path: Path(path).write_text(json.dumps(state, indent=2) + "\n"), output / STATE)


def _save_atomic(write: Callable[[str], None], target: Path) -> None:
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(str(temporary))
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("facecap")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


def _mean(values: Iterator[float]) -> float:
    numbers = [v for v in values if not math.isnan(v)]
    return float(np.mean(numbers)) if numbers else float("nan")


@contextmanager
def no_bar(label: str, total: int):
    """A bar that shows nothing (``--quiet``)."""

    class Silent:
        def advance(self, n: int) -> None:
            return None

    yield Silent()
