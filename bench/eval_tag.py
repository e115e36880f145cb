"""Attribute accuracy on ../shared/data/faces (`make eval`): gender, age, emotion, pose signs.

Gender labels: the identities images.csv names (public figures whose gender presentation is
public) and the CF/CM prefixes of the age-gender test photos; emotion labels: the three photos
images.csv marks with an expression; pose: each labelled portrait mirrored (yaw must change sign)
and rotated by 20 degrees (roll must follow). Runs every offline backend whose model is present.
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
SHARED = Path(os.environ.get("FACECAP_SHARED", REPO.parent / "shared"))
os.environ.setdefault("FACECAP_MODELS", str(SHARED / "models"))
FACES = SHARED / "data" / "faces"
FEMALE = {
    "angelina_jolie",
    "rose_leslie",
    "nathalie_baye",
    "mary_katherine_smart",
    "teresa_williams",
    "inspireface_yifei",
}
MALE = {
    "barack_obama", "john_salley", "john_savage", "john_schneider", "john_shimkus", "john_simm", "joe_biden",
    "alex_lacamoire", "kit_harington", "rob_lowe", "lin_manuel_miranda", "tom_cruise", "tom_hanks", "inspireface_kun",
}  # fmt: skip


def gender_label(row: dict) -> str | None:
    name = Path(row["file"]).name
    if row["identity"] in FEMALE or "_CF" in name:
        return "female"
    if row["identity"] in MALE or "_CM" in name:
        return "male"
    return None


def emotion_label(row: dict) -> str | None:
    tests = row["tests"].lower()
    if tests.startswith("emotion:"):
        word = tests.split(":", 1)[1].strip().split()[0]
        return {"anger": "angry"}.get(word, word)
    return None


def faces_of(detector, rows):
    from facecap.stages.detect.align import aligned_crop, square_crop
    from facecap.stages.tag.offline import Faces

    for row in rows:
        image = cv2.imread(str(FACES / row["file"]))
        if image is None:
            continue
        found = detector.detect_batch([image])[0]
        if not found:
            continue
        face = max(found, key=lambda f: float(f.box[2] - f.box[0]))
        yield (
            row,
            image,
            face,
            Faces([aligned_crop(image, face.landmarks, 112)], [face.landmarks], [square_crop(image, face.box)[0]]),
        )


def main() -> None:
    from facecap.pipeline import models
    from facecap.stages.detect.stage import DetectConfig, DetectStage
    from facecap.stages.tag.offline import AgeGender, Emotion, Geometry, InsightGenderAge

    stage = DetectStage(DetectConfig(min_score=0.5, min_face_side=20))
    stage.setup()
    with open(FACES / "images.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    backends = {}
    for cls in (AgeGender, InsightGenderAge, Emotion):
        try:
            backends[cls.name] = cls()
        except models.ModelMissing as missing:
            print(f"{cls.name}: skipped ({missing})")
    geometry = Geometry()
    gender_hits = {name: [] for name in ("agegender", "genderage") if name in backends}
    emotion_hits, ages, yaw_flips, roll_follows = [], {n: [] for n in gender_hits}, [], []
    gender_scored: dict[str, list[tuple[float, bool]]] = {n: [] for n in gender_hits}
    for row, image, face, faces in faces_of(stage.detector, rows):
        expected = gender_label(row)
        for name in gender_hits:
            predicted = backends[name].predict(faces)[0]
            if expected:
                gender_hits[name].append(predicted["gender"] == expected)
                gender_scored[name].append((predicted["gender_score"], predicted["gender"] == expected))
            ages[name].append(predicted["age"])
        expected_emotion = emotion_label(row)
        if expected_emotion and "emotion" in backends:
            emotion_hits.append((row["file"], expected_emotion, backends["emotion"].predict(faces)[0]["emotion"]))
        if expected:
            yaw = geometry.predict(faces)[0]["yaw"]
            mirrored = cv2.flip(image, 1)
            flipped = stage.detector.detect_batch([mirrored])[0]
            if flipped and abs(yaw) > 8:
                other = max(flipped, key=lambda f: float(f.box[2] - f.box[0]))
                from facecap.stages.shared.geometry import head_pose

                yaw_flips.append(np.sign(head_pose(other.landmarks)[0]) == -np.sign(yaw))
            height, width = image.shape[:2]
            rotated = cv2.warpAffine(image, cv2.getRotationMatrix2D((width / 2, height / 2), -20, 1.0), (width, height))
            turned = stage.detector.detect_batch([rotated])[0]
            if turned:
                from facecap.stages.shared.geometry import head_pose

                roll_before = head_pose(face.landmarks)[2]
                roll_after = head_pose(max(turned, key=lambda f: float(f.box[2] - f.box[0])).landmarks)[2]
                roll_follows.append(roll_after - roll_before)
    print(f"{'measure':<42}{'result':>16}")
    for name, hits in gender_hits.items():
        print(f"{'gender accuracy, ' + name:<42}{f'{sum(hits)}/{len(hits)} ({np.mean(hits):.1%})':>16}")
        # The caption grammar names a gender only above a score: how often it is right there, and how often said.
        for cut in (0.5, 0.7, 0.8, 0.9, 0.95):
            said = [hit for score, hit in gender_scored[name] if score >= cut]
            share = f"{np.mean(said) if said else float('nan'):.1%} of {len(said)}/{len(hits)}"
            print(f"{f'  right when score >= {cut}':<42}{share:>16}")
        spread = f"{np.median(ages[name]):.0f} / {np.percentile(ages[name], 90):.0f} y"
        print(f"{'age median / 90th pct, ' + name:<42}{spread:>16}")
    if emotion_hits:
        right = sum(e == p for _, e, p in emotion_hits)
        print(f"{'emotion accuracy (labelled photos)':<42}{f'{right}/{len(emotion_hits)}':>16}")
        for name, expected, predicted in emotion_hits:
            print(f"    {name}: expected {expected}, predicted {predicted}")
    print(f"{'yaw changes sign when mirrored (|yaw|>8)':<42}{f'{sum(yaw_flips)}/{len(yaw_flips)}':>16}")
    turned_right = sum(d > 0 for d in roll_follows)
    print(f"{'roll grows under a 20 degree rotation':<42}{f'{turned_right}/{len(roll_follows)}':>16}")
    p5, p50, p95 = np.percentile(roll_follows, [5, 50, 95])
    print(f"{'  by (median, 5th-95th pct)':<42}{f'{p50:.1f} ({p5:.1f}-{p95:.1f})':>16}")


if __name__ == "__main__":
    main()
