"""The command factory: every stage command is built from its stage's declared options.

A stage's ``cli.py`` lists which config fields get a flag (``facecap.pipeline.options.Flag``);
here each becomes a Typer option carrying the field's type (a ``Literal`` becomes a choice), its
description and its default, and the runner options every stage shares are added once.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel

from facecap.pipeline.errors import FacecapError
from facecap.pipeline.options import Flag, Invocation, StageCommand, Switch
from facecap.pipeline.stage import Stage
from facecap.pipeline.storage import absolute

# What a command does once its options are gathered: (stage, parent, output, runner options, overrides).
RunStage = Callable[..., None]


def _option(annotation: Any, *names: str, help: str, **extra: Any) -> Any:
    return Annotated[annotation, typer.Option(*names, help=help, **extra)]


# The options every stage command takes, declared once: (parameter name, annotation, default).
RUNNER_OPTIONS: tuple[tuple[str, Any, Any], ...] = (
    (
        "config",
        _option(Path | None, "--config", "-c", help="recipe: a YAML file or a packaged name (demo, default, hq, vlm)"),
        None,
    ),
    (
        "set_",
        _option(list[str] | None, "--set", help="override a recipe key, e.g. --set ingest.shard_size=500 (repeatable)"),
        None,
    ),
    (
        "ray_address",
        _option(str | None, "--ray-address", envvar="RAY_ADDRESS", help="join this Ray cluster instead of a local one"),
        None,
    ),
    (
        "executor",
        _option(
            Literal["auto", "ray", "processes", "local"] | None,
            "--executor",
            help="'auto' (default: Ray when --ray-address/RAY_ADDRESS is set or the stage needs GPUs, else a "
            "process pool on this machine, which starts in milliseconds), 'ray' (local or --ray-address), "
            "'processes' (CPU stages only) or 'local' (one process, for debugging)",
        ),
        None,
    ),
    ("max_retries", _option(int | None, "--max-retries", help="retries of a failing shard"), None),
    ("overwrite", _option(bool, "--overwrite", help="replace an output made with different settings"), False),
    ("quiet", _option(bool, "--quiet", "-q", help="no progress bars or tables (for scripts)"), False),
)
RUNNER_NAMES = tuple(name for name, _, _ in RUNNER_OPTIONS)


def runner_overrides(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "ray.address": options.get("ray_address"),
        "runner.executor": options.get("executor"),
        "runner.max_retries": options.get("max_retries"),
    }


def field_of(model: type[BaseModel], dotted: str) -> Any:
    """The pydantic field at a dotted path of a config model (``image.resize_mode``)."""
    current: Any = model
    parts = dotted.split(".")
    for position, part in enumerate(parts):
        fields = getattr(current, "model_fields", {})
        if part not in fields:
            raise KeyError(f"{model.__name__} has no field '{'.'.join(parts[: position + 1])}'")
        info = fields[part]
        current = _without_none(info.annotation)
    return info


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _flag_annotation(flag: Flag, annotation: Any) -> Any:
    """The option's Python type: the field's, optional; lists as text (comma) or repeated."""
    inner = _without_none(annotation)
    if typing.get_origin(inner) is list:
        return list[str] | None if flag.many == "repeat" else str | None
    if typing.get_origin(inner) is Literal or inner in (str, int, float, bool):
        return inner | None
    if inner is Path:
        return str | None
    raise TypeError(f"{flag.option}: a flag cannot carry a field of type {inner!r}; use --set")


def _flag_help(flag: Flag, info: Any) -> str:
    text = flag.help or info.description or ""
    default = info.get_default(call_default_factory=True)
    if default not in (None, [], {}, "") and not isinstance(default, BaseModel) and flag.help is None:
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        text = f"{text} (default {shown})" if text else f"default {shown}"
    return text


def flag_value(flag: Flag, annotation: Any, value: Any) -> Any:
    """The recipe value of a given flag: comma lists split, local paths made absolute."""
    if value is None:
        return None
    if typing.get_origin(_without_none(annotation)) is list:
        items = value if isinstance(value, list) else [part.strip() for part in value.split(",") if part.strip()]
        return [absolute(item) for item in items] if flag.is_path else items
    return absolute(value) if flag.is_path else value


def build_stage_command(
    spec: StageCommand, stage_cls: type[Stage], run: RunStage, show: Callable[[Any], None]
) -> Callable[..., None]:
    """A Typer command function for ``spec``: IN, OUT, the stage's flags, its switches, the runner's.

    ``run`` runs the stage once the options are gathered; ``show`` prints what an ``intercept``
    reports instead."""
    config_model = stage_cls.config_model
    fields = {flag.parameter: (flag, field_of(config_model, flag.field)) for flag in spec.flags}
    parameters = [
        _parameter("input", Annotated[str, typer.Argument(help=spec.input_help)], inspect.Parameter.empty),
        _parameter(
            "output",
            Annotated[str | None if spec.output_optional else str, typer.Argument(help=spec.output_help)],
            None if spec.output_optional else inspect.Parameter.empty,
        ),
    ]
    for name, (flag, info) in fields.items():
        kind = _flag_annotation(flag, info.annotation)
        names = [flag.option] if kind != bool | None else [f"{flag.option}/--no-{flag.option[2:]}"]
        annotation = _option(kind, *names, help=_flag_help(flag, info))
        parameters.append(_parameter(name, annotation, None))
    for switch in spec.switches:
        parameters.append(_parameter(switch.parameter, _switch_annotation(switch), switch.default))
    if spec.retry_failed:
        help_text = "redo only rows that failed for transient reasons in finished shards"
        parameters.append(_parameter("retry_failed", _option(bool, "--retry-failed", help=help_text), False))
    parameters += [_parameter(name, annotation, default) for name, annotation, default in RUNNER_OPTIONS]

    def command(**values: Any) -> None:
        overrides = {**spec.overrides, **runner_overrides(values)}
        for name, (flag, info) in fields.items():
            overrides[f"{stage_cls.name}.{flag.field}"] = flag_value(flag, info.annotation, values.get(name))
        if spec.input_field:
            overrides[f"{stage_cls.name}.{spec.input_field}"] = [absolute(values["input"])]
        if spec.intercept is not None:
            call = Invocation(
                input=values["input"],
                output=values["output"],
                switches={s.parameter: values.get(s.parameter) for s in spec.switches},
                print=show,
            )
            if spec.intercept(call):
                return
        if values["output"] is None:
            raise FacecapError(f"facecap {spec.command} IN OUT: give an output folder")
        run(
            stage_cls,
            parent=None if spec.input_field else values["input"],
            output=values["output"],
            options={name: values[name] for name in RUNNER_NAMES},
            overrides=overrides,
            retry_failed=bool(values.get("retry_failed")),
        )

    command.__name__ = spec.command
    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    return command


def command_help(spec: StageCommand, stage_cls: type[Stage]) -> tuple[str, str | None]:
    """(help, epilog) of a stage command: the stage's own line, what IN and OUT are, examples."""
    text = spec.help or stage_cls.help
    if spec.summary:
        text += "\n\n" + spec.summary
    epilog = "Examples:\n\n" + "\n".join(f"* `{example}`" for example in spec.examples) if spec.examples else None
    return text, epilog


def _switch_annotation(switch: Switch) -> Any:
    kind = switch.type | None if switch.default is None else switch.type
    return _option(kind, switch.name, help=switch.help)


def _parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
