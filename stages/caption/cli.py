"""``facecap caption`` and ``facecap recaption``: their flags (the commands are built by the CLI root)."""

from __future__ import annotations

from typing import Literal

import pyarrow.parquet as pq

from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.options import Flag, Invocation, StageCommand, Switch
from facecap.pipeline.registry import registered
from facecap.pipeline.storage import absolute

CAPTIONER_FLAGS = (
    Flag("captioner", help="template (default), rewrite or vlm"),
    Flag("engine", help="rewrite/vlm: openai (any OpenAI-compatible server), vllm or transformers"),
    Flag("model", help="rewrite/vlm: model name, or a local folder for transformers"),
    Flag("openai.base_url", help="openai engine: server URL, e.g. http://localhost:8000/v1"),
)


def is_facecap_dataset(uri: str) -> bool:
    """A stage's dataset folder (recaptioned into a dataset), not an export, tars or a pattern."""
    if "{" in uri or any(c in uri for c in "*?[") or uri.endswith(".tar"):
        return False
    manifest, _ = Dataset.at(uri).stage_manifest()
    return manifest is not None


def recaption(call: Invocation) -> bool:
    """A facecap dataset goes through the stage (new Parquet, same tars); any other WebDataset
    shards are captioned here, into sidecars or new shards (stages/caption/shards.py)."""
    write = call.switches.get("write")
    if is_facecap_dataset(call.input):
        if write or call.switches.get("faces"):
            raise FacecapError(
                f"{call.input} is a facecap dataset: recaption writes a dataset from it (no --write or --faces); "
                "export it and recaption the export for sidecars or shards"
            )
        return require_captions(call)
    if call.output is None:
        raise FacecapError("facecap recaption SHARDS OUT: give an output folder")
    from facecap.stages.caption.shards import recaption_shards

    recipe = call.recipe()
    quiet = call.options.get("quiet")

    def report(shard) -> None:
        if quiet:
            return
        if shard.error:
            call.print(f"recaption: {shard.name}: unreadable ({shard.error})")
        elif shard.skipped:
            call.print(f"recaption: {shard.name}: {shard.samples:,} samples, already captioned with this version")
        else:
            done = f"{shard.captioned:,} captioned, {shard.failed:,} failed"
            call.print(f"recaption: {shard.name}: {shard.samples:,} samples, {done}")

    detect = None
    if call.switches.get("faces"):  # the detect stage, found by name: no stage imports another
        stages = registered()
        if "detect" not in stages:
            raise FacecapError("recaption --faces needs the detect stage, which is not installed")
        detect = (stages["detect"], recipe.detect)
    result = recaption_shards(
        call.input, absolute(call.output), recipe.caption, write or "sidecars", recipe.storage.options(), report, detect
    )
    unreadable = [s for s in result.shards if s.error]
    if not quiet:
        call.print(
            f"recaption: version {result.version}: {result.captioned:,} captions written, "
            f"{sum(s.skipped for s in result.shards)}/{len(result.shards)} shards had nothing to do -> {call.output}"
        )
    if unreadable:
        raise FacecapError(f"recaption: {len(unreadable)} shard(s) could not be read (first: {unreadable[0].error})")
    return True


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
        help="Caption again (a new VLM, prompt or seed): a captioned facecap dataset into a new dataset "
        "(Parquet only, earlier captions kept in caption_versions unless --replace), or any WebDataset shards "
        "(a facecap export, an img2dataset folder, anyone's tars) into per-shard caption sidecars or new shards; "
        "images are read in place, and a rerun captions only keys without a caption of this version.",
        input_help="a captioned facecap dataset, or shards: a folder of tars, a tar, a brace pattern "
        "(shards-{000000..000099}.tar) or a glob, local or s3://",
        output_help="folder to write (local or s3://); for sidecars it may be the shards' own folder",
        flags=(*CAPTIONER_FLAGS, Flag("replace", help="drop the earlier captions instead of keeping them")),
        switches=(
            Switch(
                "--write",
                Literal["sidecars", "shards"],
                "shards only: sidecars (default: STEM.captions.parquet and STEM_facecap.json per shard) or "
                "shards (new tars, the new caption as txt and in json)",
            ),
            Switch(
                "--faces",
                bool,
                "shards only, vlm: detect faces on the fly (the recipe's detect section) and caption each image's "
                "largest face crop; images without one are captioned whole",
                default=False,
            ),
        ),
        intercept=recaption,
        examples=(
            "facecap recaption work/caption work/caption-qwen --captioner vlm --base-url http://head:8000/v1 "
            "--model Qwen/Qwen2.5-VL-7B-Instruct",
            "facecap recaption work/caption work/caption-v2 --captioner template --set caption.seed=1 --replace",
            "facecap recaption 's3://bucket/laion/{00000..00099}.tar' s3://bucket/captions --captioner vlm "
            "--base-url http://head:8000/v1 --model Qwen/Qwen2.5-VL-7B-Instruct (sidecars; rerun to resume)",
            "facecap recaption shards/ shards-qwen/ --write shards --captioner vlm --engine vllm "
            "--model Qwen/Qwen2.5-VL-7B-Instruct (new tars, shard for shard)",
        ),
    ),
)
