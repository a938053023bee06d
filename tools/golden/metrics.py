"""Golden values for train/metrics.hpp: scikit-learn's accuracy, F1, Matthews correlation and
scipy's Pearson and Spearman correlation on a few random label/prediction sets, with ties,
constant inputs and T5's invalid prediction -1. NaN (scipy on a constant input) is written as null."""
import json
import math
import warnings

import numpy as np
from scipy import stats
from sklearn import metrics


def _number(value):
    value = float(value)
    return None if math.isnan(value) else value


def _classification(predictions, labels):
    binary = set(predictions) <= {0, 1} and set(labels) <= {0, 1}
    return {
        "predictions": [int(p) for p in predictions],
        "labels": [int(y) for y in labels],
        "accuracy": metrics.accuracy_score(labels, predictions),
        # sklearn's binary F1 takes labels {0, 1} only; -1 (invalid) cases check accuracy and MCC.
        "f1": metrics.f1_score(labels, predictions, zero_division=0) if binary else None,
        "matthews_corrcoef": metrics.matthews_corrcoef(labels, predictions),
    }


def _regression(x, y):
    return {
        "x": [float(v) for v in x],
        "y": [float(v) for v in y],
        "pearson": _number(stats.pearsonr(x, y)[0]),
        "spearman": _number(stats.spearmanr(x, y)[0]),
    }


def make(out_dir, shared_data):
    with warnings.catch_warnings():  # sklearn and scipy warn on the constant cases, on purpose here
        warnings.simplefilter("ignore")
        _make(out_dir)


def _make(out_dir):
    rng = np.random.default_rng(0)
    classification = [
        _classification(rng.integers(0, 2, 50), rng.integers(0, 2, 50)),
        _classification(rng.integers(0, 2, 7), rng.integers(0, 2, 7)),
        _classification([1, 1, 0, 1], [1, 1, 0, 1]),                 # perfect
        _classification([0, 0, 0, 0, 0], [0, 1, 0, 1, 1]),           # constant predictions: MCC 0, F1 0
        _classification([1, 1, 1, 1], [1, 1, 1, 1]),                 # constant both
        _classification(rng.integers(0, 3, 40), rng.integers(0, 3, 40)),  # MNLI-like, 3 classes
        _classification([-1, 0, 1, 2, -1, 2], [0, 0, 1, 2, 1, 2]),   # T5's invalid -1
    ]
    regression = [
        _regression(rng.normal(size=30), rng.normal(size=30)),
        _regression(np.round(rng.uniform(0, 5, 40) * 5) / 5, np.round(rng.uniform(0, 5, 40), 1)),  # ties
        _regression([1.0, 2.0, 2.0, 3.0, 3.0, 3.0], [3.0, 1.0, 1.0, 2.0, 5.0, 5.0]),
        _regression([2.0, 2.0, 2.0, 2.0], [1.0, 2.0, 3.0, 4.0]),     # constant: NaN
        _regression([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]),               # exactly 1
    ]
    (out_dir / "metrics.json").write_text(json.dumps({"classification": classification, "regression": regression}))
