"""Every flag that docs/cli.md and the README show is a flag of some `facecap` command."""

from __future__ import annotations

import re
from pathlib import Path

from typer.main import get_command

from facecap.cli import app

REPO = Path(__file__).resolve().parents[2]
# Flags of other programs the docs show beside facecap's (`ray start --head --port`, ...).
NOT_OURS = {"--head", "--port", "--address", "--help"}


def all_options() -> set[str]:
    found: set[str] = set()
    pending = [get_command(app)]
    while pending:
        command = pending.pop()
        for parameter in command.params:
            found.update(parameter.opts + parameter.secondary_opts)
        pending.extend(getattr(command, "commands", {}).values())
    return found


def test_every_documented_flag_exists():
    documented = set()
    for doc in (REPO / "docs" / "cli.md", REPO / "README.md"):
        documented |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", doc.read_text()))
    missing = sorted(documented - NOT_OURS - all_options())
    assert not missing, f"documented but not a flag of any command: {missing}"
