"""Caption: grammar captions, an LLM rewrite or a VLM; `facecap recaption` captions again."""

from facecap.stages.caption.stage import CaptionStage

__all__ = ["CaptionStage"]
