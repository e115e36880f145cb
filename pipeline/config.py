"""Recipes: YAML files validated by pydantic, overridden by CLI flags.

Every error names the file, the key and what was expected, on one line.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
from collections.abc import Mapping, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from facecap.pipeline.errors import ConfigError
from facecap.pipeline.stage import Stage
from facecap.pipeline.storage import StorageOptions


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RayConfig(Section):
    """Where work runs. No address: an embedded local Ray sized for this machine."""

    address: str | None = Field(None, description="Ray cluster address (or env RAY_ADDRESS); none = local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for the local Ray; default: all cores")
    object_store_mb: int = Field(512, ge=64, description="object store size of the local Ray")
    reserve_cpus: int = Field(
        0,
        ge=0,
        description="CPUs kept free for the driver by actor pools on the local Ray and by the process pool "
        "(default 0: the driver only waits, measured at 1-2% of a core; pipeline/cpu_policy.py)",
    )


class RunnerConfig(Section):
    executor: Literal["auto", "ray", "processes", "local"] = Field(
        "auto",
        description="'auto' (Ray when a cluster is named or the stage needs GPUs, else the process pool), "
        "'ray' (local or a cluster), 'processes' (a process pool on this machine, no Ray start-up; "
        "CPU stages), 'local' (shards one by one in this process: debugging, tiny data)",
    )
    workers: int | None = Field(
        None, ge=1, description="worker CPUs of the 'processes' executor; default ray.num_cpus, else all cores"
    )
    max_retries: int = Field(2, ge=0, description="retries of a failing shard before it is marked failed")
    verify: Literal["none", "size", "sha256"] = Field(
        "size", description="how done shards are checked before they are trusted on resume"
    )
    max_in_flight: int | None = Field(None, ge=1, description="shards queued at once; default 2 per worker")
    fuse: bool = Field(
        True,
        description="`facecap run`: consecutive per-shard stages on the same executor run in one task per "
        "shard, passing rows and media in memory and decoding each image once (--no-fuse: one by one)",
    )


class StorageConfig(Section):
    s3_endpoint: str | None = Field(None, description="S3-compatible endpoint URL (or env AWS_ENDPOINT_URL)")
    s3_region: str | None = None
    s3_anonymous: bool = False

    def options(self) -> StorageOptions:
        env = StorageOptions.from_env()
        return StorageOptions(
            s3_endpoint=self.s3_endpoint or env.s3_endpoint,
            s3_region=self.s3_region or env.s3_region,
            s3_anonymous=self.s3_anonymous,
        )


class RecipeBase(Section):
    name: str = "facecap"
    description: str = ""
    output: str | None = Field(None, description="work folder of `facecap run`: one dataset per stage")
    stages: list[str] = Field(default_factory=lambda: ["ingest"], description="the chain `facecap run` runs")
    ray: RayConfig = Field(default_factory=RayConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)


def recipe_model(stages: Mapping[str, type[Stage]]) -> type[RecipeBase]:
    """The full recipe model: the framework sections plus one section per registered stage."""
    fields: dict[str, Any] = {
        name: (cls.config_model, Field(default_factory=cls.config_model)) for name, cls in stages.items()
    }
    chain = list(stages)  # without a recipe, `facecap run` runs every stage there is
    fields["stages"] = (list[str], Field(default_factory=lambda: list(chain), description="the chain to run"))
    return create_model("Recipe", __base__=RecipeBase, **fields)


def load_recipe(
    path: str | os.PathLike | None,
    stages: Mapping[str, type[Stage]],
    overrides: Mapping[str, Any] | None = None,
    packaged: str | None = None,
) -> RecipeBase:
    """Read a YAML recipe (or the defaults when ``path`` is None) and apply dotted overrides.

    ``path`` is a file, or the name of a recipe shipped in the package ``packaged`` (``demo``
    for ``<packaged>/demo.yaml``), so an installed wheel runs its recipes from any folder.
    """
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_yaml(recipe_source(path, packaged))
    for dotted, value in (overrides or {}).items():
        _set_dotted(data, dotted, value)
    model = recipe_model(stages)
    try:
        recipe = model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc, model)) from None
    unknown = [s for s in recipe.stages if s not in stages]
    if unknown:
        raise ConfigError(f"{source}: stages: unknown stage '{unknown[0]}' (known: {', '.join(stages)})")
    return recipe


def parse_set_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``--set ingest.shard_size=500`` -> {"ingest.shard_size": 500} (values parsed as YAML)."""
    parsed: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {shorten(pair)}: expected KEY=VALUE, e.g. --set ingest.shard_size=500")
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            parsed[key.strip()] = raw
        try:
            expanded_size(parsed[key.strip()])
        except ConfigError as exc:
            raise ConfigError(f"--set {key.strip()[:80]}: {exc}") from None
    return parsed


def format_validation_error(source: str, exc: ValidationError, model: type[BaseModel]) -> str:
    errors = exc.errors()
    first = errors[0]
    location = ".".join(str(part) for part in first["loc"])
    if len(location) > 120:  # keys are user input too
        location = location[:117] + "..."
    if first["type"] == "extra_forbidden":
        message = f"{source}: unknown key '{location}'"
        hint = _closest_key(model, first["loc"])
        if hint:
            message += f" (did you mean '{hint}'?)"
    elif first["type"] == "missing":
        message = f"{source}: {location}: required key is missing"
    else:
        message = f"{source}: {location}: {first['msg'].lower()} (got {shorten(first.get('input'))})"
    if len(errors) > 1:
        message += f" [and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''}]"
    return message


def _closest_key(model: type[BaseModel], loc: Sequence[Any]) -> str | None:
    current: Any = model
    for part in loc[:-1]:
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return None
        current = field.annotation
    names = list(getattr(current, "model_fields", {}))
    match = difflib.get_close_matches(str(loc[-1]), names, n=1)
    if not match:
        return None
    return ".".join([*(str(p) for p in loc[:-1]), match[0]])


def packaged_recipes(packaged: str | None) -> list[str]:
    """The names of the recipes shipped in the package ``packaged``."""
    if packaged is None:
        return []
    root = importlib.resources.files(packaged)
    return sorted(item.name[: -len(".yaml")] for item in root.iterdir() if item.name.endswith(".yaml"))


def recipe_source(path: str | os.PathLike, packaged: str | None = None) -> Path | Traversable:
    """A recipe file as given, else the packaged recipe of that name; one line when neither exists."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.name[: -len(".yaml")] if given.name.endswith(".yaml") else given.name
    if packaged is not None and str(path) in (name, f"{name}.yaml"):
        shipped = importlib.resources.files(packaged).joinpath(f"{name}.yaml")
        if shipped.is_file():
            return shipped
    known = ", ".join(packaged_recipes(packaged))
    raise ConfigError(f"{path}: no such recipe file" + (f" (packaged recipes: {known})" if known else ""))


# A recipe is a few hundred values: YAML aliases that expand past this are a bomb, not a recipe
# (nested aliases made a 382-byte file validate for 19 s in 1.6 GB).
MAX_RECIPE_VALUES = 100_000


def expanded_size(data: Any, limit: int = MAX_RECIPE_VALUES) -> int:
    """How many values ``data`` holds with every alias expanded; ConfigError past ``limit`` or on a cycle."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        ident = id(node)
        if ident in sizes:
            return sizes[ident]
        if ident in in_progress:
            raise ConfigError("the recipe refers to itself through a YAML alias (a cycle)")
        in_progress.add(ident)
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                raise ConfigError(
                    f"the recipe expands to more than {limit:,} values through YAML aliases; "
                    "a recipe needs no more than a few hundred"
                )
        in_progress.discard(ident)
        sizes[ident] = total
        return total

    return size(data)


def shorten(value: Any, width: int = 80) -> str:
    """``repr(value)`` cut to ``width`` characters, for error messages that echo user input."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _read_yaml(path: Path | Traversable) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save the recipe as UTF-8") from None
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise ConfigError(f"{path}: line {line}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    try:
        expanded_size(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value
