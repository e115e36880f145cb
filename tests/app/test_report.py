"""The report: one self-contained HTML page that renders every section in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import insightface
import pytest
from helpers import run_recipe
from typer.testing import CliRunner

from facecap.cli import app

REPO = Path(__file__).resolve().parent.parent.parent
GROUP = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
SECTIONS = (
    "funnel",
    "reasons",
    "throughput",
    "distributions",
    "attributes",
    "demographics",
    "duplicates",
    "contact-sheet",
)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, face_photos):
    photos = {"group.jpg": GROUP.read_bytes(), "group_copy.jpg": GROUP.read_bytes()}  # a duplicate for dedup
    photos.update(
        {n.replace("/", "_"): (face_photos / n).read_bytes() for n in ("deepface/img1.jpg", "nonface/sheep.jpg")}
    )
    final = run_recipe(tmp_path_factory.mktemp("report"), photos, {"tag": {"min_confident": 0}}, ("/status/404",))
    return final.parent


def test_report_has_every_section_and_needs_no_network(run_folder, tmp_path):
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(run_folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    for section in SECTIONS:
        assert f'<section id="{section}">' in page, section
    assert "dedup:exact" in page and "detect:no_face" in page and "download:http_404" in page
    assert "CPU seconds" in page and re.search(r"<td>\d+\.\d \(\d+%\)</td>", page)  # throughput: CPU beside wall
    assert "No data: run" not in page  # every stage ran, so every section has data
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(s.startswith("data:") for s in sources)  # self-contained
    assert "<script" not in page


@pytest.mark.slow
def test_report_renders_in_headless_chromium_without_console_errors(run_folder, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Chromium is needed for this test: apt-get install chromium (make test installs it as root)"
    out = tmp_path / "report.html"
    assert CliRunner().invoke(app, ["report", str(run_folder), "--out", str(out)]).exit_code == 0
    profile = tmp_path / "profile"
    base = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*base, "--dump-dom", f"file://{out}"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f'id="{section}"' in dom.stdout, section
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    shot = tmp_path / "report.png"
    rendered = subprocess.run(
        [*base, f"--screenshot={shot}", "--window-size=1200,2400", f"file://{out}"], capture_output=True, timeout=120
    )
    assert rendered.returncode == 0 and shot.stat().st_size > 50_000


def test_report_and_stats_skip_an_export_beside_the_stage_datasets(run_folder, tmp_path):
    # `facecap report WORK` failed with "unreadable manifest" once WORK also held an export.
    runner = CliRunner()
    export = run_folder / "export"
    result = runner.invoke(app, ["export", str(run_folder / "dedup"), str(export)])
    assert result.exit_code == 0, result.output
    try:
        report = runner.invoke(app, ["report", str(run_folder), "--out", str(tmp_path / "r.html")])
        assert report.exit_code == 0, report.output
        assert "skipped export (a facecap export): not a stage dataset" in report.stdout
        assert "dedup:exact" in (tmp_path / "r.html").read_text()
        stats = runner.invoke(app, ["stats", str(run_folder), "--json"])
        assert stats.exit_code == 0, stats.output
        on_export = runner.invoke(app, ["stats", str(export)])
        assert on_export.exit_code == 2 and "a facecap export, not a stage dataset" in on_export.stderr
        on_export = runner.invoke(app, ["report", str(export), "--out", str(tmp_path / "e.html")])
        assert on_export.exit_code == 2 and len(on_export.stderr.strip().splitlines()) == 1
    finally:
        shutil.rmtree(export)


def test_the_report_reads_summaries_not_rows(run_folder, tmp_path, monkeypatch):
    # 15M rows must not be loaded to draw a funnel: only the kept copies of shown duplicates are looked up.
    from facecap.pipeline.dataset import Dataset

    reads = []
    original = Dataset.read_shard
    monkeypatch.setattr(
        Dataset,
        "read_shard",
        lambda self, shard, *a, **k: reads.append((self.uri, shard)) or original(self, shard, *a, **k),
    )
    result = CliRunner().invoke(app, ["report", str(run_folder), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert {uri for uri, _ in reads} <= {str(run_folder / "dedup")}
    assert len(reads) <= len(Dataset.at(str(run_folder / "dedup")).done_shards())
    page = (tmp_path / "r.html").read_text()
    assert "unique 4-grams" in page and "dedup:exact" in page


def test_opted_out_and_eval_identities_are_funnel_lines_with_counts_only():
    from facecap.pipeline.dataset import ShardStats
    from facecap.pipeline.summary import merge
    from facecap.report import StageData, _funnel, _reasons

    class NoThumbnails:
        def of(self, *args):
            raise AssertionError("no picture of a person who opted out")

    by_status = {"ok": 5, "dedup:opted_out_identity": 3, "dedup:eval_identity": 2}
    examples = {
        status: [
            {"key": f"k{i}_f0", "identity_match": "alice", "error": "an opted-out person", "_rank": i, "_shard": 0}
        ]
        for i, status in enumerate(by_status)
    }
    detect = StageData("detect", None, None, {0: ShardStats(0, 10, 10, {"ok": 10}, 1.0)})
    dedup = StageData("dedup", None, None, {0: ShardStats(0, 10, 10, by_status, 1.0)})
    funnel = _funnel([detect, dedup])
    assert "<td>dedup: opted-out identities removed</td><td>3</td>" in funnel
    assert "<td>dedup: eval-set identities removed</td><td>2</td>" in funnel
    reasons = _reasons(dedup, merge([{"examples": examples}]), NoThumbnails())
    assert "<code>dedup:opted_out_identity</code></td><td>3</td><td>counts only</td>" in reasons
    text = re.sub(r'src="data:[^"]*"', "", funnel + reasons)  # the chart's base64 may spell anything
    assert "alice" not in text and "bob" not in text


def test_thumbnails_keep_few_tar_indexes_open_and_give_the_same_images(tmp_path):
    # A report's examples come from anywhere in the dataset: the driver must not keep every tar's index.
    import sys

    import pyarrow.compute as pc

    from facecap.pipeline.dataset import Dataset
    from facecap.report import Thumbnails

    sys.path.insert(0, str(REPO / "bench"))
    import scale_data

    folder = tmp_path / "dedup"
    scale_data.write_dataset(str(folder), rows=1200, shard_rows=200, workers=1)
    dataset = Dataset.at(str(folder))
    wanted = []
    for shard in dataset.done_shards():
        table = dataset.read_shard(shard)
        faces = table.filter(pc.match_substring(table.column("key"), "_f")).column("key").to_pylist()
        wanted += [(key, shard) for key in faces[:3]]
    wanted = wanted[::2] + wanted[1::2]  # back and forth between the shards
    every = Thumbnails(dataset.require_manifest(), dataset.storage.options, keep_open=100)
    few = Thumbnails(dataset.require_manifest(), dataset.storage.options, keep_open=2)
    try:
        seen = []
        for key, shard in wanted:
            seen.append(few.of(key, shard))
            assert few.open_readers <= 2
        assert seen == [every.of(key, shard) for key, shard in wanted]
        assert all(url and url.startswith("data:image/jpeg;base64,") for url in seen)
        assert every.open_readers == len(dataset.done_shards())
    finally:
        every.close()
        few.close()


def test_throughput_says_dash_for_stats_without_cpu_seconds():
    from facecap.pipeline.dataset import ShardStats
    from facecap.report import _cpu_share

    def stats(cpu: float | None) -> ShardStats:
        return ShardStats(shard=0, rows_in=1, rows_out=1, by_status={"ok": 1}, seconds=2.0, cpu_seconds=cpu)

    assert _cpu_share({0: stats(None)}) == "-"
    assert _cpu_share({0: stats(1.5), 1: stats(0.5)}) == "2.0 (50%)"
    assert _cpu_share({0: stats(1.0), 1: stats(None)}) == "1.0 (50%)"  # only the shards that kept it
