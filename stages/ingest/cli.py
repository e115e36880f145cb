"""``facecap ingest``: its flags and examples (the command itself is built by the CLI root)."""

from facecap.pipeline.options import Flag, StageCommand

COMMANDS = (
    StageCommand(
        stage="ingest",
        summary="INPUT: a file, folder or quoted glob of parquet/csv/tsv/jsonl/txt URL lists (optionally .gz), "
        "or an img2dataset output folder.",
        input_help="URL list file, folder, glob, or img2dataset folder",
        input_field="input",
        flags=(
            Flag("url_column", help="URL column (LAION: URL)"),
            Flag("caption_column", help="caption column (LAION: TEXT)"),
            Flag("format", help="input format; auto guesses it from the file names"),
            Flag("shard_size", help="rows per shard (default 10000)"),
            Flag("opt_out", many="repeat", is_path=True, help="file of opted-out domains / URL sha256s (repeatable)"),
        ),
        examples=(
            "facecap ingest laion-face/ work/ingest --url-column URL --caption-column TEXT",
            "facecap ingest 'lists/*.csv.gz' s3://bucket/work/ingest --shard-size 5000",
            "facecap ingest img2dataset-out/ work/ingest (already downloaded: images referenced, not copied)",
            "facecap ingest urls.txt work/ingest --opt-out optout-domains.txt",
        ),
    ),
)
