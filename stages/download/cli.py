"""``facecap download``: its flags and examples (the command itself is built by the CLI root)."""

from facecap.pipeline.options import Flag, StageCommand

COMMANDS = (
    StageCommand(
        stage="download",
        summary="IN: an ingested dataset; OUT: the dataset to write (images in WebDataset tars, KEY.jpg + "
        "KEY.json, with the rows in Parquet).",
        input_help="dataset folder made by `facecap ingest`",
        flags=(
            Flag("concurrency", help="downloads in flight per worker (default 32)"),
            Flag("image.resize_mode"),
            Flag("image.image_size", help="target side for resizing (default 512)"),
            Flag("image.output_format", help="stored image format (default jpg)"),
            Flag("safety.allow_private_networks", help="allow loopback/private addresses (local corpora, tests)"),
        ),
        retry_failed=True,
        examples=(
            "facecap download work/ingest work/download",
            "facecap download work/ingest work/download --resize-mode keep_ratio --image-size 512",
            "facecap download work/ingest work/download --retry-failed (only timeouts, 429s, 5xx, resets)",
            "facecap download work/ingest work/download --set download.http.per_host_rate=2",
        ),
    ),
)
