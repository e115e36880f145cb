"""Ingest: URL lists (Parquet, CSV, TSV, JSONL, text; an img2dataset folder) into a dataset, one status per URL."""

from facecap.stages.ingest.stage import IngestStage

__all__ = ["IngestStage"]
