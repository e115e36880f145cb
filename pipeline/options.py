"""What a stage's command line offers, declared next to the stage (``stages/<name>/cli.py``).

A stage names the config fields that deserve a flag; the application's command factory turns
each into an option with the field's type, choices, default and description, and adds the
runner's options (recipe, ``--set``, Ray, executor, retries, overwrite, quiet) to every stage
command once. Nothing here imports a CLI library: the declarations stay plain data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Flag:
    """An option for one field of the stage's config section, e.g. ``Flag("image.resize_mode")``.

    The option is ``--resize-mode`` (the field's last part) unless ``name`` says otherwise; its
    help is the field's description unless ``help`` says otherwise. A list field takes one
    comma-separated value (``--kinds exact,near``), or repeats with ``many="repeat"``.
    """

    field: str
    name: str | None = None
    help: str | None = None
    many: Literal["comma", "repeat"] = "comma"
    # Local paths are made absolute before they reach the workers (whose folder may differ).
    is_path: bool = False

    @property
    def option(self) -> str:
        return "--" + (self.name or self.field.rsplit(".", 1)[-1]).replace("_", "-")

    @property
    def parameter(self) -> str:
        return self.option[2:].replace("-", "_")


@dataclass(frozen=True)
class Switch:
    """An option that is not a config field: a mode of the command (``--explain``, ``--calibrate``)."""

    name: str
    type: type
    help: str
    default: Any = None

    @property
    def parameter(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


@dataclass
class Invocation:
    """What a stage command was called with, for its ``intercept`` hook."""

    input: str | None
    output: str | None
    switches: dict[str, Any]
    # Shows a table or a line on the command's output.
    print: Callable[[Any], None]


@dataclass(frozen=True)
class StageCommand:
    """One command that runs a stage: ``facecap <name> IN OUT [flags]``.

    ``intercept`` runs first and may handle the call itself (a report on a finished dataset:
    ``--explain``, ``--calibrate``) by returning True; it may also reject the input with a
    ``FacecapError``. ``overrides`` adds fixed recipe keys (recaption's ``caption.replace``).
    """

    stage: str
    name: str | None = None
    # The command's first paragraph (default: the stage's own ``help``), then what IN and OUT are.
    help: str | None = None
    summary: str = ""
    flags: tuple[Flag, ...] = ()
    switches: tuple[Switch, ...] = ()
    examples: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    input_help: str = "the dataset this stage reads (a folder, local or s3://)"
    output_help: str = "dataset folder to write (local or s3://)"
    # The source stage reads outside input: IN goes to this config field (a list) instead.
    input_field: str | None = None
    output_optional: bool = False
    retry_failed: bool = False
    intercept: Callable[[Invocation], bool] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    # Commands under this one, (function, epilog) as in EXTRA_COMMANDS: ``facecap tag train DATA OUT``
    # runs ``train``; any other first argument runs the stage as usual.
    subcommands: tuple[tuple[Callable[..., None], str | None], ...] = ()

    @property
    def command(self) -> str:
        return self.name or self.stage
