"""facecap's framework: stage contract, runner, workers, executors, dataset format, storage, config,
model registry and thread budget.

It names no stage: stages (the work) live in ``facecap.stages``, one folder each, and register
themselves (``facecap.pipeline.registry``). This package owns Ray, storage, resume, retries and
statistics, so that a stage stays a small class with a batch function.
"""
