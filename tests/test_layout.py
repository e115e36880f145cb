"""The house rules of the source tree, checked on the imports themselves (docs/architecture.md):
the framework names no stage and no application module, and no stage imports another stage."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "facecap" or name.startswith("facecap.")}


def test_the_framework_imports_no_stage_and_no_application_module():
    for path in sorted((REPO / "pipeline").rglob("*.py")):
        for name in imported_modules(path):
            # `from facecap import __version__` is the package's version, not the application.
            assert name.startswith("facecap.pipeline") or name in ("facecap", "facecap.__version__"), (path, name)


def test_no_stage_imports_another_stage():
    stages = REPO / "stages"
    folders = sorted(p for p in stages.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert {p.name for p in folders} >= {"ingest", "download", "detect", "quality", "tag", "caption", "dedup"}
    for folder in folders:
        allowed = ("facecap.pipeline", "facecap.stages.shared", f"facecap.stages.{folder.name}")
        for path in sorted(folder.rglob("*.py")):
            for name in imported_modules(path):
                assert name.startswith(allowed), (str(path.relative_to(REPO)), name)


def test_shared_helpers_import_no_stage():
    for path in sorted((REPO / "stages" / "shared").rglob("*.py")):
        for name in imported_modules(path):
            assert name.startswith(("facecap.pipeline", "facecap.stages.shared")), (path, name)
