"""Tag: attributes per face (CelebA-40, age, gender, expression, pose, skin tone)."""

from facecap.stages.tag import models  # registers its model files
from facecap.stages.tag.stage import TagStage

__all__ = ["TagStage", "models"]
