"""`facecap recaption` on WebDataset shards facecap did not write: plain tars from webdataset's own
TarWriter (png and webp images, cls members), an img2dataset folder, a facecap export; sidecars and
new shards; incremental reruns; the VLM path through an OpenAI-compatible server."""

from __future__ import annotations

import io
import json
import tarfile
import uuid
from pathlib import Path

import insightface
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from helpers import run_recipe
from openai_server import OpenAIServer
from PIL import Image
from tinymodels import tiny_vlm
from typer.testing import CliRunner

from facecap.cli import app
from facecap.pipeline.errors import FacecapError
from facecap.stages.caption.shards import expand_shards, recaption_shards
from facecap.stages.caption.stage import CaptionConfig, CaptionStage
from facecap.stages.export.export import ExportSettings, export

GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


def photo(seed: int, fmt: str) -> bytes:
    pixels = (np.random.default_rng(seed).random((48, 64, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt.upper())
    return buffer.getvalue()


@pytest.fixture
def plain(tmp_path) -> Path:
    """Two shards written by webdataset.TarWriter: png and webp images, txt, cls and json members."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for shard in range(2):
        with wds.TarWriter(str(folder / f"shards-{shard:06d}.tar")) as writer:
            for i in range(3):
                fmt = "png" if i % 2 == 0 else "webp"
                sample = {"__key__": f"s{shard}-{i}", fmt: photo(10 * shard + i, fmt), "txt": f"old {shard} {i}"}
                writer.write({**sample, "cls": i, "json": {"source": "plain", "index": i}})
    return folder


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(app, ["recaption", *args, "--quiet"])
    assert result.exit_code == 0, result.output
    return result.output


def sidecar(out: Path, stem: str) -> pd.DataFrame:
    return pq.read_table(out / f"{stem}.captions.parquet").to_pandas()


def test_expand_names_braces_globs_folders_and_refuses_nothing(plain):
    both = [str(plain / f"shards-{i:06d}.tar") for i in range(2)]
    assert expand_shards(str(plain / "shards-{000000..000001}.tar")) == both
    assert expand_shards(str(plain / "shards-*.tar")) == both
    assert expand_shards(str(plain)) == both
    assert expand_shards(str(plain / "shards-000001.tar")) == both[1:]
    with pytest.raises(FacecapError, match="no such shard"):
        expand_shards(str(plain / "shards-{000001..000002}.tar"))
    with pytest.raises(FacecapError, match="names no WebDataset tars"):
        expand_shards(str(plain / "none-*.tar"))


def test_plain_shards_get_sidecars_then_new_shards_and_a_rerun_does_no_work(plain, tmp_path):
    out = tmp_path / "sidecars"
    pattern = str(plain / "shards-{000000..000001}.tar")
    first = recaption_shards(pattern, str(out), CaptionConfig())
    assert first.captioned == 6 and not any(s.skipped for s in first.shards)
    rows = sidecar(out, "shards-000000")
    assert sorted(rows.key) == ["s0-0", "s0-1", "s0-2"] and (rows.status == "ok").all()
    assert set(rows.version) == {first.version} and (rows.captioner == "template").all() and rows.seed.eq(0).all()
    assert all(json.loads(p)["captioner"] == "template" for p in rows.provenance)
    sana = json.loads((out / "shards-000000_facecap.json").read_text())
    assert sana["s0-1"] == {
        "facecap": rows.set_index("key").caption["s0-1"][0],
        f"facecap_{first.version}": sana["s0-1"]["facecap"],
    }
    assert sorted(p.name for p in plain.iterdir()) == ["shards-000000.tar", "shards-000001.tar"]  # inputs untouched
    again = recaption_shards(pattern, str(out), CaptionConfig())
    assert again.captioned == 0 and all(s.skipped for s in again.shards)  # no work at all
    # Another seed is another version, beside the first.
    other = recaption_shards(pattern, str(out), CaptionConfig(seed=5))
    assert other.version != first.version and other.captioned == 6
    rows = sidecar(out, "shards-000000")
    assert rows.groupby("key").version.nunique().eq(2).all()
    assert json.loads((out / "shards-000000_facecap.json").read_text())["s0-0"].keys() == {
        "facecap",
        f"facecap_{first.version}",
        f"facecap_{other.version}",
    }
    # New shards, through the command line: same samples, the new caption in txt and json.
    shards = tmp_path / "new"
    run_cli(pattern, str(shards), "--write", "shards", "--set", "caption.seed=5")
    samples = list(wds.WebDataset(str(shards / "shards-{000000..000001}.tar"), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [f"s{a}-{b}" for a in range(2) for b in range(3)]
    by_key = sidecar(shards, "shards-000001").set_index("key")
    for sample in samples:
        image = "png" if int(sample["__key__"][-1]) % 2 == 0 else "webp"
        assert sample[image].size == (64, 48) and sample["cls"] == int(sample["__key__"][-1])
        assert sample["json"]["source"] == "plain" and sample["json"]["recaption"]["previous_txt"].startswith("old")
        assert sample["json"]["recaption"]["version"] == other.version
        if sample["__key__"].startswith("s1"):
            assert sample["txt"] == by_key.caption[sample["__key__"]][0]
    before = (shards / "shards-000000.tar").stat().st_mtime_ns
    run_cli(pattern, str(shards), "--write", "shards", "--set", "caption.seed=5")
    assert (shards / "shards-000000.tar").stat().st_mtime_ns == before  # nothing rewritten
    with pytest.raises(FacecapError, match="choose an output folder outside every input"):
        recaption_shards(pattern, str(plain), CaptionConfig(), write="shards")


def test_an_img2dataset_folder_and_a_new_shard_later(tmp_path, face_photos):
    folder = tmp_path / "i2d"
    folder.mkdir()
    jpegs = sorted((face_photos / "deepface").glob("*.jpg"))[:3]

    def shard(number: int, keys: list[str]) -> None:
        with tarfile.open(folder / f"{number:05d}.tar", "w") as tar:
            for key, path in zip(keys, jpegs, strict=False):
                meta = json.dumps({"key": key, "url": f"http://x/{key}.jpg", "caption": "alt", "status": "success"})
                for ext, data in (("jpg", path.read_bytes()), ("txt", b"alt"), ("json", meta.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        table = pa.table({"key": keys, "status": ["success"] * len(keys)})
        pq.write_table(table, folder / f"{number:05d}.parquet")
        (folder / f"{number:05d}_stats.json").write_text(json.dumps({"count": len(keys)}))

    shard(0, ["000000000", "000000001"])
    out = tmp_path / "captions"
    first = recaption_shards(str(folder), str(out), CaptionConfig())
    assert first.captioned == 2
    shard(1, ["000010000", "000010001", "000010002"])  # img2dataset wrote one more shard
    later = recaption_shards(str(folder), str(out), CaptionConfig())
    assert [s.skipped for s in later.shards] == [True, False] and later.captioned == 3
    assert sorted(sidecar(out, "00001").key) == ["000010000", "000010001", "000010002"]
    # Sidecars may sit beside the tars themselves, where Sana looks for STEM_facecap.json.
    beside = recaption_shards(str(folder), str(folder), CaptionConfig())
    assert beside.captioned == 5 and json.loads((folder / "00001_facecap.json").read_text()).keys() == {
        "000010000",
        "000010001",
        "000010002",
    }
    assert sorted(p.name for p in folder.glob("*.tar")) == ["00000.tar", "00001.tar"]


def test_a_facecap_export_is_recaptioned_from_its_own_attributes(tmp_path, monkeypatch):
    final = run_recipe(tmp_path, {"group.jpg": GROUP.read_bytes()}, {"tag": {"min_confident": 0}})
    shards = tmp_path / "export"
    export(str(final), str(shards), ExportSettings(shard_samples=3))
    out = tmp_path / "recaptioned"
    run_cli(str(shards), str(out), "--write", "shards", "--set", "caption.seed=9")
    originals = {}
    for tar_path in sorted(shards.glob("train-*.tar")):
        for sample in wds.WebDataset(str(tar_path), shardshuffle=False).decode():
            originals[sample["__key__"]] = sample
    new = {}
    for tar_path in sorted(out.glob("train-*.tar")):
        for sample in wds.WebDataset(str(tar_path), shardshuffle=False).decode():
            new[sample["__key__"]] = sample
    assert new.keys() == originals.keys() and len(new) >= 3
    for key, sample in new.items():
        old = originals[key]
        assert sample["jpg"] == old["jpg"]  # the crop is carried over untouched
        assert sample["json"]["recaption"]["previous_txt"] == old["txt"]
        assert sample["json"]["gender"] == old["json"]["gender"]  # the metadata stays
        assert sample["json"]["recaption"]["provenance"]["seed"] == 9
    # The grammar read the export's attributes (gender, age, expression...): its captions are those
    # of the attributes, and differ from what it writes for a sample without any.
    grammar = CaptionStage(CaptionConfig(seed=9))
    with_attributes = {k: grammar._template({**s["json"], "key": k})[0] for k, s in new.items()}
    assert {k: s["json"]["recaption"]["caption"] for k, s in new.items()} == with_attributes
    assert any(grammar._template({"key": k})[0] != caption for k, caption in with_attributes.items())
    # A trainer switches by changing one path: the export's wids index and Energon metadata hold for
    # the new shards (same names and counts), whose .tar.idx files are their own.
    assert (out / "train.json").read_bytes() == (shards / "train.json").read_bytes()
    import wids
    from megatron.energon import WorkerConfig, get_loader, get_val_dataset

    indexed = wids.ShardListDataset(str(out / "train.json"))
    assert {indexed[i]["__key__"]: indexed[i][".txt"] for i in range(len(indexed))} == {
        k: s["txt"] for k, s in new.items()
    }
    config = WorkerConfig(rank=0, world_size=1, num_workers=0)
    loaded = get_val_dataset(str(out), split_part="train", worker_config=config, batch_size=1)
    assert {b.__key__[0]: b.caption[0] for b in get_loader(loaded)} == {k: s["txt"] for k, s in new.items()}
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    hf = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf"))["train"]
    assert {r["__key__"]: r["txt"] for r in hf} == {k: s["txt"] for k, s in new.items()}
    assert {r["json"]["recaption"]["version"] for r in hf} == {new[next(iter(new))]["json"]["recaption"]["version"]}


def test_vlm_captions_png_and_webp_through_an_openai_server_and_reruns_only_failures(plain, tmp_path):
    vlm = str(tiny_vlm(tmp_path / "vlm"))
    out = tmp_path / "vlm-sidecars"
    with OpenAIServer(vlm, vision=True) as server:
        config = CaptionConfig(
            captioner="vlm",
            engine="openai",
            model="tiny-llava",
            openai={"base_url": server.base_url, "retries": 2, "timeout": 30},
            sampling={"max_tokens": 16},
            max_words=40,
        )
        first = recaption_shards(str(plain), str(out), config)
        asked = server.requests
        assert asked >= 6  # one request per image at least (a failed check asks again)
        rows = pd.concat([sidecar(out, f"shards-{i:06d}") for i in range(2)])
        assert len(rows) == 6 and set(rows.status) <= {"ok", "caption:invalid"}
        assert (rows.model == "tiny-llava").all() and rows.prompt_sha256.notna().all()
        failed = int((rows.status != "ok").sum())
        again = recaption_shards(str(plain), str(out), config)
        # Only the keys without an ok caption of this version are asked again: the ok ones keep
        # their caption and time, and with none failed the server hears nothing.
        after = pd.concat([sidecar(out, f"shards-{i:06d}") for i in range(2)])
        kept = ["key", "caption_short", "time"]
        ok_before = rows[rows.status == "ok"][kept].sort_values("key").reset_index(drop=True)
        ok_after = after[after.key.isin(ok_before.key) & (after.status == "ok")][kept].sort_values("key")
        pd.testing.assert_frame_equal(ok_before, ok_after.reset_index(drop=True))
        assert len(after) == 6 and (failed > 0 or server.requests == asked)
        assert again.version == first.version and all(s.skipped for s in again.shards) == (failed == 0)
        assert again.captioned + sum(s.failed for s in again.shards) == failed


@pytest.mark.slow
def test_shards_on_s3_by_brace_pattern_into_s3_sidecars_and_shards(plain, s3_server):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = f"facecap-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    for tar in sorted(plain.glob("*.tar")):
        client.put_object(Bucket=bucket, Key=f"in/{tar.name}", Body=tar.read_bytes())
    pattern = f"s3://{bucket}/in/shards-{{000000..000001}}.tar"
    first = recaption_shards(pattern, f"s3://{bucket}/out", CaptionConfig(), write="shards")
    assert first.captioned == 6
    names = sorted(o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"])
    stems = ("shards-000000", "shards-000001")
    assert {f"out/{s}{ext}" for s in stems for ext in (".tar", ".captions.parquet", "_facecap.json")} <= set(names)
    body = client.get_object(Bucket=bucket, Key="out/shards-000001.tar")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert sorted(m.name for m in tar) == sorted(
            f"s1-{i}.{ext}" for i in range(3) for ext in ("cls", "json", "txt", "png" if i % 2 == 0 else "webp")
        )
    again = recaption_shards(pattern, f"s3://{bucket}/out", CaptionConfig(), write="shards")
    assert again.captioned == 0 and all(s.skipped for s in again.shards)


def test_faces_found_on_the_fly_are_captioned_from_their_crop(tmp_path, face_photos):
    folder = tmp_path / "mixed"
    folder.mkdir()
    with wds.TarWriter(str(folder / "mixed-000000.tar")) as writer:
        writer.write({"__key__": "group", "jpg": GROUP.read_bytes()})
        writer.write({"__key__": "portrait", "jpg": (face_photos / "deepface" / "img1.jpg").read_bytes()})
        writer.write({"__key__": "noise", "png": photo(1, "png")})
        writer.write({"__key__": "broken", "webp": photo(2, "webp")[:40]})
    vlm = str(tiny_vlm(tmp_path / "vlm"))
    out = tmp_path / "faces"
    with OpenAIServer(vlm, vision=True) as server:
        args = [str(folder), str(out), "--captioner", "vlm", "--model", "tiny-llava", "--base-url", server.base_url]
        args += ["--set", "caption.sampling.max_tokens=16", "--set", "detect.min_face_side=48"]
        run_cli(*args, "--faces")
        asked = server.requests
        rows = sidecar(out, "mixed-000000").set_index("key")
        assert rows.region.dropna().to_dict() == {"group": "face", "noise": "image", "portrait": "face"}
        assert rows.status["broken"] == "caption:undecodable" and "webp image" in rows.error["broken"]
        assert rows.box["noise"] is None
        with Image.open(GROUP) as image:
            width, height = image.size
        x1, y1, x2, y2 = rows.box["group"]
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height and x2 - x1 >= 48
        # Captioning the whole images is another version, beside the face one.
        run_cli(*args)
        assert server.requests > asked
    both = sidecar(out, "mixed-000000")
    assert both.version.nunique() == 2 and set(both[both.region == "image"].key) == {"group", "noise", "portrait"}
    refused = CliRunner().invoke(app, ["recaption", str(folder), str(out / "t"), "--faces"])
    assert refused.exit_code == 2 and "only a vlm captioner" in refused.output
