"""The facecap command line: commands, exit codes, one-line errors, stats, run chains."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import facecap_env, write_url_csv
from rawhttp import RawServer
from typer.testing import CliRunner

from facecap.cli import app
from facecap.corpus_server import CorpusServer

runner = CliRunner()


def cli(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def stats_json(folder) -> dict:
    result = cli("stats", folder, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_help_teaches_and_lists_only_built_commands():
    result = cli("--help")
    assert result.exit_code == 0
    from facecap.cli import REGISTRY

    for command in ("ingest", "download", "detect", "run", "stats", "models"):
        assert command in result.stdout
    # A stage's command appears once the stage is registered; the others are not advertised.
    commands = {"quality": "quality", "tag": "tag", "caption": "caption", "dedup": "dedup"}
    for stage, command in commands.items():
        assert (f" {command} " in result.stdout) == (stage in REGISTRY), command
    ingest_help = cli("ingest", "--help").stdout
    assert "--url-column" in ingest_help and "img2dataset" in ingest_help


def test_ingest_then_stats_then_noop(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 95, broken_every=10)
    out = tmp_path / "out"
    result = cli("ingest", csv, out, "--shard-size", "20", "--executor", "local")
    assert result.exit_code == 0, result.output
    assert "5/5 shards done" in result.stdout
    summary = stats_json(out)
    assert summary["rows"] == 95 == sum(summary["by_status"].values())
    assert summary["by_status"] == {"ok": 86, "ingest:invalid_url": 9}
    assert summary["shards"] == {"total": 5, "done": 5, "failed": 0}
    assert summary["stage"] == "ingest" and summary["complete"]
    again = cli("ingest", csv, out, "--shard-size", "20", "--executor", "local")
    assert again.exit_code == 0 and "nothing to do" in again.stdout
    table = cli("stats", out).stdout
    assert "ingest:invalid_url" in table and "total" in table


def test_the_process_pool_executor_from_the_command_line(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 95, broken_every=10)
    result = cli("ingest", csv, tmp_path / "pool", "--shard-size", "20", "--executor", "processes", "-q")
    assert result.exit_code == 0, result.output
    assert cli("ingest", csv, tmp_path / "one", "--shard-size", "20", "--executor", "local", "-q").exit_code == 0
    for shard in range(5):
        name = f"part-{shard:05d}.parquet"
        assert (tmp_path / "pool" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    refused = cli("ingest", csv, tmp_path / "x", "--executor", "processes", "--ray-address", "10.0.0.1:6379")
    assert refused.exit_code == 2 and "drop --ray-address" in refused.stderr
    assert "processes" in cli("ingest", "--help").stdout


def test_quiet_prints_nothing_on_success(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 10)
    result = cli("ingest", csv, tmp_path / "out", "--executor", "local", "-q")
    assert result.exit_code == 0
    assert result.stdout == ""


def test_errors_are_one_line_with_exit_code_2(tmp_path):
    result = cli("ingest", tmp_path / "missing.csv", tmp_path / "out", "--executor", "local")
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("facecap: error:")
    assert "no input files found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("ingest: {shardsize: 3}\n")
    result = cli("ingest", tmp_path / "missing.csv", tmp_path / "out", "--config", bad)
    assert result.exit_code == 2 and "unknown key 'ingest.shardsize'" in result.stderr
    assert cli("stats", tmp_path).exit_code == 2


def test_changed_settings_need_overwrite(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 30)
    out = tmp_path / "out"
    assert cli("ingest", csv, out, "--shard-size", "10", "--executor", "local", "-q").exit_code == 0
    result = cli("ingest", csv, out, "--shard-size", "15", "--executor", "local", "-q")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    result = cli("ingest", csv, out, "--shard-size", "15", "--executor", "local", "-q", "--overwrite")
    assert result.exit_code == 0
    assert stats_json(out)["shards"]["total"] == 2
    assert not (out / "part-00002.parquet").exists()


def test_failed_shards_give_exit_code_1_and_a_summary(tmp_path):
    folder = tmp_path / "i2d"
    folder.mkdir()
    (folder / "00000.parquet").write_bytes(b"this is not parquet")
    (folder / "00000.tar").write_bytes(b"")
    pq.write_table(
        pa.table(
            {
                "key": ["000010000"],
                "url": ["http://a.example/x.jpg"],
                "caption": ["c"],
                "status": ["success"],
                "error_message": [None],
            }
        ),
        folder / "00001.parquet",
    )
    with tarfile.open(folder / "00001.tar", "w") as tar:
        info = tarfile.TarInfo("000010000.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    result = cli("ingest", folder, tmp_path / "out", "--executor", "local")
    assert result.exit_code == 1
    assert "1 shard(s) failed" in result.stderr and "unreadable" in result.stderr
    summary = stats_json(tmp_path / "out")
    assert summary["shards"] == {"total": 2, "done": 1, "failed": 1}
    assert summary["by_status"] == {"ok": 1}


def test_run_chain_dry_run_and_run_folder_stats(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 40, broken_every=8)
    work = tmp_path / "work"
    plan = cli("run", "--input", csv, "--output", work, "--dry-run")
    assert plan.exit_code == 0 and "ingest" in plan.stdout and "new" in plan.stdout
    assert not work.exists()
    result = cli(
        "run",
        "--input",
        csv,
        "--output",
        work,
        "--to",
        "ingest",
        "--executor",
        "local",
        "--set",
        "ingest.shard_size=16",
    )
    assert result.exit_code == 0, result.output
    payload = stats_json(work)
    assert payload["run"] == str(work)
    assert [s["stage"] for s in payload["stages"]] == ["ingest"]
    assert payload["stages"][0]["rows"] == 40
    assert "complete" in cli("run", "--input", csv, "--output", work, "--dry-run").stdout
    bad = cli("run", "--input", csv, "--output", work, "--from", "upscale")
    assert bad.exit_code == 2 and "not a stage of this recipe" in bad.stderr


def test_run_needs_a_work_folder(tmp_path):
    result = cli("run", "--input", tmp_path / "x.csv")
    assert result.exit_code == 2 and "--output" in result.stderr


@pytest.mark.slow
def test_100k_row_laion_parquet_on_ray_adds_up_and_reruns_as_noop(tmp_path, ray_local):
    n = 100_000
    urls = [f"https://img{i % 977}.example.org/p/{i}.jpg" for i in range(n)]
    for i in range(3, n, 101):
        urls[i] = urls[i - 1]  # duplicates
    for i in range(5, n, 997):
        urls[i] = f"data:image/png;base64,{i}"  # invalid
    table = pa.table(
        {
            "URL": urls,
            "TEXT": [f"alt {i}" for i in range(n)],
            "SAMPLE_ID": list(range(n)),
            "NSFW": ["UNLIKELY"] * n,
            "similarity": [0.31] * n,
            "LICENSE": ["?"] * n,
        }
    )
    pq.write_table(table, tmp_path / "laion.parquet")
    out = tmp_path / "ingest"
    args = ("ingest", tmp_path / "laion.parquet", out, "--url-column", "URL", "--caption-column", "TEXT")
    result = cli(*args)
    assert result.exit_code == 0, result.output
    summary = stats_json(out)
    assert summary["rows"] == n == sum(summary["by_status"].values())
    assert summary["shards"] == {"total": 10, "done": 10, "failed": 0}
    invalid = len(range(5, n, 997))
    assert summary["by_status"]["ingest:invalid_url"] == invalid
    # A copy stops being a duplicate when it or its original was overwritten by an invalid URL.
    duplicates = sum(1 for i in range(3, n, 101) if i % 997 != 5 and (i - 1) % 997 != 5)
    assert summary["by_status"]["ingest:duplicate_url"] == duplicates
    first = pq.read_table(out / "part-00000.parquet")
    assert {"SAMPLE_ID", "NSFW", "similarity", "LICENSE", "source_file", "source_row"} <= set(first.column_names)
    assert cli(*args).stdout.strip().endswith("nothing to do")


def test_download_command_and_retry_failed(tmp_path, face_photos):
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "a.jpg").write_bytes((face_photos / "deepface" / "img10.jpg").read_bytes())
    with CorpusServer(folder) as server:
        csv = tmp_path / "urls.csv"
        urls = [server.url("/files/a.jpg"), server.url("/flaky/a.jpg?fail=2"), server.url("/files/none.jpg")]
        csv.write_text("url,caption\n" + "\n".join(f"{u},c" for u in urls) + "\n")
        assert cli("ingest", csv, tmp_path / "ingest", "--executor", "local", "-q").exit_code == 0
        args = (
            "download",
            tmp_path / "ingest",
            tmp_path / "dl",
            "--executor",
            "local",
            "--set",
            "download.http.retries=0",
        )
        refused = cli(*args, "-q")
        assert refused.exit_code == 0
        assert stats_json(tmp_path / "dl")["by_status"] == {"download:blocked_address": 3}
        result = cli(*args, "--allow-private-networks", "--overwrite")
        assert result.exit_code == 0, result.output
        assert stats_json(tmp_path / "dl")["by_status"] == {"ok": 1, "download:http_404": 1, "download:http_503": 1}
        server.hits["/flaky/a.jpg"] = 2
        again = cli(*args, "--allow-private-networks", "--retry-failed")
        assert again.exit_code == 0, again.output
    summary = stats_json(tmp_path / "dl")
    assert summary["by_status"] == {"ok": 2, "download:http_404": 1}
    assert summary["pass_rate"] == round(2 / 3, 4)
    table = cli("stats", tmp_path / "dl").stdout
    assert "download passed 2 of the 3 rows it judged" in table


def test_run_skips_download_for_an_img2dataset_folder(tmp_path):
    folder = tmp_path / "i2d"
    folder.mkdir()
    pq.write_table(
        pa.table(
            {
                "key": ["000000000", "000000001"],
                "url": ["http://a.example/0.jpg", "http://a.example/1.jpg"],
                "caption": ["c0", "c1"],
                "status": ["success", "failed_to_download"],
                "error_message": [None, "HTTP Error 404: Not Found"],
            }
        ),
        folder / "00000.parquet",
    )
    with tarfile.open(folder / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("000000000.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    work = tmp_path / "work"
    plan = cli("run", "--input", folder, "--output", work, "--executor", "local", "--dry-run")
    assert plan.exit_code == 0
    result = cli("run", "--input", folder, "--output", work, "--executor", "local")
    assert result.exit_code == 0, result.output
    assert "download: skipped" in result.stdout
    assert not (work / "download").exists()
    payload = stats_json(work)
    from facecap.cli import REGISTRY

    assert [s["stage"] for s in payload["stages"]] == [name for name in REGISTRY if name != "download"]
    assert payload["stages"][0]["by_status"] == {"ok": 1, "download:http_404": 1}
    # detect read the image straight from the img2dataset tar (here 3 bytes that are no JPEG)
    assert payload["stages"][1]["by_status"] == {"detect:undecodable": 1, "download:http_404": 1}


def test_run_checks_every_stage_before_running_any(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 5)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages: [ingest, download, detect, quality, tag]\ntag:\n  backends: [celeba]\n")
    result = cli("run", "-c", recipe, "--input", csv, "--output", tmp_path / "work")
    assert result.exit_code == 2 and "tag.celeba_checkpoint" in result.stderr
    assert not (tmp_path / "work").exists()  # nothing ran


def _files(folder) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}


def test_an_output_that_overlaps_an_input_is_refused_before_anything_is_touched(tmp_path):
    # `download DS DS --overwrite` deleted DS's shards; `ingest DIR DIR` re-read its own output.
    (tmp_path / "in").mkdir()
    csv = write_url_csv(tmp_path / "in" / "urls.csv", 12)
    dataset = tmp_path / "ds"
    assert cli("ingest", csv, dataset, "--executor", "local", "-q").exit_code == 0
    before = _files(tmp_path)
    cases = [
        ("download", dataset, dataset, "--overwrite"),  # the same folder
        ("download", dataset, dataset / "sub"),  # inside the input dataset
        ("download", dataset, tmp_path),  # containing it
        ("ingest", tmp_path / "in", tmp_path / "in"),  # a folder input read recursively
        ("ingest", tmp_path / "in", tmp_path / "in" / "out"),
        ("ingest", csv, tmp_path / "in", "--overwrite"),  # a folder containing the input file
        ("export", dataset, dataset),
    ]
    for args in cases:
        result = cli(*args, "--executor", "local", "-q") if args[0] != "export" else cli(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "the output folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1, args
        assert _files(tmp_path) == before, args  # nothing written, nothing deleted


def test_overwrite_replaces_only_its_own_stage_output_and_its_own_files(tmp_path):
    csv = write_url_csv(tmp_path / "urls.csv", 30)
    ingested, other = tmp_path / "ingested", tmp_path / "other"
    assert cli("ingest", csv, ingested, "--shard-size", "10", "--executor", "local", "-q").exit_code == 0
    assert cli("ingest", csv, other, "--shard-size", "10", "--executor", "local", "-q").exit_code == 0
    before = _files(other)
    # A folder holding another stage's dataset is not this command's output: never cleared.
    result = cli("download", ingested, other, "--overwrite", "--executor", "local", "-q")
    assert result.exit_code == 2 and "holds a 'ingest' dataset, not a 'download' one" in result.stderr
    assert _files(other) == before
    # Its own output is replaced, but a file of the user's beside the shards stays.
    (other / "part-notes.txt").write_text("mine")
    (other / "README.md").write_text("mine")
    result = cli("ingest", csv, other, "--shard-size", "15", "--executor", "local", "-q", "--overwrite")
    assert result.exit_code == 0, result.output
    assert (other / "part-notes.txt").read_text() == "mine" and (other / "README.md").exists()
    assert not (other / "part-00002.parquet").exists()


SECRET = "sk-live-0123456789abcdef"
FACECAP = str(Path(sys.executable).parent / "facecap")
TESTS = Path(__file__).resolve().parents[1]


def test_credentials_in_urls_never_reach_the_terminal(tmp_path):
    """Issue 22 item 6: one-line errors print a URL's user-info and secret parameters masked."""
    result = cli("ingest", f"https://user:{SECRET}@host/urls.csv?sig={SECRET}", tmp_path / "o", "--executor", "local")
    assert result.exit_code == 2 and "https://REDACTED@host" in result.stderr
    csv = write_url_csv(tmp_path / "urls.csv", 5)
    result = cli("ingest", csv, tmp_path / "o", "--set", f"caption.openai.timeout=http://u:{SECRET}@h/v1")
    assert result.exit_code == 2 and "caption.openai.timeout" in result.stderr
    assert "http://REDACTED@h/v1" in result.stderr
    for printed in (result.stdout, result.stderr):
        assert SECRET not in printed


def test_a_run_with_credentials_in_its_recipe_stores_and_prints_none(tmp_path):
    """Credentials in any recipe key (a stage's server, caption's and tag's, the S3 endpoint) are
    kept out of every manifest, failure record, the printed failures, `stats` and the report."""
    csv = write_url_csv(tmp_path / "urls.csv", 30)
    with RawServer() as server:  # a chat server that refuses the key
        server.add("/v1/chat/completions", b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n", close=True)
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            textwrap.dedent(f"""
                stages: [ingest, ask]
                ingest: {{shard_size: 10}}
                ask: {{base_url: "http://user:{SECRET}@127.0.0.1:{server.port}/v1", ask_prefix: "000000001"}}
                caption: {{openai: {{base_url: "http://user:{SECRET}@head:8000/v1"}}}}
                tag: {{vlm: {{openai: {{base_url: "https://head/v1?api_key={SECRET}"}}}}}}
                storage: {{s3_endpoint: "http://AKIA:{SECRET}@127.0.0.1:9000"}}
            """)
        )
        env = facecap_env(FACECAP_STAGES="ask_stage", PYTHONPATH=f"{TESTS / 'plugins'}:{TESTS}")
        work = tmp_path / "work"
        args = [FACECAP, "run", "-c", str(recipe), "-i", str(csv), "-o", str(work), "--executor", "local"]
        result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert "shard 1 failed" in result.stderr and "http://REDACTED@127.0.0.1" in result.stderr
    assert SECRET not in result.stdout + result.stderr
    manifest = json.loads((work / "ask" / "_manifest.json").read_text())
    assert manifest["recipe"]["tag"]["vlm"]["openai"]["base_url"] == "https://head/v1?api_key=REDACTED"
    stored = list(work.rglob("*.json"))
    assert len(stored) > 5 and not [p for p in stored if SECRET in p.read_text()]
    page = tmp_path / "r.html"
    for command in (["stats", str(work), "--json"], ["stats", str(work)], ["report", str(work), "-o", str(page)]):
        shown = subprocess.run([FACECAP, *command], env=env, capture_output=True, text=True, timeout=300)
        assert shown.returncode == 0, shown.stderr
        assert SECRET not in shown.stdout + shown.stderr
    assert "ask:error" in page.read_text() and "http://REDACTED@127.0.0.1" in page.read_text()
    assert SECRET not in page.read_text()


def test_auto_runs_cpu_stages_on_the_process_pool_unless_a_cluster_or_gpus_are_named(tmp_path, monkeypatch):
    from facecap.cli import REGISTRY, choose_executor
    from facecap.pipeline.config import load_recipe
    from facecap.pipeline.worker import StageJob

    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def chosen(overrides: dict, stage: str = "download") -> tuple[str, str | None]:
        recipe = load_recipe(None, REGISTRY, overrides)
        job = StageJob(stage_cls=REGISTRY[stage], config=getattr(recipe, stage), output=str(tmp_path / "o"))
        return choose_executor(recipe, job)

    assert chosen({})[0] == "processes" and "no cluster named" in chosen({})[1]
    assert chosen({"ray.address": "head:6379"}) == ("ray", None)
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert chosen({}) == ("ray", None)
    monkeypatch.delenv("RAY_ADDRESS")
    vllm = {"caption.captioner": "vlm", "caption.engine": "vllm", "caption.model": "m"}
    assert chosen(vllm, "caption")[0] == "ray"  # GPUs are Ray's to schedule
    on_cpu = chosen({**vllm, "caption.gpus": 0}, "caption")
    assert on_cpu[0] == "ray" and "processes of its own" in on_cpu[1]  # vLLM spawns its engine: Ray actors
    assert chosen({"runner.executor": "local"}) == ("local", None)
    csv = write_url_csv(tmp_path / "urls.csv", 20)
    result = cli("ingest", csv, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "ingest: runs on a process pool on this machine" in result.stderr
