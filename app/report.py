"""`facecap report`: one self-contained HTML page about a run (no network needed to open it).

Sections: the funnel across stages (faces of opted-out and eval-set identities on their own lines,
counts only), every rejection reason with examples (none for those), throughput per stage,
distributions (face size, resolution, quality measures, caption length, unique 4-grams),
attribute frequencies, a demographic summary, duplicate clusters, and a contact sheet of faces
with their captions. Charts are matplotlib PNGs and thumbnails small JPEGs, all embedded as
base64; the page has no scripts. A section whose columns are absent says which stage fills it.
"""

from __future__ import annotations

import base64
import html
import io
from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs

from facecap.pipeline.dataset import Dataset, Manifest, TarShardReader, shard_name
from facecap.pipeline.errors import FacecapError
from facecap.pipeline.storage import Storage, StorageOptions

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
    rows: pd.DataFrame  # every row, with the columns the report uses


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
        stages.append(StageData(manifest.stage, dataset, manifest, _rows(dataset)))
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


def _rows(dataset: Dataset) -> pd.DataFrame:
    tables = [dataset.read_shard(s) for s in dataset.done_shards()]
    if not tables:
        return pd.DataFrame({"key": [], "status": []})
    table = pa.concat_tables(tables, promote_options="permissive")
    shard = np.concatenate(
        [np.full(t.num_rows, s, np.int32) for s, t in zip(dataset.done_shards(), tables, strict=True)]
    )
    wanted = [c for c in table.column_names if not c.startswith("attr_backends") and c != "caption_versions"]
    frame = table.select(wanted).to_pandas()
    frame["_shard"] = shard
    return frame


class Thumbnails:
    """Small JPEG data URLs of a row's face crop (or its image), read from wherever they are stored."""

    def __init__(self, manifest: Manifest, options: StorageOptions):
        self.media = manifest.media
        self.options = options
        self._readers: dict[tuple[str, int], TarShardReader] = {}

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
        if (name, shard) not in self._readers:
            ref = self.media[name]
            tar = ref.tar_for(shard) or f"{shard_name(shard)}.tar"
            try:
                self._readers[(name, shard)] = TarShardReader(Storage(ref.root, self.options), tar)
            except (OSError, FacecapError):
                return None
        return self._readers[(name, shard)]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


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
    thumbs = Thumbnails(last.manifest, options)
    try:
        sections = [
            _funnel(stages),
            _reasons(stages, thumbs),
            _throughput(stages),
            _distributions(last.rows),
            _attributes(last.rows),
            _demographics(last.rows),
            _duplicates(last.rows, thumbs),
            _contact_sheet(last.rows, thumbs),
        ]
    finally:
        thumbs.close()
    title = f"facecap report: {last.manifest.recipe.get('name', last.name) if last.manifest.recipe else last.name}"
    return PAGE.format(title=html.escape(title), source=html.escape(last.dataset.uri), body="\n".join(sections))


def _funnel(stages: list[StageData]) -> str:
    counts = [(s.name, int((s.rows["status"] == "ok").sum()), len(s.rows)) for s in stages]
    rows = [[html.escape(n), f"{t:,}", f"{ok:,}", f"{ok / t:.1%}" if t else "-"] for n, ok, t in counts]
    for stage in stages:
        statuses = Counter(stage.rows["status"])
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


def _reasons(stages: list[StageData], thumbs: Thumbnails) -> str:
    last = stages[-1].rows
    statuses = Counter(last["status"])
    rows = []
    for status, count in statuses.most_common():
        if status == "ok":
            continue
        if status in IDENTITY_REMOVALS:
            rows.append([f"<code>{html.escape(status)}</code>", f"{count:,}", "counts only", "-"])
            continue
        examples = last[last["status"] == status].head(EXAMPLES_PER_REASON)
        images = []
        for row in examples.to_dict("records"):
            url = thumbs.of(row["key"], int(row["_shard"]), row.get("image_key"))
            if url:
                images.append(f'<img class="thumb" alt="{html.escape(row["key"])}" src="{url}">')
        error = examples["error"].dropna().head(1).tolist() if "error" in examples else []
        detail = html.escape(str(error[0])[:160]) if error else ""
        rows.append([f"<code>{html.escape(status)}</code>", f"{count:,}", detail, "".join(images) or "-"])
    body = _table(["status", "rows", "example reason", "examples"], rows) if rows else "<p>No row was rejected.</p>"
    return _section("reasons", "Rejection reasons", body)


def _throughput(stages: list[StageData]) -> str:
    rows, names, rates = [], [], []
    for stage in stages:
        stats = stage.dataset.shard_stats()
        seconds = sum(s.seconds for s in stats.values())
        rows_out = sum(s.rows_out for s in stats.values())
        rate = rows_out / seconds if seconds else 0.0
        names.append(stage.name)
        rates.append(rate)
        rows.append([html.escape(stage.name), f"{len(stats)}", f"{rows_out:,}", f"{seconds:.1f}", f"{rate:,.0f}"])

    def draw(axis):
        axis.barh(names, rates, color="#5a9e6f")
        axis.invert_yaxis()
        axis.set_xlabel("rows per second of shard time")

    body = _chart(draw, height=2.5) + _table(["stage", "shards", "rows", "shard seconds", "rows/s"], rows)
    return _section("throughput", "Throughput and time per stage", body)


def _histogram(values: pd.Series, label: str) -> str:
    values = pd.to_numeric(values, errors="coerce").dropna()

    def draw(axis):
        axis.hist(values, bins=min(30, max(5, len(values) // 3 or 5)), color="#7b68b5")
        axis.set_xlabel(label)
        axis.set_ylabel("faces")

    return _chart(draw, width=3.6, height=2.4)


def _distributions(rows: pd.DataFrame) -> str:
    ok = rows[rows["status"] == "ok"]
    if "face_width" not in ok or not len(ok):
        return _section("distributions", "Distributions", _missing("detect"))
    charts = [_histogram(np.minimum(ok["face_width"], ok["face_height"]), "face side (px)")]
    if "original_width" in ok:
        charts.append(_histogram(np.minimum(ok["original_width"], ok["original_height"]), "image side (px)"))
    for column, label in (
        ("q_sharpness", "sharpness"),
        ("q_brisque", "BRISQUE (lower is better)"),
        ("q_yaw", "yaw (deg)"),
    ):
        if column in ok and ok[column].notna().any():
            charts.append(_histogram(ok[column], label))
    text = ""
    if "caption" in ok and ok["caption"].notna().any():
        captions = [c[0] for c in ok["caption"] if c is not None and len(c)]
        lengths = pd.Series([len(c.split()) for c in captions])
        charts.append(_histogram(lengths, "caption length (words)"))
        grams = Counter()
        total = 0
        for caption in captions:
            words = caption.lower().split()
            for i in range(len(words) - 3):
                grams[tuple(words[i : i + 4])] += 1
                total += 1
        share = len(grams) / max(1, total)
        text = f"<p>Captions: {len(captions):,}; unique 4-grams: {len(grams):,} of {total:,} ({share:.1%}).</p>"
    else:
        text = _missing("caption")
    return _section("distributions", "Distributions", '<div class="grid">' + "".join(charts) + "</div>" + text)


def _attributes(rows: pd.DataFrame) -> str:
    ok = rows[rows["status"] == "ok"]
    columns = [c for c in ok.columns if c.startswith("attr_") and c != "attr_backends" and ok[c].notna().any()]
    if not columns:
        return _section("attributes", "Attribute frequencies", _missing("tag"))
    shares = sorted(
        ((c.removeprefix("attr_"), float((ok[c] > CONFIDENT).mean())) for c in columns), key=lambda x: -x[1]
    )

    def draw(axis):
        axis.barh([n for n, _ in shares], [s for _, s in shares], color="#c0783a")
        axis.invert_yaxis()
        axis.set_xlabel(f"share of faces with p > {CONFIDENT}")

    return _section("attributes", "Attribute frequencies", _chart(draw, height=max(2.0, 0.25 * len(shares) + 0.8)))


def _demographics(rows: pd.DataFrame) -> str:
    ok = rows[rows["status"] == "ok"]
    if "age" not in ok and "gender" not in ok:
        return _section("demographics", "Demographic summary", _missing("tag"))
    charts = []
    if "age" in ok and ok["age"].notna().any():
        bins = pd.cut(
            ok["age"], [0, 20, 30, 40, 50, 60, 200], labels=["<20", "20s", "30s", "40s", "50s", "60+"], right=False
        )
        counts = bins.value_counts().sort_index()
        charts.append(
            _chart(
                lambda a: (
                    a.bar([str(i) for i in counts.index], counts.values, color="#4c8c8c"),
                    a.set_xlabel("estimated age"),
                ),
                3.6,
                2.4,
            )
        )
    if "gender" in ok and ok["gender"].notna().any():
        counts = ok["gender"].fillna("unknown").value_counts()
        charts.append(
            _chart(
                lambda a: (
                    a.bar(counts.index.astype(str), counts.values, color="#8c4c7a"),
                    a.set_xlabel("gender presentation"),
                ),
                3.6,
                2.4,
            )
        )
    if "skin_monk" in ok and ok["skin_monk"].notna().any():
        counts = ok["skin_monk"].dropna().astype(int).value_counts().reindex(range(1, 11), fill_value=0)
        charts.append(
            _chart(
                lambda a: (
                    a.bar([str(i) for i in counts.index], counts.values, color="#a8784c"),
                    a.set_xlabel("Monk skin tone bin (approx.)"),
                ),
                3.6,
                2.4,
            )
        )
    note = (
        "<p class='none'>Estimates from models with measured error (docs/attributes.md); "
        "a skew here is a skew in the data or in the models.</p>"
    )
    return _section("demographics", "Demographic summary", '<div class="grid">' + "".join(charts) + "</div>" + note)


def _duplicates(rows: pd.DataFrame, thumbs: Thumbnails) -> str:
    if "duplicate_of" not in rows:
        return _section("duplicates", "Duplicate clusters", _missing("dedup"))
    marked = rows[rows["status"].astype(str).str.startswith("dedup:")]
    counts = Counter(marked["status"])
    summary = _table(
        ["status", "rows"], [[f"<code>{html.escape(s)}</code>", f"{n:,}"] for s, n in counts.most_common()]
    )
    by_key = rows.set_index("key")
    examples = []
    for row in marked.dropna(subset=["duplicate_of"]).head(6).to_dict("records"):
        kept = row["duplicate_of"]
        if kept not in by_key.index:
            continue
        survivor = by_key.loc[kept]
        pair = [
            thumbs.of(row["key"], int(row["_shard"]), row.get("image_key")),
            thumbs.of(kept, int(survivor["_shard"]), survivor.get("image_key")),
        ]
        images = "".join(f'<img class="thumb" alt="dup" src="{p}">' for p in pair if p)
        examples.append([html.escape(row["key"]), html.escape(kept), images])
    body = summary if counts else "<p>No duplicates found.</p>"
    if examples:
        body += _table(["duplicate", "kept", "duplicate, kept"], examples)
    return _section("duplicates", "Duplicate clusters", body)


def _contact_sheet(rows: pd.DataFrame, thumbs: Thumbnails) -> str:
    ok = rows[(rows["status"] == "ok") & rows["key"].astype(str).str.contains("_f")].head(CONTACT_SHEET)
    if not len(ok):
        return _section("contact-sheet", "Contact sheet", _missing("detect"))
    cards = []
    for row in ok.to_dict("records"):
        url = thumbs.of(row["key"], int(row["_shard"]), row.get("image_key"))
        caption = row.get("caption")
        text = caption[0] if caption is not None and len(caption) else (row.get("alt_text") or "")
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
