"""Quality: measure face and image quality and apply the recipe's rules (`facecap quality`, alias `filter`)."""

from facecap.stages.quality import models  # registers its model files
from facecap.stages.quality.stage import QualityStage

__all__ = ["QualityStage", "models"]
