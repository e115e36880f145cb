"""Packaging glue that pyproject.toml cannot express: one import namespace over three folders.

The repository keeps the framework in ``pipeline/``, the stages in ``stages/`` (one folder each),
the recipes and prompts in ``configs/`` and the application layer (CLI root, report, demo) in
``app/``; installed, they are ``facecap.pipeline``, ``facecap.stages``, ``facecap.configs`` and
``facecap``. Sub-packages are found here, so adding a stage folder needs no edit of this file.
"""

from setuptools import find_packages, setup

FOLDERS = {"facecap": "app", "facecap.pipeline": "pipeline", "facecap.stages": "stages", "facecap.configs": "configs"}


def packages() -> list[str]:
    found = ["facecap"]
    for name, folder in FOLDERS.items():
        if name == "facecap":
            continue
        found.append(name)
        found += [f"{name}.{sub}" for sub in find_packages(folder)]
    return found


setup(packages=packages(), package_dir=FOLDERS)
