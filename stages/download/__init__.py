"""Download: fetch, check and normalise every ok row's image into WebDataset tars."""

from facecap.stages.download.stage import DownloadStage

__all__ = ["DownloadStage"]
