"""Detect: find faces, apply the face policy, store box/square/aligned crops."""

from facecap.pipeline.models import register_model_file
from facecap.stages.detect.stage import DetectStage

register_model_file(__name__)  # the model files it uses, listed in models.yaml beside this file

__all__ = ["DetectStage"]
