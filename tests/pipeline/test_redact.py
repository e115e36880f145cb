"""Credentials written into URLs stay out of what facecap stores (issue 22 item 6)."""

from __future__ import annotations

import json

import pytest
from helpers import read_all
from rawhttp import RawServer
from toystages import Ask, AskConfig

from facecap.pipeline.config import RunnerConfig
from facecap.pipeline.dataset import Dataset
from facecap.pipeline.errors import DatasetError
from facecap.pipeline.executors import LocalExecutor
from facecap.pipeline.redact import redact, redact_text
from facecap.pipeline.runner import run_stage
from facecap.pipeline.storage import Storage
from facecap.pipeline.worker import StageJob

SECRET = "sk-live-0123456789abcdef"


@pytest.mark.parametrize(
    "text, redacted",
    [
        (f"http://user:{SECRET}@head:8000/v1", "http://REDACTED@head:8000/v1"),
        (f"https://{SECRET}@api.example.com/v1", "https://REDACTED@api.example.com/v1"),
        (f"http://user:p@ss{SECRET}@host/v1", "http://REDACTED@host/v1"),  # an unescaped @ in the password
        (f"http://minio:9000/?api_key={SECRET}&x=1", "http://minio:9000/?api_key=REDACTED&x=1"),
        (f"https://h/v1?apikey={SECRET}", "https://h/v1?apikey=REDACTED"),
        (f"https://h/x.jpg?token={SECRET};sig={SECRET}", "https://h/x.jpg?token=REDACTED;sig=REDACTED"),
        (f"https://h/cb#access_token={SECRET}&state=1", "https://h/cb#access_token=REDACTED&state=1"),
        (
            f"https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={SECRET}"
            f"&X-Amz-Signature={SECRET}&X-Amz-Security-Token={SECRET}&X-Amz-Expires=60",
            "https://b.s3.amazonaws.com/k.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=REDACTED"
            "&X-Amz-Signature=REDACTED&X-Amz-Security-Token=REDACTED&X-Amz-Expires=60",
        ),
        (f"https://acct.blob.core.windows.net/c/x.jpg?sv=2020&sig={SECRET}", None),
        (
            f"EngineError: http://me:{SECRET}@head:8000/v1/chat/completions answered HTTP 401, retrying",
            "EngineError: http://REDACTED@head:8000/v1/chat/completions answered HTTP 401, retrying",
        ),
        (f"(see http://h/?key={SECRET}).", "(see http://h/?key=REDACTED)."),
        (f"Authorization: Bearer {SECRET}", "Authorization: Bearer REDACTED"),
        (f"Authorization: Basic {SECRET}", "Authorization: Basic REDACTED"),
    ],
)
def test_user_info_secret_parameters_and_bearer_tokens_are_masked(text, redacted):
    masked = redact_text(text)
    assert SECRET not in masked and "REDACTED" in masked
    if redacted is not None:
        assert masked == redacted
    assert redact_text(masked) == masked


@pytest.mark.parametrize(
    "text",
    [
        "http://head:8000/v1",
        "s3://bucket/prefix/part-00000.parquet",
        "https://h/x.jpg?size=512&max_tokens=30&token_type=bearer&X-Amz-Expires=60",
        "mail me@example.com about http://host/a@b",
        "[SSL: CERTIFICATE_VERIFY_FAILED] Basic Constraints of CA cert not marked critical",
        "api_key_env: OPENAI_API_KEY",
    ],
)
def test_text_without_credentials_is_left_alone(text):
    assert redact_text(text) == text


def test_every_string_of_a_recipe_is_redacted_and_secret_named_keys_masked():
    recipe = {
        "caption": {"openai": {"base_url": f"http://u:{SECRET}@h/v1", "api_key_env": "OPENAI_API_KEY"}},
        "tag": {"vlm": {"openai": {"base_url": f"https://h/v1?token={SECRET}", "extra": {"api_key": SECRET}}}},
        "storage": {"s3_endpoint": f"http://AKIA:{SECRET}@minio:9000"},
        "ingest": {"input": [f"https://h/urls.csv?X-Amz-Signature={SECRET}"], "shard_size": 10},
        "stages": ["ingest"],
    }
    masked = redact(recipe)
    assert SECRET not in json.dumps(masked)
    assert masked["caption"]["openai"] == {"base_url": "http://REDACTED@h/v1", "api_key_env": "OPENAI_API_KEY"}
    assert masked["tag"]["vlm"]["openai"]["extra"] == {"api_key": "REDACTED"}
    assert masked["ingest"]["shard_size"] == 10 and masked["stages"] == ["ingest"]
    assert SECRET in json.dumps(recipe)  # a copy: the real values are untouched


@pytest.fixture
def chat_server():
    """Answers every chat request with 401, as a server given a wrong key does."""
    with RawServer() as server:
        server.add("/v1/chat/completions", b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n", close=True)
        yield server


def _ask(ingested, out, base_url: str, recipe: dict | None = None):
    config = AskConfig(base_url=base_url, ask_prefix="000000002")  # every row of shard 2 asks
    job = StageJob(stage_cls=Ask, config=config, output=str(out), parent=str(ingested))
    return run_stage(job, LocalExecutor(), runner=RunnerConfig(max_retries=0), recipe=recipe)


def test_secrets_stay_out_of_the_manifest_failure_records_and_row_errors(ingested, tmp_path, chat_server):
    base_url = f"http://user:{SECRET}@127.0.0.1:{chat_server.port}/v1"
    recipe = {
        "caption": {"openai": {"base_url": base_url}},
        "tag": {"vlm": {"openai": {"base_url": f"http://127.0.0.1:{chat_server.port}/v1?api_key={SECRET}"}}},
        "storage": {"s3_endpoint": f"http://AKIA:{SECRET}@127.0.0.1:9000"},
    }
    out = tmp_path / "ask"
    result = _ask(ingested, out, base_url, recipe)

    # Shard 2 failed (all its rows asked): its error names the server, without the key.
    assert list(result.failed) == [2]
    assert "answered HTTP 401" in result.failed[2] and "http://REDACTED@127.0.0.1" in result.failed[2]
    failed = json.loads((out / "_failed" / "part-00002.json").read_text())
    assert failed["error"] == result.failed[2]
    # Rows that failed alone carry the same redacted message.
    rows = read_all(out).to_pandas()
    errors = rows.loc[rows.status == "ask:error", "error"]
    assert len(errors) == 4 and errors.str.contains("http://REDACTED@127.0.0.1").all()
    manifest = (out / "_manifest.json").read_text()
    assert json.loads(manifest)["config"]["base_url"] == f"http://REDACTED@127.0.0.1:{chat_server.port}/v1"
    assert json.loads(manifest)["recipe"]["storage"]["s3_endpoint"] == "http://REDACTED@127.0.0.1:9000"
    for path in out.rglob("*.json"):
        assert SECRET not in path.read_text(), path
    assert SECRET not in json.dumps(Dataset(Storage(str(out))).summary())

    # Resume is judged on the real config: the same settings resume, another key refuses to mix.
    again = _ask(ingested, out, base_url, recipe)
    assert list(again.failed) == [2] and again.skipped == 4
    with pytest.raises(DatasetError, match="other settings"):
        _ask(ingested, out, base_url.replace(SECRET, "sk-other-key"), recipe)
