"""Dedup: exact, perceptual, same-face and identity-cap duplicates; eval-set decontamination."""

from facecap.stages.dedup.stage import DedupStage

__all__ = ["DedupStage"]
