"""Accuracy of the cartoon and text measures on ../shared/data/faces (`make eval`).

Cartoon: the largest face of every fixture photo, labelled 'drawn' when images.csv's description
says cartoon, painted or illustrated, else 'photo'; prints the score spread per label and the
accuracy at several thresholds. Text: every fixture photo as is (no overlaid text; the share that
a rule at 0.05 would wrongly reject) and with a caption band drawn on it (the share caught).
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared")) / "data" / "faces"
DRAWN_WORDS = ("cartoon", "paint", "illustrat")


def labelled_faces():
    from facecap.stages.detect.stage import DetectConfig, DetectStage

    detector = DetectStage(DetectConfig(min_score=0.5, min_face_side=20))
    detector.setup()
    with open(SHARED / "images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        image = cv2.imread(str(SHARED / row["file"]))
        if image is None:
            continue
        faces = detector.detector.detect_batch([image])[0]
        label = "drawn" if any(w in row["tests"].lower() for w in DRAWN_WORDS) else "photo"
        if not faces:
            yield row["file"], label, image, None
            continue
        face = max(faces, key=lambda f: float(f.box[2] - f.box[0]))
        x1, y1, x2, y2 = (max(0, int(v)) for v in face.box)
        yield row["file"], label, image, image[y1:y2, x1:x2]


def with_caption_band(image: np.ndarray) -> np.ndarray:
    out = image.copy()
    height, width = out.shape[:2]
    for line in range(3):
        y = int(height * (0.75 + 0.08 * line))
        cv2.putText(out, "LIMITED OFFER 50% OFF", (10, y), cv2.FONT_HERSHEY_SIMPLEX, width / 600, (255, 255, 255), 4)
    return out


def main() -> None:
    from facecap.stages.quality.scorers import TextDetector, cartoon_score
    from facecap.stages.quality.stage import TEXT_SIDE

    text = TextDetector(TEXT_SIDE)
    cartoon: dict[str, list[float]] = {"photo": [], "drawn": []}
    missed_drawn = []
    plain, banded = [], []
    for name, label, image, face in labelled_faces():
        if face is None or face.size == 0:
            if label == "drawn":
                missed_drawn.append(name)
            continue
        cartoon[label].append(cartoon_score(face))
        if label == "photo":
            plain.append(text.text_fraction(image))
            banded.append(text.text_fraction(with_caption_band(image)))
    print(f"cartoon score on the largest detected face ({len(cartoon['photo'])} photos, {len(cartoon['drawn'])} drawn)")
    for label, scores in cartoon.items():
        if scores:
            p = np.percentile(scores, [0, 50, 95, 100])
            print(f"  {label:<6} min {p[0]:.2f}  median {p[1]:.2f}  95th {p[2]:.2f}  max {p[3]:.2f}")
    if missed_drawn:
        print(f"  drawn images with no face found by YuNet (not scored): {', '.join(missed_drawn)}")
    print(f"{'threshold':>10}{'photos kept':>14}{'drawn caught':>14}")
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95):
        kept = np.mean([s < threshold for s in cartoon["photo"]])
        caught = np.mean([s >= threshold for s in cartoon["drawn"]]) if cartoon["drawn"] else float("nan")
        print(f"{threshold:>10.2f}{kept:>14.1%}{caught:>14.1%}")
    plain_a, banded_a = np.array(plain), np.array(banded)
    print(
        f"\ntext fraction on {len(plain)} fixture photos: "
        f"median {np.median(plain_a):.3f}, 95th {np.percentile(plain_a, 95):.3f}"
    )
    for threshold in (0.02, 0.05, 0.1):
        print(
            f"  rule q_text_fraction < {threshold}: rejects {np.mean(plain_a >= threshold):.1%} of plain photos, "
            f"catches {np.mean(banded_a >= threshold):.1%} of the same photos with a 3-line caption band"
        )


if __name__ == "__main__":
    main()
