"""Paired tests between two methods scored on the same eval rows, from the predictions their records store.

Accuracy: the exact McNemar test (a two-sided binomial test on the rows exactly one of the two got right).
F1, which does not split into per-row scores: a paired permutation test, each row's two predictions swapped at
random (9,999 resamples from a fixed seed, so a report regenerates to the same bytes). Runs of several seeds are
pooled: each seed's rows are paired with the other method's run of the same seed, or with its only run where it
uses no training data (the manual prompt gives the same predictions for every split).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from harness.metrics import accuracy, f1
from harness.record import RunRecord

ALPHA = 0.05
RESAMPLES = 9_999


@dataclass(frozen=True)
class Paired:
    difference: float  # a's metric minus b's on the paired rows, in points
    p_value: float
    rows: int
    test: str  # "McNemar" | "permutation"

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA


def mcnemar(a_right: np.ndarray, b_right: np.ndarray) -> float:
    """Two-sided exact McNemar p-value: under no difference, each discordant row is a fair coin."""
    only_a = int(np.sum(a_right & ~b_right))
    only_b = int(np.sum(~a_right & b_right))
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def permutation(gold: np.ndarray, a: np.ndarray, b: np.ndarray, positive: int, seed: int = 0) -> float:
    """Two-sided paired permutation p-value for the difference in F1."""

    def difference(x, y, axis):
        return _f1_rows(gold, x, positive) - _f1_rows(gold, y, positive)

    result = stats.permutation_test(
        (a, b), difference, permutation_type="samples", vectorized=True, n_resamples=RESAMPLES,
        alternative="two-sided", rng=np.random.default_rng(seed),
    )
    return float(result.pvalue)


def _f1_rows(gold: np.ndarray, pred: np.ndarray, positive: int) -> np.ndarray:
    """F1 along the last axis: one value for one prediction vector, one per row for a batch of resamples."""
    tp = np.sum((pred == positive) & (gold == positive), axis=-1)
    predicted, actual = np.sum(pred == positive, axis=-1), np.sum(gold == positive)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(tp > 0, 2 * tp / (predicted + actual), 0.0)


def _rows(record: RunRecord) -> dict[int, tuple[int, int]] | None:
    """Row id -> (prediction, gold), or None where the record stores no gold labels."""
    p = record.predictions
    if p is None or not p.gold:
        return None
    return dict(zip(p.row_ids(), zip(p.label_ids().tolist(), p.gold_ids().tolist())))


def pair_runs(a_runs: list[RunRecord], b_runs: list[RunRecord]) -> Paired | None:
    """The paired test of method a against method b on one task, pooled over seeds; None if nothing pairs."""
    b_by_seed = {r.seed: r for r in b_runs}
    gold, a_pred, b_pred = [], [], []
    for a in sorted(a_runs, key=lambda r: r.seed):
        b = b_by_seed.get(a.seed) or (b_runs[0] if len(b_runs) == 1 else None)
        rows_a, rows_b = _rows(a), _rows(b) if b else None
        if not rows_a or not rows_b:
            continue
        for row in sorted(rows_a.keys() & rows_b.keys()):
            if rows_a[row][1] != rows_b[row][1]:
                raise ValueError(f"{a.task} row {row}: the two records disagree on its gold label")
            gold.append(rows_a[row][1])
            a_pred.append(rows_a[row][0])
            b_pred.append(rows_b[row][0])
    if not gold:
        return None
    gold, a_pred, b_pred = np.array(gold), np.array(a_pred), np.array(b_pred)
    positive = a_runs[0].predictions.positive
    if a_runs[0].metric == "f1":
        diff = 100 * (f1(gold, a_pred, positive) - f1(gold, b_pred, positive))
        return Paired(diff, permutation(gold, a_pred, b_pred, positive), len(gold), "permutation")
    diff = 100 * (accuracy(gold, a_pred) - accuracy(gold, b_pred))
    return Paired(diff, mcnemar(a_pred == gold, b_pred == gold), len(gold), "McNemar")
