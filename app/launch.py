"""The ``facecap`` command: starts the process pool's fork server early, then runs the CLI.

With the process pool (``--executor processes``, or ``auto`` with no cluster named), workers are
forked from a server that first imports the stage's modules (about a second). Started here,
before the CLI has imported anything heavy (another second), the two imports run side by side on
two cores instead of one after the other: a second less before the first image, measured in the
download benchmark. This module imports nothing heavy itself; every other command goes straight
to the CLI, and a run whose executor comes from a recipe file rather than the command line simply
starts the server later, in the executor.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import pkgutil
import sys
from multiprocessing import forkserver

STAGES_PACKAGE = "facecap.stages"
WORKER_MODULE = "facecap.pipeline.worker"


def main() -> None:
    preload = fork_server_preload(sys.argv[1:])
    if preload:
        multiprocessing.get_context("forkserver").set_forkserver_preload(preload)
        forkserver.ensure_running()  # returns at once; the server imports in the background
    from facecap.cli import main as cli_main

    cli_main()


def fork_server_preload(args: list[str]) -> list[str] | None:
    """The modules a process-pool run of these arguments needs, or None for any other command."""
    if not _asks_for_processes(args):
        return None
    command = next((arg for arg in args if not arg.startswith("-")), None)
    folders = stage_folders()
    if command in folders:  # a stage command is named like its folder
        return [WORKER_MODULE, f"{STAGES_PACKAGE}.{command}"]
    if command == "run":
        return [WORKER_MODULE, *(f"{STAGES_PACKAGE}.{folder}" for folder in folders)]
    return None


def stage_folders() -> list[str]:
    """The folders of ``facecap.stages``, found without importing any of them."""
    spec = importlib.util.find_spec(STAGES_PACKAGE)
    locations = spec.submodule_search_locations if spec else None
    return [info.name for info in pkgutil.iter_modules(locations or []) if info.ispkg]


def _asks_for_processes(args: list[str]) -> bool:
    """Whether the run may use the process pool: asked for, or left to ``auto`` with no cluster named."""
    if (
        "--ray-address" in args
        or any(arg.startswith("--ray-address=") for arg in args)
        or os.environ.get("RAY_ADDRESS")
    ):
        return False
    for index, arg in enumerate(args):
        if arg == "--executor":
            return args[index + 1 : index + 2] in (["processes"], ["auto"])
        if arg.startswith("--executor="):
            return arg in ("--executor=processes", "--executor=auto")
    return True  # auto: a stage on one machine runs on the pool unless it needs GPUs
