"""Task metrics: accuracy, and F1 of one positive class (MRPC)."""

from __future__ import annotations

import numpy as np

from harness.tasks import TaskCard


def accuracy(gold: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(gold == pred)) if len(gold) else 0.0


def f1(gold: np.ndarray, pred: np.ndarray, positive: int) -> float:
    tp = int(np.sum((pred == positive) & (gold == positive)))
    predicted, actual = int(np.sum(pred == positive)), int(np.sum(gold == positive))
    if tp == 0:
        return 0.0
    precision, recall = tp / predicted, tp / actual
    return 2 * precision * recall / (precision + recall)


def score(card: TaskCard, gold, pred) -> dict[str, float]:
    """All metrics of a prediction, in percent; `score` is the task's headline metric."""
    gold, pred = np.asarray(gold), np.asarray(pred)
    result = {"accuracy": 100 * accuracy(gold, pred)}
    if card.metric == "f1":
        result["f1"] = 100 * f1(gold, pred, card.positive_label)
    result["score"] = result[card.metric]
    return result
