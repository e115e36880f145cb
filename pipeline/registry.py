"""Which stages exist. Each stage folder registers its own Stage class; the framework names none.

``discover(package)`` imports every sub-package of ``package`` (a stage registers itself on
import, with ``@register``) and any plugin modules named in ``$FACECAP_STAGES`` (comma-separated,
importable), and returns the stages in pipeline order (``Stage.order``). Adding a stage is
adding one folder; a stage kept outside facecap is one importable module and one variable.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from typing import TypeVar

from facecap.pipeline.errors import ConfigError
from facecap.pipeline.stage import Stage

PLUGINS_ENV = "FACECAP_STAGES"
_REGISTERED: dict[str, type[Stage]] = {}
S = TypeVar("S", bound=type[Stage])


def register(stage_cls: S) -> S:
    """Class decorator: make a stage known to the runner, the recipe model and the CLI."""
    known = _REGISTERED.get(stage_cls.name)
    if known is not None and known.__qualname__ != stage_cls.__qualname__:
        raise ConfigError(f"two stages are called '{stage_cls.name}': {known.__module__} and {stage_cls.__module__}")
    _REGISTERED[stage_cls.name] = stage_cls
    return stage_cls


def discover(package: str) -> dict[str, type[Stage]]:
    """Import the stage folders of ``package`` and the plugins; every registered stage, in order."""
    root = importlib.import_module(package)
    for info in pkgutil.iter_modules(root.__path__):
        if info.ispkg:
            importlib.import_module(f"{package}.{info.name}")
    for module in plugin_modules():
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"{PLUGINS_ENV}: cannot import stage module '{module}' ({exc})") from None
    return registered()


def registered() -> dict[str, type[Stage]]:
    """The stages registered so far, in pipeline order (then by name)."""
    ordered = sorted(_REGISTERED.values(), key=lambda cls: (cls.order, cls.name))
    return {cls.name: cls for cls in ordered}


def plugin_modules() -> list[str]:
    return [name.strip() for name in os.environ.get(PLUGINS_ENV, "").split(",") if name.strip()]


def report_measures() -> tuple:
    """Every registered stage's report measures, once each by name, in pipeline order."""
    found: dict[str, object] = {}
    for stage_cls in registered().values():
        for measure in stage_cls.summaries:
            found.setdefault(measure.name, measure)
    return tuple(found.values())
