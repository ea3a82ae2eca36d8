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

FEATURES = ("rank_top1", "rank_margin", "recall_top1_of_ranked", "recall_best", "ranker_logit_top1",
            "answer_cosine_top1")
CANDIDATE_FEATURES = ("ranker_logit", "question_cosine", "answer_cosine")
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class Fusion:
    """The final score of a candidate: a linear mix of the ranker's logit and the recall cosines.

    Fitted on the calibration game (never seen by the ranker), so it weighs the ranker only as far as the
    ranker helps on unfamiliar knowledge bases.
    """
    weights: np.ndarray   # [len(CANDIDATE_FEATURES)]

    def score(self, candidate_features: np.ndarray) -> np.ndarray:
        """candidate_features [k, len(CANDIDATE_FEATURES)] -> [k]."""
        return candidate_features @ self.weights

    @classmethod
    def fit(cls, lists: list[np.ndarray], gold: list[int], l2: float = 1e-4, steps: int = 3000) -> "Fusion":
        """Listwise softmax regression: each list's gold candidate against the others (gradient descent)."""
        k = max(len(f) for f in lists)
        feats = np.zeros((len(lists), k, len(CANDIDATE_FEATURES)))
        mask = np.zeros((len(lists), k), dtype=bool)
        for i, f in enumerate(lists):
            feats[i, : len(f)], mask[i, : len(f)] = f, True
        scale = feats[mask].std(0) + 1e-6  # descend in standardised units, report raw weights
        x = feats / scale
        target = np.zeros((len(lists), k))
        target[np.arange(len(lists)), gold] = 1.0
        w = np.zeros(len(CANDIDATE_FEATURES))
        for _ in range(steps):
            z = np.where(mask, x @ w, -np.inf)
            p = np.exp(z - z.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            grad = np.einsum("nk,nkf->f", p - target, x) / len(lists) + l2 * w
            w -= 1.0 * grad
        return cls(w / scale)


def features(rank_scores: np.ndarray, recall_scores: np.ndarray, ranker_logits: np.ndarray,
             answer_scores: np.ndarray) -> np.ndarray:
    """Signals of one query's candidates, already sorted best-first by rank score.

    Each argument is [k]: fused rank scores, question cosines, ranker logits, answer cosines.
    """
    top = float(rank_scores[0])
    # With a single candidate there is no runner-up: treat it as a confident margin.
    second = float(rank_scores[1]) if len(rank_scores) > 1 else top - 10.0
    return np.array([top, min(top - second, 10.0), float(recall_scores[0]), float(recall_scores.max()),
                     float(ranker_logits[0]), float(answer_scores[0])], dtype=np.float64)


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

    def save(self, folder: str | Path, fusion: "Fusion", extra: dict | None = None) -> None:
        data = {"features": list(FEATURES), "weights": self.weights.tolist(), "bias": self.bias,
                "mean": self.mean.tolist(), "std": self.std.tolist(), "threshold": self.threshold,
                "candidate_features": list(CANDIDATE_FEATURES), "fusion_weights": fusion.weights.tolist(),
                **(extra or {})}
        Path(folder, CALIBRATION_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> tuple["Rejector", Fusion, dict]:
        """The rejector, the candidate fusion and the rest of the calibration record of a ranker folder."""
        path = Path(folder, CALIBRATION_FILE)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the ranker has no calibration; retrain it with qa-app train-ranker")
        data = json.loads(path.read_text())
        if tuple(data["features"]) != FEATURES or tuple(data["candidate_features"]) != CANDIDATE_FEATURES:
            raise ValueError(f"{path}: calibrated for other features; retrain it with qa-app train-ranker")
        rejector = cls(np.array(data["weights"]), float(data["bias"]), np.array(data["mean"]),
                       np.array(data["std"]), float(data["threshold"]))
        return rejector, Fusion(np.array(data["fusion_weights"])), data

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
