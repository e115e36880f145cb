"""Per-attribute thresholds from a labelled set: the threshold that maximises balanced accuracy.

Labels are a CSV with a ``key`` column (face keys of a tag dataset) and one 0/1 column per CelebA
attribute it labels (``Male``, ``Smiling``, ...). The result goes into ``tag.thresholds``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from facecap.stages.tag.schema import CELEBA40


@dataclass
class Calibration:
    attribute: str
    threshold: float
    balanced_accuracy: float
    at_default: float  # balanced accuracy at the default threshold, for comparison
    labelled: int


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray) -> float:
    rates = [np.mean(predicted[truth == value] == value) for value in (False, True) if (truth == value).any()]
    return float(np.mean(rates)) if rates else float("nan")


def calibrate(tagged: pd.DataFrame, labels: pd.DataFrame, default: float = 0.85) -> list[Calibration]:
    """One calibration per labelled CelebA attribute that the tagged rows have probabilities for."""
    if "key" not in labels.columns:
        raise ValueError("the labels need a 'key' column with the tag dataset's face keys")
    joined = tagged.merge(labels, on="key", suffixes=("", "_label"))
    results = []
    for attribute in (c for c in labels.columns if c in CELEBA40):
        column = f"attr_{attribute}"
        usable = joined[[column, attribute]].dropna() if column in joined.columns else pd.DataFrame()
        if len(usable) < 2:
            continue
        scores = usable[column].to_numpy(np.float64)
        truth = usable[attribute].astype(int).to_numpy() == 1
        candidates = np.unique(np.concatenate([scores, [default]]))
        accuracies = [balanced_accuracy(truth, scores > t) for t in candidates]
        best = int(np.nanargmax(accuracies))
        results.append(
            Calibration(
                attribute=attribute,
                threshold=float(candidates[best]),
                balanced_accuracy=accuracies[best],
                at_default=balanced_accuracy(truth, scores > default),
                labelled=len(usable),
            )
        )
    return results
