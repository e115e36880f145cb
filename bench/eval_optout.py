"""Identity opt-out on the labelled shared photos: false match rate and recall against the cosine threshold.

Every photo of $FACECAP_SHARED/data/faces/images.csv with an identity label is a reference photo
as `facecap dedup --opt-out-faces` sees one (YuNet, largest face, aligned 112, embedded with the
model given, default MobileFaceNet from $FACECAP_MODELS). Copies of one photo (the same `dup_group`)
are left out of every pair: finding a copy is dedup's job, not recognition.

- pairs: cosine of every two photos; same identity (genuine) or different labelled identities
  (impostor). The false match rate at a threshold is the share of impostor pairs at or above it.
- opt out with one photo: each labelled photo in turn is a person's only reference; recall is the
  share of the person's other photos matched, false matches the photos of other people matched.
- opt out with two photos: each two photos of a person with at least three, the max or the mean of
  the two cosines against the threshold, over the person's remaining photos and everyone else's.

    .venv/bin/python bench/eval_optout.py [--model mobilefacenet]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import os
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared"))
os.environ.setdefault("FACECAP_MODELS", str(SHARED / "models"))

import facecap.stages.detect  # noqa: E402, F401  (registers yunet-int8)
from facecap.stages.shared.identity import FaceEmbedder, ReferenceFaces  # noqa: E402

THRESHOLDS = (0.30, 0.35, 0.40, 0.45, 0.50, 0.55, 0.60)


def labelled_faces(model: str) -> tuple[list[str], list[str], list[str], np.ndarray, list[str]]:
    """(files, identities, dup groups, embeddings) of labelled photos with a face; and those without."""
    finder, embedder = ReferenceFaces(), FaceEmbedder(model)
    files, identities, groups, vectors, faceless = [], [], [], [], []
    with (SHARED / "data" / "faces" / "images.csv").open() as handle:
        for row in csv.DictReader(handle):
            if not row["identity"]:
                continue
            pixels = cv2.imread(str(SHARED / "data" / "faces" / row["file"]), cv2.IMREAD_COLOR)
            faces = finder.faces(pixels) if pixels is not None else []
            if not faces:
                faceless.append(row["file"])
                continue
            files.append(row["file"])
            identities.append(row["identity"])
            groups.append(row["dup_group"].split()[0] if row["dup_group"] else row["file"])
            vectors.append(embedder.embed(faces[0][1]))
    return files, identities, groups, np.stack(vectors), faceless


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="mobilefacenet")
    args = parser.parse_args()
    files, identities, groups, vectors, faceless = labelled_faces(args.model)
    ids, dups = np.array(identities), np.array(groups)
    cos = vectors @ vectors.T
    n = len(files)
    upper = np.triu(np.ones((n, n), bool), 1) & (dups[:, None] != dups[None, :])
    same = ids[:, None] == ids[None, :]
    genuine, impostor = cos[upper & same], cos[upper & ~same]
    people = sorted(set(identities))
    several = [p for p in people if (ids == p).sum() >= 2]
    print(f"{n} labelled photos with a face ({len(faceless)} without: {', '.join(faceless) or '-'}), ")
    print(f"{len(people)} identities, {len(several)} with two or more photos")
    print(f"{len(genuine)} genuine pairs, {len(impostor)} impostor pairs; highest impostor cosine {impostor.max():.3f}")
    print()
    print("| cosine >= | pair FMR | impostor pairs | pair recall | 1 photo: recall | 1 photo: false matches |", end="")
    print(" 2 photos max: recall | false | 2 photos mean: recall | false |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for t in THRESHOLDS:
        one_hit = one_total = one_false = one_trials = 0
        for i in range(n):
            others = (ids == ids[i]) & (dups != dups[i])
            one_hit += int((cos[i][others] >= t).sum())
            one_total += int(others.sum())
            one_false += int((cos[i][ids != ids[i]] >= t).sum())
            one_trials += int((ids != ids[i]).sum())
        two = {"max": [0, 0, 0, 0], "mean": [0, 0, 0, 0]}
        for person in people:
            members = np.flatnonzero(ids == person)
            for a, b in itertools.combinations(members, 2):
                if dups[a] == dups[b]:
                    continue
                rest = (ids == person) & (dups != dups[a]) & (dups != dups[b])
                if not rest.any():
                    continue
                for rule, score in (("max", np.maximum(cos[a], cos[b])), ("mean", (cos[a] + cos[b]) / 2)):
                    two[rule][0] += int((score[rest] >= t).sum())
                    two[rule][1] += int(rest.sum())
                    two[rule][2] += int((score[ids != person] >= t).sum())
                    two[rule][3] += int((ids != person).sum())
        cells = [
            f"{t:.2f}",
            f"{(impostor >= t).mean():.3%}",
            f"{int((impostor >= t).sum())}",
            f"{(genuine >= t).mean():.1%}",
            f"{one_hit / one_total:.1%} ({one_hit}/{one_total})",
            f"{one_false}/{one_trials}",
        ]
        for rule in ("max", "mean"):
            hit, total, false, trials = two[rule]
            cells += [f"{hit / total:.1%} ({hit}/{total})", f"{false}/{trials}"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
