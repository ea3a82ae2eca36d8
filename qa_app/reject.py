"""Rejection: a calibrated confidence that the top answer is right, and one accept threshold.

The confidence is a logistic model over a few signals of the ranked candidates, fitted by
``qa-app train-ranker`` on questions from a game kept out of the ranker's training (so the scores it
sees are as unfamiliar as a new KB's). Its output is a probability in [0, 1]; the threshold is one
number per deployment.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FEATURES = ("rank_top1", "rank_margin", "recall_top1_of_ranked", "recall_best")
CALIBRATION_FILE = "calibration.json"


def features(rank_scores: np.ndarray, recall_scores: np.ndarray) -> np.ndarray:
    """Signals of one query's candidates, already sorted best-first by rank score.

    rank_scores: ranker logits [k]; recall_scores: bi-encoder cosines of the same candidates [k].
    """
    top = float(rank_scores[0])
    # With a single candidate there is no runner-up: treat it as a confident margin.
    second = float(rank_scores[1]) if len(rank_scores) > 1 else top - 10.0
    return np.array([top, min(top - second, 10.0), float(recall_scores[0]), float(recall_scores.max())],
                    dtype=np.float64)


@dataclass(frozen=True)
class Rejector:
    weights: np.ndarray   # [len(FEATURES)]
    bias: float
    mean: np.ndarray      # feature standardisation
    std: np.ndarray
    threshold: float

    def confidence(self, feats: np.ndarray) -> np.ndarray:
        """Probability that the top candidate answers the question; feats [n, len(FEATURES)] -> [n]."""
        z = ((np.atleast_2d(feats) - self.mean) / self.std) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-z))

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        data = {"features": list(FEATURES), "weights": self.weights.tolist(), "bias": self.bias,
                "mean": self.mean.tolist(), "std": self.std.tolist(), "threshold": self.threshold,
                **(extra or {})}
        Path(folder, CALIBRATION_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> "Rejector":
        path = Path(folder, CALIBRATION_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the ranker has no calibration; retrain it with qa-app train-ranker")
        data = json.loads(path.read_text())
        if tuple(data["features"]) != FEATURES:
            raise ValueError(f"{path}: calibrated for features {data['features']}, this code uses {FEATURES}")
        return cls(np.array(data["weights"]), float(data["bias"]), np.array(data["mean"]),
                   np.array(data["std"]), float(data["threshold"]))

    @classmethod
    def fit(cls, feats: np.ndarray, correct: np.ndarray, threshold: float = 0.5,
            l2: float = 1e-3, steps: int = 2000) -> "Rejector":
        """Logistic regression of 'top answer correct' on the features (plain gradient descent; tiny data)."""
        feats = np.asarray(feats, dtype=np.float64)
        y = np.asarray(correct, dtype=np.float64)
        mean, std = feats.mean(0), feats.std(0) + 1e-6
        x = (feats - mean) / std
        w, b = np.zeros(x.shape[1]), 0.0
        for _ in range(steps):
            p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
            grad = p - y
            w -= 0.5 * (x.T @ grad / len(y) + l2 * w)
            b -= 0.5 * grad.mean()
        return cls(w, float(b), mean, std, threshold)
