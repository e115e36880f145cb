"""``facecap caption`` and ``facecap recaption``: their flags (the commands are built by the CLI root)."""

from __future__ import annotations

import pyarrow.parquet as pq

from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.options import Flag, Invocation, StageCommand

CAPTIONER_FLAGS = (
    Flag("captioner", help="template (default), rewrite or vlm"),
    Flag("engine", help="rewrite/vlm: openai (any OpenAI-compatible server), vllm or transformers"),
    Flag("model", help="rewrite/vlm: model name, or a local folder for transformers"),
    Flag("openai.base_url", help="openai engine: server URL, e.g. http://localhost:8000/v1"),
)


def require_captions(call: Invocation) -> bool:
    """Recaption reads a captioned dataset: say so in one line when IN has no captions."""
    parent = Dataset.at(call.input)
    done = parent.done_shards()
    if done:
        with parent.storage.open_read(parent.parquet_name(done[0])) as f:
            if "caption" in pq.read_schema(f).names:
                return False
    raise FacecapError(f"{call.input} has no captions yet: run `facecap caption` first")


COMMANDS = (
    StageCommand(
        stage="caption",
        summary="IN: tagged face rows; OUT: caption (a list), caption_short, caption_provenance; rows whose "
        "caption fails its checks twice get caption:invalid.",
        input_help="face dataset with attributes (tag)",
        flags=CAPTIONER_FLAGS,
        examples=(
            "facecap caption work/tag work/caption (FaceCaption-15M's grammar over the confident attributes; offline)",
            "facecap caption work/tag work/caption --captioner rewrite --base-url http://head:8000/v1 "
            "--model Qwen/Qwen2.5-7B-Instruct (any OpenAI-compatible server, e.g. `vllm serve`)",
            "facecap caption work/tag work/caption --captioner vlm --engine vllm --model Qwen/Qwen2.5-VL-7B-Instruct "
            "--set caption.gpus=1",
        ),
    ),
    StageCommand(
        stage="caption",
        name="recaption",
        help="Caption a captioned dataset again (a new VLM, prompt or seed) into a new folder: Parquet only, "
        "the images stay where they are; earlier captions are kept in caption_versions unless --replace.",
        input_help="a dataset with captions (caption, or an earlier recaption)",
        flags=(*CAPTIONER_FLAGS, Flag("replace", help="drop the earlier captions instead of keeping them")),
        intercept=require_captions,
        examples=(
            "facecap recaption work/caption work/caption-qwen --captioner vlm --base-url http://head:8000/v1 "
            "--model Qwen/Qwen2.5-VL-7B-Instruct",
            "facecap recaption work/caption work/caption-v2 --captioner template --set caption.seed=1 --replace",
        ),
    ),
)
