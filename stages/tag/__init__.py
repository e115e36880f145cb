"""Tag: attributes per face (CelebA-40, age, gender, expression, pose, skin tone)."""

from facecap.pipeline.models import register_model_file
from facecap.stages.tag.stage import TagStage

register_model_file(__name__)  # the model files it uses, listed in models.yaml beside this file

__all__ = ["TagStage"]
