"""The caption stage: grammar captions, LLM rewrite and VLM captions through real engines with tiny
random models, an OpenAI-compatible server on 127.0.0.1, and recaptioning that keeps history."""

from __future__ import annotations

import json
from pathlib import Path

import insightface
import pandas as pd
import pytest
from helpers import detected_faces, ray_executor, read_all, run
from openai_server import OpenAIServer
from tinymodels import tiny_llm, tiny_vlm
from typer.testing import CliRunner

from facecap.cli import app
from facecap.pipeline.errors import ConfigError
from facecap.stages.caption.stage import CaptionConfig, CaptionStage
from facecap.stages.tag.stage import TagConfig, TagStage

GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"


@pytest.fixture(scope="module")
def tagged(tmp_path_factory, face_photos):
    photos = {"group.jpg": GROUP.read_bytes(), "portrait.jpg": (face_photos / "deepface" / "img1.jpg").read_bytes()}
    root = detected_faces(tmp_path_factory.mktemp("caption"), photos, shard_size=2)
    tag = TagConfig(backends=["agegender", "geometry"], min_confident=0)
    assert run(TagStage, root / "detect", root / "tag", tag).ok
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"llm": str(tiny_llm(root / "llm")), "vlm": str(tiny_vlm(root / "vlm"))}


def faces(folder: Path) -> pd.DataFrame:
    rows = read_all(folder).to_pandas()
    return rows[rows.key.str.contains("_f")]


def test_template_captions_every_face_with_provenance_and_keeps_rejected_rows(tagged):
    assert run(CaptionStage, tagged / "tag", tagged / "cap", CaptionConfig(template={"variants": 3})).ok
    rows = read_all(tagged / "cap").to_pandas()
    assert len(rows) == len(read_all(tagged / "tag"))  # every row still there, with one status
    captioned = faces(tagged / "cap")
    assert (captioned.status == "ok").all()
    assert all(1 <= len(c) <= 3 and all(s.endswith(".") for s in c) for c in captioned.caption)
    assert captioned.caption_short.str.len().gt(10).all()
    provenance = json.loads(captioned.caption_provenance.iloc[0])
    assert provenance["captioner"] == "template" and provenance["engine"] == "grammar"
    assert rows[~rows.key.str.contains("_f")].caption.isna().all()
    assert not list((tagged / "cap").glob("*.tar"))  # Parquet only: images stay where they are
    again = CaptionStage(CaptionConfig(template={"variants": 3}))
    assert again._template(captioned.iloc[0].to_dict()) == (
        list(captioned.caption.iloc[0]),
        captioned.caption_short.iloc[0],
    )


def test_rewrite_through_the_transformers_engine(tagged, models):
    config = CaptionConfig(
        captioner="rewrite", engine="transformers", model=models["llm"], sampling={"max_tokens": 24}, max_words=40
    )
    assert run(CaptionStage, tagged / "tag", tagged / "rewrite", config).ok
    rows = faces(tagged / "rewrite")
    assert set(rows.status) <= {"ok", "caption:invalid"}  # a random model's word salad may fail the checks
    for _, row in rows.iterrows():
        if row.status == "ok":
            assert len(row.caption) == 1 and 3 <= len(row.caption[0].split()) <= 40
            provenance = json.loads(row.caption_provenance)
            assert provenance["engine"] == "transformers" and provenance["revision"] and provenance["prompt_sha256"]
        else:
            assert "after 2 tries" in row.error


def test_vlm_through_an_openai_compatible_server_that_fails_at_first(tagged, models, ray_local):
    with OpenAIServer(models["vlm"], vision=True, fail_first=2) as server:
        config = CaptionConfig(
            captioner="vlm",
            engine="openai",
            model="tiny-llava",
            openai={"base_url": server.base_url, "retries": 3, "timeout": 30},
            sampling={"max_tokens": 20},
            max_words=40,
        )
        result = run(CaptionStage, tagged / "tag", tagged / "vlm", config, executor=ray_executor())
        assert result.ok
        assert server.requests >= 2 + len(faces(tagged / "tag"))  # the two 500s were retried
    rows = faces(tagged / "vlm")
    assert set(rows.status) <= {"ok", "caption:invalid"}
    for provenance in rows.caption_provenance.dropna():
        assert json.loads(provenance)["model"] == "tiny-llava"


def test_vlm_through_the_transformers_engine_reads_the_square_crop(tagged, models):
    config = CaptionConfig(
        captioner="vlm",
        engine="transformers",
        model=models["vlm"],
        sampling={"max_tokens": 16},
        max_words=40,
        vlm={"long_max_words": 60},
    )
    assert CaptionStage.spec(config).reads == {"square": "key"}
    assert CaptionStage.spec(CaptionConfig()).reads == {}
    assert run(CaptionStage, tagged / "tag", tagged / "vlm_tf", config).ok
    rows = faces(tagged / "vlm_tf")
    assert set(rows.status) <= {"ok", "caption:invalid"}
    seeds = []
    for _, row in rows[rows.status == "ok"].iterrows():
        made = json.loads(row.caption_provenance)["captions"]
        assert [m["kind"] for m in made] == ["short", "long"][: len(row.caption)]
        assert made[0]["max_words"] == 40 and row.caption[0] == row.caption_short
        seeds.append(made[0]["seed"])
    assert len(set(seeds)) == len(seeds)  # one seed per face: the same prompt must not give the same text


def test_engine_settings_reach_the_stage_spec():
    vllm = CaptionConfig(captioner="vlm", engine="vllm", model="m", vllm={"tensor_parallel_size": 2})
    assert CaptionStage.spec(vllm).resources.gpus == 2  # one model's worth of GPUs per worker by default
    assert CaptionStage.spec(vllm).resources.batch_size >= 100_000  # the whole shard in one LLM.chat
    assert CaptionStage.spec(vllm.model_copy(update={"gpus": 0.0})).resources.gpus == 0
    assert CaptionStage.spec(CaptionConfig(captioner="vlm", engine="openai", model="m")).resources.gpus == 0
    assert CaptionStage.spec(CaptionConfig(engine="vllm")).resources.gpus == 0  # template: no engine at all
    kwargs = vllm.vllm.llm_kwargs()
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["limit_mm_per_prompt"] == {"image": 1}
    assert "max_model_len" not in kwargs  # unset: vLLM's own default


def test_recaption_keeps_earlier_versions_or_replaces_them(tagged):
    runner = CliRunner()
    first = runner.invoke(app, ["caption", str(tagged / "tag"), str(tagged / "c1"), "--executor", "local"])
    assert first.exit_code == 0, first.output
    second = runner.invoke(
        app, ["recaption", str(tagged / "c1"), str(tagged / "c2"), "--set", "caption.seed=5", "--executor", "local"]
    )
    assert second.exit_code == 0, second.output
    before, after = faces(tagged / "c1"), faces(tagged / "c2")
    for (_, old), (_, new) in zip(before.iterrows(), after.iterrows(), strict=True):
        history = json.loads(new.caption_versions)
        assert history[-1]["caption"] == list(old.caption)
        assert json.loads(new.caption_provenance)["seed"] == 5
    third = runner.invoke(
        app, ["recaption", str(tagged / "c2"), str(tagged / "c3"), "--replace", "--executor", "local"]
    )
    assert third.exit_code == 0, third.output
    assert faces(tagged / "c3").caption_versions.isna().all()
    manifest = json.loads((tagged / "c3" / "_manifest.json").read_text())
    assert manifest["media"]["square"]["root"].endswith("detect")  # crops referenced, not copied
    refused = runner.invoke(app, ["recaption", str(tagged / "tag"), str(tagged / "c4")])
    assert refused.exit_code == 2 and "no captions yet" in refused.output


def test_engine_settings_are_checked_before_any_shard():
    with pytest.raises(ConfigError, match=r"needs caption\.model"):
        CaptionStage.preflight(CaptionConfig(captioner="rewrite"))
    with pytest.raises(ConfigError, match=r"needs caption\.openai\.base_url"):
        CaptionStage.preflight(CaptionConfig(captioner="vlm", model="m"))


def test_recipes_with_the_flat_caption_keys_of_earlier_versions_still_load():
    flat = CaptionConfig.model_validate({"variants": 2, "base_url": "http://h/v1", "max_tokens": 30, "image": "image"})
    assert flat.template.variants == 2 and flat.openai.base_url == "http://h/v1"
    assert flat.sampling.max_tokens == 30 and flat.vlm.image == "image"
    with pytest.raises(ValueError, match="variants"):
        CaptionConfig.model_validate({"variants": 0})
