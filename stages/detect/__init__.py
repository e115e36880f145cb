"""Detect: find faces, apply the face policy, store box/square/aligned crops."""

from facecap.stages.detect import models  # registers its model files
from facecap.stages.detect.stage import DetectStage

__all__ = ["DetectStage", "models"]
