"""The stages facecap has, in pipeline order. A stage appears here (and in the CLI) once built."""

from pipeline.stage import Stage
from stages.caption import CaptionStage
from stages.dedup import DedupStage
from stages.detect import DetectStage
from stages.download import DownloadStage
from stages.ingest import IngestStage
from stages.quality import QualityStage
from stages.tag import TagStage

REGISTRY: dict[str, type[Stage]] = {
    IngestStage.name: IngestStage,
    DownloadStage.name: DownloadStage,
    DetectStage.name: DetectStage,
    QualityStage.name: QualityStage,
    TagStage.name: TagStage,
    CaptionStage.name: CaptionStage,
    DedupStage.name: DedupStage,
}

__all__ = ["REGISTRY"]
