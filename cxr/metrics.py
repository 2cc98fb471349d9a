"""Screening metrics and the decision rule, shared by training, screening and reports.

The screening score is P(pneumonia) = P(not normal), for the binary and the
subtype task alike; the decision threshold applies to that score.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pneumonia_score(probs: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """N x C probabilities -> N scores of 'not normal': the sum of the other classes' probabilities.

    Not 1 - P(normal): in float32 that rounds to 0 for a confident 'normal' (P(normal) = 1.0f while
    P(pneumonia) = 1e-9), and the score would differ from the ``prob_pneumonia`` a user reads
    beside it. For the binary task the sum is exactly P(pneumonia). Capped at 1: float32
    probabilities of three classes can sum to 1.0000001, which is no probability (scikit-learn's
    Brier score refuses it).
    """
    probs = np.asarray(probs, dtype=np.float64)
    return np.minimum(np.delete(probs, list(classes).index("normal"), axis=1).sum(axis=1), 1.0)


def decide(probs: np.ndarray, classes: Sequence[str], threshold: float) -> list[str]:
    """Predicted class names: 'normal' below the threshold, else the most likely non-normal class."""
    probs = np.asarray(probs, dtype=np.float64)
    classes = list(classes)
    normal = classes.index("normal")
    score = pneumonia_score(probs, classes)
    masked = probs.copy()
    masked[:, normal] = -1.0
    best = masked.argmax(axis=1)
    return [classes[normal] if s < threshold else classes[b] for s, b in zip(score, best)]


def threshold_for_sensitivity(y_true: np.ndarray, score: np.ndarray, target: float) -> float:
    """A threshold with sensitivity (recall of positives) >= target and the best specificity that allows.

    Among the thresholds that classify these samples alike, it is the midpoint of the gap
    below the lowest positive kept, not that positive's own score: an engine whose scores
    differ in the last digits (fp32 ONNX vs the bf16 the threshold was found with) then
    still puts that positive, and every sample near the cut, on the same side.
    """
    y_true = np.asarray(y_true).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    pos = np.sort(score[y_true])
    if pos.size == 0:
        return 0.5
    # sensitivity(t) = mean(pos >= t); allowing k misses keeps pos[k] as the cut
    if not 0.0 < target <= 1.0:  # 98 (a percentage) or 1.5 would index from the end: a wrong threshold
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    k = int(np.floor((1.0 - target) * pos.size + 1e-9))
    cut = float(pos[min(k, pos.size - 1)])
    below = score[score < cut]
    if not below.size:
        return cut
    mid = (cut + float(below.max())) / 2.0  # of two adjacent floats this rounds to the lower: keep the cut then
    return mid if mid > below.max() else cut


def binary_metrics(y_true: np.ndarray, score: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
    """AUC, accuracy, sensitivity, specificity, precision, F1 at ``threshold`` (y_true: 1 = pneumonia)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    pred = s >= threshold
    tp, tn = int((pred & y).sum()), int((~pred & ~y).sum())
    fp, fn = int((pred & ~y).sum()), int((~pred & y).sum())
    sens = tp / (tp + fn) if tp + fn else float("nan")
    spec = tn / (tn + fp) if tn + fp else float("nan")
    prec = tp / (tp + fp) if tp + fp else float("nan")
    f1 = 2 * prec * sens / (prec + sens) if tp else 0.0
    auc = float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else float("nan")
    return {"auc": auc, "accuracy": (tp + tn) / max(1, y.size), "sensitivity": sens, "specificity": spec,
            "precision": prec, "f1": f1, "threshold": float(threshold), "tp": tp, "tn": tn, "fp": fp, "fn": fn}


def operating_point(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                    target_sensitivity: float) -> dict[str, float]:
    """The export's rule, in one place: the threshold on :func:`pneumonia_score` that keeps sensitivity
    >= ``target_sensitivity`` on (probs, class-index targets), and :func:`binary_metrics` there."""
    y = (np.asarray(targets) != list(classes).index("normal")).astype(int)
    score = pneumonia_score(probs, classes)
    return binary_metrics(y, score, threshold_for_sensitivity(y, score, target_sensitivity))


def validation_metrics(probs: np.ndarray, targets: np.ndarray, classes: Sequence[str],
                       target_sens: float) -> dict[str, float]:
    """An epoch's validation figures (metrics.jsonl, the epoch line): AUC and the 0.5 cut-off's
    accuracy/sensitivity/specificity, the operating point at ``target_sens``, and the plain NLL."""
    classes = list(classes)
    targets = np.asarray(targets)
    y = (targets != classes.index("normal")).astype(int)
    at_half = binary_metrics(y, pneumonia_score(probs, classes), 0.5)
    at_target = operating_point(probs, targets, classes, target_sens)
    thr = at_target["threshold"]
    nll = float(-np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-7, 1.0)).mean())
    return {
        "val_loss": nll, "val_auc": at_half["auc"], "val_accuracy": at_half["accuracy"],
        "val_sensitivity": at_half["sensitivity"], "val_specificity": at_half["specificity"],
        "val_threshold": thr, "val_accuracy_at_threshold": at_target["accuracy"],
        "val_sensitivity_at_threshold": at_target["sensitivity"],
        "val_specificity_at_threshold": at_target["specificity"],
    }
