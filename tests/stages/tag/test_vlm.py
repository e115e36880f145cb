"""The tag stage's vlm backend: JSON answers under a schema, through the transformers engine and an
OpenAI-compatible server on 127.0.0.1 (tiny random VLM), one retry for bad answers, then tag:invalid;
and the joint VLM recipe (configs/vlm.yaml) end to end with `facecap run`."""

from __future__ import annotations

import json
from pathlib import Path

import insightface
import pandas as pd
import pytest
import yaml
from helpers import detected_faces, read_all, run
from openai_server import OpenAIServer
from tinymodels import tiny_vlm
from typer.testing import CliRunner

from facecap.cli import app
from facecap.corpus_server import CorpusServer
from facecap.pipeline.errors import ConfigError
from facecap.stages.tag.schema import CELEBA40
from facecap.stages.tag.stage import TagConfig, TagStage, effective_min_confident
from facecap.stages.tag.vlm import EXTRAS, answer_schema, answer_values, parse_answer

GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
PROBABILITIES = {"yes": 0.95, "unsure": 0.5, "no": 0.05}
# A short questionnaire keeps the tiny model's prompt small; the schema still asks all 50 questions.
QUESTIONS = {"system": "Label the face. Answer in JSON.", "user": "Answer every attribute of the face."}


@pytest.fixture(scope="module")
def detected(tmp_path_factory):
    return detected_faces(tmp_path_factory.mktemp("vlm"), {"group.jpg": GROUP.read_bytes()}, shard_size=2)


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    return str(tiny_vlm(tmp_path_factory.mktemp("tiny") / "vlm"))


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompt") / "questions.yaml"
    path.write_text(yaml.safe_dump(QUESTIONS))
    return str(path)


def faces(folder: Path) -> pd.DataFrame:
    rows = read_all(folder).to_pandas()
    return rows[rows.key.str.contains("_f")]


def full_answer(**changes: str) -> dict[str, str]:
    answer = {name: "no" for name in CELEBA40}
    answer.update({name: values[0] for name, values in EXTRAS.items()})
    answer.update(changes)
    return answer


def test_answers_parse_from_chatty_text_and_map_to_probabilities():
    text = "Here you go:\n```json\n" + json.dumps(full_answer(Smiling="yes", Bangs="unsure", age_group="30s")) + "\n```"
    answer = parse_answer(text)
    values = answer_values(answer, PROBABILITIES)
    assert values["Smiling"] == 0.95 and values["Bangs"] == 0.5 and values["Male"] == 0.05
    assert values["age"] == 35 and values["gender"] == "female" and values["eyeglasses"] == 0.0
    unseen = answer_values(
        parse_answer(json.dumps(full_answer(hair_colour="not visible", Male="maybe"))), PROBABILITIES
    )
    assert "hair_color" not in unseen and "Male" not in unseen  # no guess: null
    assert parse_answer("The person smiles.").startswith("no JSON object")
    assert parse_answer("{'Male': 'yes'}").startswith("not valid JSON")
    assert parse_answer(json.dumps({"Male": "yes"})).startswith("only 1 of 50")
    schema = answer_schema()
    assert set(schema["required"]) == set(CELEBA40) | set(EXTRAS) and not schema["additionalProperties"]


def test_preflight_names_what_the_vlm_backend_lacks():
    with pytest.raises(ConfigError, match=r"tag\.vlm\.model"):
        TagStage.preflight(TagConfig(backends=["vlm"]))
    with pytest.raises(ConfigError, match=r"tag\.vlm\.openai\.base_url"):
        TagStage.preflight(TagConfig(backends=["vlm"], vlm={"model": "m"}))
    with pytest.raises(ConfigError, match="yes, no and unsure"):
        TagStage.preflight(TagConfig(backends=["vlm"], vlm={"model": "m", "engine": "vllm", "answers": {"yes": 1}}))
    on_vllm = TagConfig(backends=["vlm", "geometry"], vlm={"model": "m", "engine": "vllm"}, min_confident=5)
    assert TagStage.preflight(on_vllm) == []  # the VLM can set all 40 CelebA attributes
    assert effective_min_confident(TagConfig(backends=["vlm"])) == 5
    spec = TagStage.spec(on_vllm).resources
    assert spec.gpus == 1 and spec.batch_size >= 100_000  # a GPU per worker, the whole shard per call
    assert TagStage.spec(on_vllm.model_copy(update={"gpus": 0.0})).resources.gpus == 0
    assert TagStage.spec(TagConfig()).resources.gpus == 0


@pytest.mark.slow
def test_vlm_backend_through_the_transformers_engine(detected, vlm_folder, questions):
    config = TagConfig(
        backends=["vlm", "geometry"], vlm={"engine": "transformers", "model": vlm_folder, "prompt": questions}
    )
    assert run(TagStage, detected / "detect", detected / "tag_tf", config).ok
    rows = faces(detected / "tag_tf")
    assert len(rows) >= 2 and set(rows.status) <= {"ok", "tag:too_few_attributes"}
    for _, row in rows.iterrows():
        sources = json.loads(row.attr_backends)
        assert all(sources[name] == "vlm" for name in CELEBA40)  # every question answered, under the schema
        assert sources["yaw"] == "geometry"
        assert {round(row[f"attr_{name}"], 3) for name in CELEBA40} <= set(PROBABILITIES.values())  # float32
        judge = json.loads(row.attr_models)["vlm"]
        assert judge["engine"] == "transformers" and judge["revision"] and judge["prompt_sha256"]


@pytest.mark.slow
def test_vlm_backend_through_a_server_asks_for_json_and_retries_bad_answers(detected, vlm_folder, questions):
    count = len(faces(detected / "detect"))
    settings = {"engine": "openai", "model": "tiny", "prompt": questions}
    with OpenAIServer(vlm_folder, vision=True, garble_first=1) as server:
        config = TagConfig(backends=["vlm"], vlm={**settings, "openai": {"base_url": server.base_url}})
        assert run(TagStage, detected / "detect", detected / "tag_api", config).ok
        assert server.schemas == server.requests == count + 1  # one bad answer asked again
    assert set(faces(detected / "tag_api").status) <= {"ok", "tag:too_few_attributes"}
    with OpenAIServer(vlm_folder, vision=True, garble_first=10**6) as server:
        config = TagConfig(backends=["vlm"], vlm={**settings, "openai": {"base_url": server.base_url}})
        assert run(TagStage, detected / "detect", detected / "tag_bad", config).ok
        assert server.requests == 2 * count  # each face: one retry, no more
    rows = faces(detected / "tag_bad")
    assert (rows.status == "tag:invalid").all()
    assert rows.error.str.contains("unusable after 2 tries: no JSON object").all()


@pytest.mark.slow
def test_the_vlm_recipe_runs_end_to_end_against_a_local_server(tmp_path, vlm_folder, questions):
    served = tmp_path / "served"
    served.mkdir()
    (served / "group.jpg").write_bytes(GROUP.read_bytes())
    with OpenAIServer(vlm_folder, vision=True) as api, CorpusServer(served) as corpus:
        (tmp_path / "urls.csv").write_text(f"URL,TEXT\n{corpus.url('/files/group.jpg')},a group\n")
        overrides = {
            "stages": "[ingest,download,detect,tag,caption]",
            "download.safety.allow_private_networks": "true",
            "detect.min_face_side": "40",
            "tag.vlm.openai.base_url": api.base_url,
            "tag.vlm.prompt": questions,
            "caption.openai.base_url": api.base_url,
            "caption.sampling.max_tokens": "24",
            "caption.vlm.long_max_words": "40",
        }
        sets = [part for key, value in overrides.items() for part in ("--set", f"{key}={value}")]
        args = ["run", "-c", "vlm", "-i", str(tmp_path / "urls.csv"), "-o", str(tmp_path / "work"), *sets]
        result = CliRunner().invoke(app, [*args, "--executor", "local"])
        assert result.exit_code == 0, result.output
        assert api.schemas >= 1 and api.requests > api.schemas  # tag asked for JSON, caption for text
    tagged = faces(tmp_path / "work" / "tag")
    assert (tagged.status == "ok").any()
    captioned = faces(tmp_path / "work" / "caption")
    kept = captioned[captioned.status.isin(["ok", "caption:invalid"])]
    assert len(kept) == (tagged.status == "ok").sum()  # every kept face went to the captioner
    for provenance in captioned.caption_provenance.dropna():
        assert json.loads(provenance)["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"
