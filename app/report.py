"""`facecap report`: one self-contained HTML page about a run (no network needed to open it).

Sections: the funnel across stages (faces of opted-out and eval-set identities on their own lines,
counts only), every rejection reason with examples (none for those), throughput per stage,
distributions (face size, resolution, quality measures, caption length, unique 4-grams),
attribute frequencies, a demographic summary, duplicate clusters, and a contact sheet of faces
with their captions. Charts are matplotlib PNGs and thumbnails small JPEGs, all embedded as
base64; the page has no scripts. A section whose columns are absent says which stage fills it.

Nothing here grows with the dataset: the sections come from the per-shard summaries the workers
wrote beside each shard's stats (pipeline/summary.py), merged; row data is read only for the
examples shown (their thumbnails, and the kept copy of a shown duplicate). A shard written before
summaries existed is summarized here, one shard at a time.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np
import pyarrow.fs as pafs

from facecap.pipeline.dataset import Dataset, Manifest, ShardStats, TarShardReader, shard_name
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.redact import redact_text
from facecap.pipeline.registry import report_measures
from facecap.pipeline.status import OK
from facecap.pipeline.storage import Storage, StorageOptions
from facecap.pipeline.summary import distinct_estimate, merge, shard_summary, summary_frame

THUMB = 96
EXAMPLES_PER_REASON = 4
CONTACT_SHEET = 24
CONFIDENT = 0.85
# Faces removed for consent or decontamination: the funnel counts them on their own lines, and the
# report shows counts only (no thumbnail, no name: identity_match stays in the data for audits).
IDENTITY_REMOVALS = {
    "dedup:opted_out_identity": "opted-out identities",
    "dedup:eval_identity": "eval-set identities",
}


@dataclass
class StageData:
    name: str
    dataset: Dataset
    manifest: Manifest
    stats: dict[int, ShardStats]  # the done shards' stats

    @property
    def by_status(self) -> Counter:
        counts: Counter = Counter()
        for stats in self.stats.values():
            counts.update(stats.by_status)
        return counts

    def summary(self) -> dict:
        """The done shards' summaries merged one at a time (examples carry their shard as ``_shard``)."""
        return merge(self._summaries())

    def _summaries(self) -> Iterator[dict]:
        measures = report_measures()
        for shard in sorted(self.stats):
            stored = self.dataset.shard_stat(shard)
            part = (stored.summary if stored else None) or shard_summary(
                summary_frame(self.dataset.read_shard(shard), measures), measures
            )
            examples = {k: [{**row, "_shard": shard} for row in rows] for k, rows in part.get("examples", {}).items()}
            yield {**part, "examples": examples}


def chain(directory: str, options: StorageOptions | None = None, skipped: list[str] | None = None) -> list[StageData]:
    """The datasets from ingest to ``directory`` (a stage dataset, or a run folder: its last stage).

    Folders of a run folder that are not stage datasets (an export, anything else) are left out
    and named in ``skipped``."""
    options = options or StorageOptions.from_env()
    dataset = Dataset.at(directory, options)
    manifest, why_not = dataset.stage_manifest()
    if manifest is None and why_not != "no _manifest.json":
        raise FacecapError(f"{directory}: {why_not}, not a stage dataset; report the dataset it was made from")
    if manifest is None:
        manifest, dataset = _last_stage_of_run(directory, options, skipped if skipped is not None else [])
    stages = []
    while True:
        done = set(dataset.done_shards())
        stats = {shard: item for shard, item in dataset.shard_stats(with_summaries=False).items() if shard in done}
        stages.append(StageData(manifest.stage, dataset, manifest, stats))
        if not manifest.parent:
            break
        dataset = Dataset.at(manifest.parent, options)
        parent = dataset.manifest()
        if parent is None:
            break
        manifest = parent
    return list(reversed(stages))


def _last_stage_of_run(directory: str, options: StorageOptions, skipped: list[str]) -> tuple[Manifest, Dataset]:
    storage = Storage(directory, options)
    found = []
    for info in storage.fs.get_file_info(pafs.FileSelector(storage._base, recursive=False)):
        if info.type == pafs.FileType.Directory:
            candidate = Dataset.at(f"{storage.root}/{info.base_name}", options)
            manifest, why_not = candidate.stage_manifest()
            if manifest is not None:
                found.append((manifest, candidate))
            elif why_not != "no _manifest.json":
                skipped.append(f"{info.base_name} ({why_not})")
    if not found:
        raise FacecapError(f"{directory}: neither a facecap dataset nor a run folder with stage datasets")
    parents = {m.parent for m, _ in found}
    last = [pair for pair in found if pair[1].uri not in parents]
    return last[0]


class Thumbnails:
    """Small JPEG data URLs of a row's face crop (or its image), read from wherever they are stored.

    A report shows a few hundred examples drawn from anywhere in the dataset; keeping the index of
    every tar they touched grew the driver with the number of shards (about 0.3 MB a shard at
    10,000 rows, measured by ``make bench-scale``), so only the ``keep_open`` latest are kept."""

    def __init__(self, manifest: Manifest, options: StorageOptions, keep_open: int = 8):
        self.media = manifest.media
        self.options = options
        self.keep_open = keep_open
        self._readers: OrderedDict[tuple[str, int], TarShardReader] = OrderedDict()

    def of(self, key: str, shard: int, image_key: str | None = None) -> str | None:
        image_key = image_key if isinstance(image_key, str) else key  # NaN for rows that are images
        for name, media_key in (("square", key), ("aligned112", key), ("image", image_key)):
            ref = self.media.get(name)
            if ref is None or media_key is None:
                continue
            reader = self._reader(name, shard)
            found = reader.get(media_key, [ref.member_ext(name)]) if reader else None
            if found:
                return _thumbnail(next(iter(found.values())))
        return None

    def _reader(self, name: str, shard: int) -> TarShardReader | None:
        if (name, shard) in self._readers:
            self._readers.move_to_end((name, shard))
            return self._readers[(name, shard)]
        ref = self.media[name]
        tar = ref.tar_for(shard) or f"{shard_name(shard)}.tar"
        try:
            reader = TarShardReader(Storage(ref.root, self.options), tar)
        except (OSError, FacecapError):
            return None
        self._readers[(name, shard)] = reader
        while len(self._readers) > self.keep_open:
            self._readers.popitem(last=False)[1].close()
        return reader

    @property
    def open_readers(self) -> int:
        return len(self._readers)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()


def _thumbnail(data: bytes) -> str | None:
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if pixels is None:
        return None
    scale = THUMB / max(pixels.shape[:2])
    small = cv2.resize(pixels, (max(1, round(pixels.shape[1] * scale)), max(1, round(pixels.shape[0] * scale))))
    return (
        "data:image/jpeg;base64,"
        + base64.b64encode(cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, 80])[1]).decode()
    )


def _chart(draw, width: float = 6.0, height: float = 3.0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(width, height))
    draw(axis)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return f'<img class="chart" alt="chart" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _section(ident: str, title: str, body: str) -> str:
    return f'<section id="{ident}"><h2>{html.escape(title)}</h2>{body}</section>'


def _missing(stage: str) -> str:
    return f'<p class="none">No data: run the {html.escape(stage)} stage.</p>'


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render(stages: list[StageData], options: StorageOptions | None = None) -> str:
    options = options or StorageOptions.from_env()
    last = stages[-1]
    summary = last.summary()
    thumbs = Thumbnails(last.manifest, options)
    try:
        sections = [
            _funnel(stages),
            _reasons(last, summary, thumbs),
            _throughput(stages),
            _distributions(summary),
            _attributes(summary),
            _demographics(summary),
            _duplicates(last, summary, thumbs),
            _contact_sheet(summary, thumbs),
        ]
    finally:
        thumbs.close()
    title = f"facecap report: {last.manifest.recipe.get('name', last.name) if last.manifest.recipe else last.name}"
    source = redact_text(last.dataset.uri)
    return PAGE.format(title=html.escape(redact_text(title)), source=html.escape(source), body="\n".join(sections))


def _funnel(stages: list[StageData]) -> str:
    counts = [(s.name, s.by_status.get(OK, 0), sum(s.by_status.values())) for s in stages]
    rows = [[html.escape(n), f"{t:,}", f"{ok:,}", f"{ok / t:.1%}" if t else "-"] for n, ok, t in counts]
    for stage in stages:
        statuses = stage.by_status
        for status, label in IDENTITY_REMOVALS.items():
            if statuses[status] and status.startswith(f"{stage.name}:"):  # the stage that removed them
                rows.append([f"{html.escape(stage.name)}: {label} removed", f"{statuses[status]:,}", "-", "-"])

    def draw(axis):
        axis.barh([n for n, _, _ in counts], [t for _, _, t in counts], color="#d5dde8", label="rows")
        axis.barh([n for n, _, _ in counts], [ok for _, ok, _ in counts], color="#2f6db0", label="ok")
        axis.invert_yaxis()
        axis.legend(loc="lower right")
        axis.set_xlabel("rows (faces after detect)")

    return _section("funnel", "Funnel", _chart(draw) + _table(["stage", "rows", "ok", "ok share"], rows))


def _thumb_of(row: dict, thumbs: Thumbnails) -> str | None:
    return thumbs.of(row["key"], int(row["_shard"]), row.get("image_key"))


def _reasons(last: StageData, summary: dict, thumbs: Thumbnails) -> str:
    rows = []
    for status, count in last.by_status.most_common():
        if status == OK:
            continue
        if status in IDENTITY_REMOVALS:
            rows.append([f"<code>{html.escape(status)}</code>", f"{count:,}", "counts only", "-"])
            continue
        examples = summary["examples"].get(status, [])[:EXAMPLES_PER_REASON]
        images = []
        for row in examples:
            url = _thumb_of(row, thumbs)
            if url:
                images.append(f'<img class="thumb" alt="{html.escape(row["key"])}" src="{url}">')
        errors = [row["error"] for row in examples if row.get("error")]
        detail = html.escape(redact_text(str(errors[0]))[:160]) if errors else ""
        rows.append([f"<code>{html.escape(status)}</code>", f"{count:,}", detail, "".join(images) or "-"])
    body = _table(["status", "rows", "example reason", "examples"], rows) if rows else "<p>No row was rejected.</p>"
    return _section("reasons", "Rejection reasons", body)


def _throughput(stages: list[StageData]) -> str:
    rows, names, rates = [], [], []
    for stage in stages:
        stats = stage.stats
        seconds = sum(s.seconds for s in stats.values())
        rows_out = sum(s.rows_out for s in stats.values())
        rate = rows_out / seconds if seconds else 0.0
        names.append(stage.name)
        rates.append(rate)
        cpu = _cpu_share(stats)
        rows.append([html.escape(stage.name), f"{len(stats)}", f"{rows_out:,}", f"{seconds:.1f}", cpu, f"{rate:,.0f}"])

    def draw(axis):
        axis.barh(names, rates, color="#5a9e6f")
        axis.invert_yaxis()
        axis.set_xlabel("rows per second of shard time")

    header = ["stage", "shards", "rows", "shard seconds", "CPU seconds", "rows/s"]
    return _section("throughput", "Throughput and time per stage", _chart(draw, height=2.5) + _table(header, rows))


def _cpu_share(stats: dict) -> str:
    """The stage's CPU seconds and their share of its shard seconds (below 100%: the shards waited
    on the network, the disk or a loaded machine), or "-" for stats written before they were kept."""
    timed = [s for s in stats.values() if s.cpu_seconds is not None]
    if not timed:
        return "-"
    cpu, wall = sum(s.cpu_seconds for s in timed), sum(s.seconds for s in timed)
    return f"{cpu:.1f} ({cpu / wall:.0%})" if wall else f"{cpu:.1f}"


def _bin_label(low: float, high: float) -> str:
    if high >= 1e5:
        return f">= {low:g}"
    if low <= -1e2:
        return f"< {high:g}"
    return f"{low:g}-{high:g}"


def _histogram(part: dict, label: str) -> str:
    edges, counts = part["edges"], part["counts"]
    labels = [_bin_label(a, b) for a, b in itertools.pairwise(edges)]

    def draw(axis):
        axis.bar(range(len(counts)), counts, color="#7b68b5")
        axis.set_xticks(range(len(counts)), labels, rotation=60, fontsize=7)
        axis.set_xlabel(label)
        axis.set_ylabel("faces")

    return _chart(draw, width=3.6, height=2.6)


def _distributions(summary: dict) -> str:
    histograms = {name: part for name, part in summary["histogram"].items() if sum(part["counts"])}
    if "face side (px)" not in histograms:
        return _section("distributions", "Distributions", _missing("detect"))
    charts = [_histogram(part, name) for name, part in histograms.items()]
    sketch = summary["distinct"].get("caption 4-grams")
    if "caption length (words)" in histograms and sketch is not None:
        captions = sum(histograms["caption length (words)"]["counts"])
        unique, total = distinct_estimate(sketch), sketch["items"]
        share = unique / max(1, total)
        text = f"<p>Captions: {captions:,}; unique 4-grams: {unique:,} of {total:,} ({share:.1%}).</p>"
    else:
        text = _missing("caption")
    return _section("distributions", "Distributions", '<div class="grid">' + "".join(charts) + "</div>" + text)


def _attributes(summary: dict) -> str:
    flags = summary["shares"].get("attributes", {})
    shares = sorted(((name, hits / total) for name, (hits, total) in flags.items() if total), key=lambda x: -x[1])
    if not shares:
        return _section("attributes", "Attribute frequencies", _missing("tag"))

    def draw(axis):
        axis.barh([n for n, _ in shares], [s for _, s in shares], color="#c0783a")
        axis.invert_yaxis()
        axis.set_xlabel(f"share of faces with p > {CONFIDENT}")

    return _section("attributes", "Attribute frequencies", _chart(draw, height=max(2.0, 0.25 * len(shares) + 0.8)))


DEMOGRAPHICS = (
    ("estimated age", ["<20", "20s", "30s", "40s", "50s", "60+"], "#4c8c8c"),
    ("gender presentation", None, "#8c4c7a"),
    ("Monk skin tone bin (approx.)", [str(i) for i in range(1, 11)], "#a8784c"),
)


def _demographics(summary: dict) -> str:
    charts = []
    for name, order, colour in DEMOGRAPHICS:
        counts = summary["categories"].get(name)
        if not counts:
            continue
        labels = order or sorted(counts, key=lambda label: -counts[label])
        values = [counts.get(label, 0) for label in labels]
        charts.append(
            _chart(
                lambda a, labels=labels, values=values, name=name, colour=colour: (
                    a.bar(labels, values, color=colour),
                    a.set_xlabel(name),
                ),
                3.6,
                2.4,
            )
        )
    if not charts:
        return _section("demographics", "Demographic summary", _missing("tag"))
    note = (
        "<p class='none'>Estimates from models with measured error (docs/attributes.md); "
        "a skew here is a skew in the data or in the models.</p>"
    )
    return _section("demographics", "Demographic summary", '<div class="grid">' + "".join(charts) + "</div>" + note)


def _duplicates(last: StageData, summary: dict, thumbs: Thumbnails) -> str:
    if last.name != "dedup" and not any(s.startswith("dedup:") for s in last.by_status):
        return _section("duplicates", "Duplicate clusters", _missing("dedup"))
    counts = Counter({s: n for s, n in last.by_status.items() if s.startswith("dedup:")})
    summary_table = _table(
        ["status", "rows"], [[f"<code>{html.escape(s)}</code>", f"{n:,}"] for s, n in counts.most_common()]
    )
    shown = [row for status in counts for row in summary["examples"].get(status, []) if row.get("duplicate_of")][:6]
    kept_shards = _shards_of(last.dataset, {row["duplicate_of"] for row in shown})
    examples = []
    for row in shown:
        kept = row["duplicate_of"]
        if kept not in kept_shards:
            continue
        shard, image_key = kept_shards[kept]
        pair = [_thumb_of(row, thumbs), thumbs.of(kept, shard, image_key)]
        images = "".join(f'<img class="thumb" alt="dup" src="{p}">' for p in pair if p)
        examples.append([html.escape(row["key"]), html.escape(kept), images])
    body = summary_table if counts else "<p>No duplicates found.</p>"
    if examples:
        body += _table(["duplicate", "kept", "duplicate, kept"], examples)
    return _section("duplicates", "Duplicate clusters", body)


def _shards_of(dataset: Dataset, keys: set[str]) -> dict[str, tuple[int, str | None]]:
    """Shard and image key of a few rows, read one shard's key columns at a time until all are found."""
    found: dict[str, tuple[int, str | None]] = {}
    for shard in dataset.done_shards():
        if len(found) == len(keys):
            break
        table = dataset.read_shard(shard)
        columns = [c for c in ("key", "image_key") if c in table.column_names]
        for record in table.select(columns).to_pylist():
            if record["key"] in keys:
                found[record["key"]] = (shard, record.get("image_key"))
    return found


def _contact_sheet(summary: dict, thumbs: Thumbnails) -> str:
    faces = [row for row in summary["examples"].get(OK, []) if "_f" in str(row["key"])][:CONTACT_SHEET]
    if not faces:
        return _section("contact-sheet", "Contact sheet", _missing("detect"))
    cards = []
    for row in faces:
        url = _thumb_of(row, thumbs)
        caption = row.get("caption")
        text = caption[0] if caption else (row.get("alt_text") or "")
        image = f'<img alt="{html.escape(row["key"])}" src="{url}">' if url else ""
        cards.append(f"<figure>{image}<figcaption>{html.escape(str(text))}</figcaption></figure>")
    return _section("contact-sheet", "Contact sheet", '<div class="sheet">' + "".join(cards) + "</div>")


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
h1 {{ font-size: 1.6em; }} h2 {{ border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.6em; }}
table {{ border-collapse: collapse; margin: .6em 0; }}
td, th {{ border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }}
th {{ background: #f2f4f7; }} .thumb {{ height: 64px; margin-right: 4px; border-radius: 3px; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 8px; }} .chart {{ max-width: 100%; }}
.sheet {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; }}
figure {{ margin: 0; font-size: .8em; }} figure img {{ width: 100%; border-radius: 4px; }} .none {{ color: #777; }}
</style></head>
<body><h1>{title}</h1><p>Dataset: <code>{source}</code></p>
{body}
</body></html>
"""


def write_report(
    directory: str, out_path: str, options: StorageOptions | None = None, skipped: list[str] | None = None
) -> str:
    stages = chain(directory, options, skipped)
    page = render(stages, options)
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(page)
    return out_path
