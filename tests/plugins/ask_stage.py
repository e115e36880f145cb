"""The toy ``ask`` stage (tests/toystages.py) as a plugin (FACECAP_STAGES=ask_stage, this folder and
tests/ on PYTHONPATH), so `facecap run` can run a stage whose errors name its server's URL."""

from __future__ import annotations

from toystages import Ask

from facecap.pipeline.registry import register


@register
class AskStage(Ask):
    order = 900
    help = "Ask a chat server about some rows (tests)."
