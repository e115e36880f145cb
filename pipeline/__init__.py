"""facecap's framework: dataset format, storage, config, runner, CLI.

Stages (the work) live in the sibling package ``stages``; this package owns Ray, storage,
resume, retries and statistics, so that a stage stays a small class with a batch function.
"""

__version__ = "0.1.0"
