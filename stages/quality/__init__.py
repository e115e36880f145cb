"""Quality: measure face and image quality and apply the recipe's rules (`facecap quality`, alias `filter`)."""

from facecap.pipeline.models import register_model_file
from facecap.stages.quality.stage import QualityStage

register_model_file(__name__)  # the model files it uses, listed in models.yaml beside this file

__all__ = ["QualityStage"]
