"""Dedup: exact, perceptual, same-face and identity-cap duplicates; eval-set decontamination."""

from facecap.pipeline.models import register_model_file
from facecap.stages.dedup.stage import DedupStage

register_model_file(__name__)  # the model files it uses, listed in models.yaml beside this file

__all__ = ["DedupStage"]
