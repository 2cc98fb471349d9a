"""Evaluation report of screening results: metrics.json, PNG plots and one self-contained HTML page.

Pure (numpy, scikit-learn, matplotlib, pyarrow): no Ray, no torch, so ``cxr report``
runs anywhere the Parquet results can be read. The screening job calls
``write_report(table, output_dir)``; everything shown is computed from the rows.

Conventions
- The screening score is ``cxr.metrics.pneumonia_score`` (p(not normal)), for the binary
  and the subtype model alike; "positive" means any non-normal truth (pneumonia,
  bacteria, virus).
- Predictions are the ``label`` column (what the screening job delivered); a row whose
  label disagrees with ``cxr.metrics.decide`` at its threshold is counted in a warning.
- Rows with an ``error_code`` or without probabilities are errors: counted, never scored.
  Scored rows without a (recognised) ``true_label`` are counted and left out of metrics.
- Thresholds for sensitivity 0.95/0.98/0.99 are chosen on the evaluated rows themselves,
  so their specificities are optimistic; use them to compare models, not as a
  calibrated operating point.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxr import __version__
from cxr.data import known_patient_id, subtype_from_name
from cxr.errors import CxrError
from cxr.metrics import binary_metrics, decide, pneumonia_score, threshold_for_sensitivity

REPORT_SCHEMA_VERSION = 1
SENSITIVITY_TARGETS = (0.95, 0.98, 0.99)
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CALIBRATION_BINS = 10
ERROR_EXAMPLES = 3
MAX_CURVE_POINTS = 1000  # curves in metrics.json are thinned to this many points
_POSITIVE_NAMES = ("pneumonia", "bacteria", "virus")
_SUBTYPES = ("bacteria", "virus")
_PLOT_NAMES = ("roc", "pr", "calibration", "score_hist", "confusion")


# ----------------------------------------------------------------------------- statistics


def bootstrap_auc(y_true: np.ndarray, score: np.ndarray, n_resamples: int = BOOTSTRAP_RESAMPLES,
                  seed: int = BOOTSTRAP_SEED, chunk_elems: int = 4_000_000,
                  groups: Sequence[Any] | None = None) -> np.ndarray:
    """ROC AUC of ``n_resamples`` stratified bootstrap resamples (positives and negatives
    resampled separately, so every resample has both classes, as pROC does by default).

    ``groups`` (e.g. patient ids): resample whole groups instead of images, since several films of
    one patient are not independent evidence (an image-level interval is then too narrow). The
    strata are then the groups holding a positive and the others; a resample that draws no negative
    (every negative in a group with positives) is NaN.

    Vectorised: each resample is a vector of draw counts per sampling unit, and the AUC
    (Mann-Whitney, ties counted 1/2, exactly what roc_auc_score gives on the resample) is
    sum_i c_i * (negatives below s_i + 1/2 negatives tied with s_i) / (positives drawn x negatives drawn,
    P x N without groups), read off a
    cumulative sum of negative counts in score order. Work and memory are
    O(resamples x rows), done in chunks of about ``chunk_elems`` counts.
    """
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    pos_rows = np.flatnonzero(y)
    neg_rows = np.flatnonzero(~y)[np.argsort(s[~y], kind="stable")]
    pos, neg = s[pos_rows], s[neg_rows]
    n_pos, n_neg = pos.size, neg.size
    if n_pos == 0 or n_neg == 0 or n_resamples <= 0:
        return np.full(max(n_resamples, 0), np.nan)
    if groups is None:  # every image its own unit: positives first, then the negatives in score order
        unit_pos, unit_neg, strata = np.arange(n_pos), n_pos + np.arange(n_neg), (n_pos, n_neg)
    else:
        _, unit = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
        # number the groups in order of appearance among the positives, then the sorted negatives: those
        # holding a positive come first (one stratum), and one group per image numbers them as above
        seen = np.concatenate([unit[pos_rows], unit[neg_rows]])
        _, first = np.unique(seen, return_index=True)
        rank = np.empty(first.size, dtype=np.int64)
        rank[seen[np.sort(first)]] = np.arange(first.size)
        unit_pos, unit_neg = rank[unit[pos_rows]], rank[unit[neg_rows]]
        holding = int(np.unique(unit_pos).size)
        strata = (holding, first.size - holding)
    lo = np.searchsorted(neg, pos, side="left")  # negatives strictly below each positive
    hi = np.searchsorted(neg, pos, side="right")  # ... below or tied
    rng = np.random.default_rng(seed)
    out = np.empty(n_resamples)
    step = max(1, chunk_elems // max(n_pos, n_neg))
    for start in range(0, n_resamples, step):
        b = min(step, n_resamples - start)
        drawn = np.concatenate([_draw_counts(rng, b, n) for n in strata], axis=1)  # b x units
        c, d = drawn[:, unit_pos], drawn[:, unit_neg]  # how often each positive / sorted negative was drawn
        cum = np.zeros((b, n_neg + 1))
        np.cumsum(d, axis=1, out=cum[:, 1:])
        below, upto = cum[:, lo], cum[:, hi]
        with np.errstate(invalid="ignore", divide="ignore"):  # a group resample without negatives: NaN
            out[start:start + b] = (c * (below + 0.5 * (upto - below))).sum(axis=1) / (c.sum(axis=1) * d.sum(axis=1))
    return out


def _draw_counts(rng: np.random.Generator, b: int, n: int) -> np.ndarray:
    """b resamples of n draws with replacement from n items, as a b x n matrix of counts."""
    if n == 0:
        return np.zeros((b, 0))
    idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
    return np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64)


def wilson_interval(successes: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: honest for small counts and for 0 % / 100 %,
    where the normal approximation collapses to a zero-width interval."""
    if total <= 0:
        return (math.nan, math.nan)
    p = successes / total
    denom = 1.0 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    # at 0 % or 100 % one bound is exact in theory but 1e-17 off in floats: snap what rounding moved
    lo, hi = centre - half, centre + half
    return (0.0 if successes == 0 else max(0.0, lo), 1.0 if successes == total else min(1.0, hi))


def calibration_bins(y_true: np.ndarray, score: np.ndarray, n_bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability-diagram data and ECE over equal-width bins of the score.

    Bins are assigned like sklearn.calibration.calibration_curve(strategy="uniform"), so the
    diagram matches it; ECE = sum_b (n_b / n) * |fraction positive_b - mean score_b|.
    """
    y = np.asarray(y_true, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ids = np.searchsorted(edges[1:-1], s)
    total = np.bincount(ids, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_pred = np.bincount(ids, weights=s, minlength=n_bins) / total
        frac_pos = np.bincount(ids, weights=y, minlength=n_bins) / total
    nz = total > 0
    ece = float(np.sum(total[nz] / max(1, s.size) * np.abs(frac_pos[nz] - mean_pred[nz]))) if s.size else math.nan
    return {"n_bins": n_bins, "bin_edges": edges.tolist(), "count": total.tolist(),
            "mean_predicted": mean_pred.tolist(), "fraction_positive": frac_pos.tolist(), "ece": ece}


def per_class_table(y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str]) -> tuple[dict[str, Any], np.ndarray]:
    """Precision/recall/F1/support per class plus macro and weighted averages, from the
    confusion matrix (rows = truth, columns = prediction). Undefined ratios (no predictions
    or no truths of a class) are NaN, not 0: a missing class is not a bad class."""
    labels = list(labels)
    index = {c: i for i, c in enumerate(labels)}
    t = np.array([index[v] for v in y_true], dtype=np.int64)
    p = np.array([index.get(v, -1) for v in y_pred], dtype=np.int64)
    k = len(labels)
    ok = p >= 0  # a prediction outside the label set counts against recall only
    cm = np.bincount(t[ok] * k + p[ok], minlength=k * k).reshape(k, k)
    tp = np.diag(cm).astype(np.float64)
    support = np.bincount(t, minlength=k).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = np.where(tp > 0, 2 * precision * recall / (precision + recall),
                      np.where((predicted > 0) | (support > 0), 0.0, np.nan))
    table: dict[str, Any] = {}
    for i, c in enumerate(labels):
        table[c] = {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": int(support[i])}
    for name, weights in (("macro avg", np.ones(k)), ("weighted avg", support)):
        # NaN entries are left out and the rest re-weighted, as sklearn does with zero_division=nan
        table[name] = {m: _nan_average(v, weights) for m, v in (("precision", precision), ("recall", recall), ("f1", f1))}
        table[name]["support"] = int(support.sum())
    return table, cm


def _nan_average(values: np.ndarray, weights: np.ndarray) -> float:
    ok = ~np.isnan(values) & (weights > 0)
    return float(np.average(values[ok], weights=weights[ok])) if ok.any() else math.nan


# ----------------------------------------------------------------------------- table handling


def _column(table: pa.Table, name: str, default: Any = None) -> list[Any]:
    """A column as a Python list, or ``default`` per row when the column is absent."""
    if name in table.column_names:
        return table.column(name).to_pylist()
    return [default] * table.num_rows


def _classes_of(table: pa.Table, classes: Sequence[str] | None) -> list[str]:
    names = [c[len("prob_"):] for c in table.column_names if c.startswith("prob_")] if classes is None else list(classes)
    missing = [c for c in names if f"prob_{c}" not in table.column_names]
    if missing:
        raise CxrError(f"results lack probability columns {', '.join('prob_' + c for c in missing)}")
    if "normal" not in names:
        raise CxrError(f"results need a prob_normal column for the screening score (classes: {names})")
    if len(names) < 2:
        raise CxrError(f"results need at least two prob_ columns (got {names})")
    return names


def _unique(values: Sequence[Any]) -> list[Any]:
    """Distinct non-null values, most common first."""
    return [v for v, _ in Counter(v for v in values if v is not None).most_common()]


def _truth_names(true_labels: Sequence[str | None]) -> list[str | None]:
    """Normalised truths: lower-case, stripped; unknown names become None (counted apart)."""
    out: list[str | None] = []
    for v in true_labels:
        name = None if v is None else str(v).strip().lower()
        out.append(name if name in ("normal",) + _POSITIVE_NAMES else None)
    return out


def _thin(*arrays: np.ndarray, limit: int = MAX_CURVE_POINTS) -> list[list[float]]:
    """Keep at most ``limit`` evenly spaced points (always the first and last) of curve arrays."""
    n = len(arrays[0])
    keep = np.unique(np.linspace(0, n - 1, limit).round().astype(int)) if n > limit else np.arange(n)
    return [np.asarray(a, dtype=np.float64)[keep].tolist() for a in arrays]


# ----------------------------------------------------------------------------- main entry


def write_report(results: pa.Table, output_dir: str | Path, classes: list[str] | None = None) -> dict:
    """Write metrics.json, PNG plots and report.html for screening ``results``; return the metrics
    exactly as written to metrics.json (undefined numbers as None).

    Never fails because of the data (no labels, one class only, all errors): sections that
    cannot be computed are marked unavailable with the reason. Fails (CxrError) only when
    the table is not screening output (no prob_ columns / no prob_normal).
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, data = _compute(results, classes)
    plots = _write_plots(metrics, data, out) if metrics["metrics_available"] else {}
    metrics["plots"] = {k: p.name for k, p in plots.items()}
    for name in set(_PLOT_NAMES) - set(plots):  # a rerun into the same folder must not show stale plots
        (out / f"{name}.png").unlink(missing_ok=True)
    clean = _json_ready(metrics)
    (out / "metrics.json").write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out / "report.html").write_text(_render_html(clean, plots), encoding="utf-8")
    return clean


def _split_rows(results: pa.Table, classes: list[str]) -> dict[str, Any]:
    """Everything the metrics need, as numpy arrays over the rows (errors and labels marked)."""
    probs = np.full((results.num_rows, len(classes)), np.nan)
    for j, c in enumerate(classes):  # nulls become NaN, so such rows fail the isfinite check below
        probs[:, j] = results.column(f"prob_{c}").cast(pa.float64()).to_numpy()
    error_code = _column(results, "error_code")
    scored = np.array([e is None for e in error_code], dtype=bool) & np.isfinite(probs).all(axis=1)
    raw_truth = _column(results, "true_label")
    truth = _truth_names(raw_truth)
    return {
        "probs": probs, "scored": scored, "error_code": error_code, "truth": truth, "raw_truth": raw_truth,
        "path": [str(p) if p is not None else "" for p in _column(results, "path", "")],
        "error": _column(results, "error"), "label": _column(results, "label"),
        "threshold": _column(results, "threshold"),
    }


def compute_metrics(results: pa.Table, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """All report numbers as a dict (NaN where undefined); no files written."""
    return _compute(results, classes)[0]


def _compute(results: pa.Table, classes: Sequence[str] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The metrics, and the per-row arrays of the labelled rows that the plots need."""
    classes = _classes_of(results, classes)
    rows = _split_rows(results, classes)
    scored, truth = rows["scored"], rows["truth"]
    warnings: list[str] = []

    # model identity and threshold: one model per results folder is the norm; say so when not
    model_ids = _unique(_column(results, "model_id"))
    versions = _unique(_column(results, "model_version"))
    if len(model_ids) > 1:
        warnings.append(f"results hold {len(model_ids)} model ids ({', '.join(map(str, model_ids[:4]))}); metrics pool them")
    thresholds = _unique([t for t, ok in zip(rows["threshold"], scored) if ok and t is not None and math.isfinite(t)])
    if not thresholds:
        threshold = 0.5
        if scored.any():
            warnings.append("no threshold in the results; using 0.5")
    else:
        threshold = float(thresholds[0])
        if len(thresholds) > 1:
            warnings.append(f"rows carry {len(thresholds)} thresholds; using the most common, {threshold:g}")
    scored_at = _min_max(results, "scored_at")

    # errors by code (rows with no error code but no usable probabilities count as 'no_probabilities')
    by_code: dict[str, dict[str, Any]] = {}
    for i in np.flatnonzero(~scored):
        code = rows["error_code"][i] or "no_probabilities"
        entry = by_code.setdefault(str(code), {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < ERROR_EXAMPLES:
            entry["examples"].append({"path": rows["path"][i], "error": rows["error"][i]})
    by_code = dict(sorted(by_code.items(), key=lambda kv: (-kv[1]["count"], kv[0])))

    known = np.array([t is not None for t in truth], dtype=bool)
    raw_present = np.array([t is not None for t in rows["raw_truth"]], dtype=bool)
    odd = scored & raw_present & ~known  # error rows are out of the metrics whatever their label
    unrecognised = sorted({str(rows["raw_truth"][i]) for i in np.flatnonzero(odd)})
    if unrecognised:
        warnings.append(f"{int(odd.sum())} scored rows have unrecognised true_label "
                        f"({', '.join(unrecognised[:5])}); treated as unlabelled")
    labelled = scored & known
    unscored_positives = int(sum(1 for i in np.flatnonzero(~scored & known) if truth[i] != "normal"))
    if unscored_positives:
        warnings.append(f"{unscored_positives} pneumonia-labelled files could not be scored (error rows): they "
                        "are in no metric, sensitivity included; rescore or read them another way")
    counts = {
        "rows": int(results.num_rows), "scored": int(scored.sum()), "errors": int((~scored).sum()),
        "labelled": int(labelled.sum()), "unlabelled": int((scored & ~known).sum()),
        "errors_with_label": int((~scored & known).sum()), "errors_with_pneumonia_label": unscored_positives,
        "unrecognised_label": int(odd.sum()),
    }
    metrics: dict[str, Any] = {
        "schema_version": REPORT_SCHEMA_VERSION,
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cxr_version": __version__,
        "model": {"model_id": model_ids[0] if model_ids else None, "model_version": versions[0] if versions else None,
                  "model_ids": model_ids, "model_versions": versions, "classes": classes, "threshold": threshold,
                  "scored_from": scored_at[0], "scored_to": scored_at[1]},
        "counts": counts,
        "errors": {"total": counts["errors"], "by_code": by_code},
        "warnings": warnings,
    }
    idx = np.flatnonzero(labelled)
    y = np.array([truth[i] != "normal" for i in idx], dtype=bool)
    counts["positives"], counts["negatives"] = int(y.sum()), int((~y).sum())
    if idx.size == 0:
        metrics["metrics_available"] = False
        metrics["reason"] = "no scored row has a true_label (counts and errors only)"
        return metrics, {}
    metrics["metrics_available"] = True
    probs = rows["probs"][idx]
    score = pneumonia_score(probs, classes)
    both = 0 < y.sum() < y.size
    if not both:
        warnings.append(f"labelled rows are all {'pneumonia' if y.all() else 'normal'}: AUC, curves and "
                        "operating points are undefined")

    # predictions: the delivered label column; check it against the decision rule
    decided = decide(probs, classes, threshold)
    delivered = [rows["label"][i] for i in idx]
    pred = [d if d is not None else r for d, r in zip(delivered, decided)]
    mismatch = sum(1 for d, r in zip(delivered, decided) if d is not None and d != r)
    if mismatch:
        warnings.append(f"{mismatch} labelled rows have a label that differs from cxr.metrics.decide at "
                        f"threshold {threshold:g}; the report uses the delivered label")

    # per-class table: the model's own classes when every truth is one of them (subtype model
    # with subtype truths), else the binary collapse normal / pneumonia
    truths = [truth[i] for i in idx]
    if len(classes) > 2 and all(t in classes for t in truths):
        level, labels = "model_classes", list(classes)
        t_names, p_names = truths, pred
    else:
        level, labels = "binary", ["normal", "pneumonia"]
        t_names = ["normal" if t == "normal" else "pneumonia" for t in truths]
        p_names = ["normal" if p == "normal" else "pneumonia" for p in pred]
    table, cm = per_class_table(t_names, p_names, labels)
    if level == "model_classes" or len(classes) == 2:
        for j, c in enumerate(labels):  # one-vs-rest AUC of each class's own probability
            yc = np.array([t == c for t in t_names])
            col = probs[:, classes.index(c)] if c in classes else score
            table[c]["auc_ovr"] = _auc(yc, col)
    metrics["classification"] = {"level": level, "labels": labels, "per_class": table,
                                 "accuracy": float(np.trace(cm) / max(1, len(t_names))),
                                 "confusion_matrix": cm.tolist()}

    # binary screening block on the pneumonia score
    at_model = _operating_point(y, score, threshold)
    # films of one patient are one piece of evidence: resample patients (named by Kermany-style file names;
    # any other file is its own patient)
    paths = [rows["path"][i] for i in idx]
    folders, names = _folders_and_names(paths)
    patients = [_patient_key(*film) for film in zip(paths, folders, names)]
    n_patients = len(set(patients))
    by_patient = n_patients < idx.size  # else one film per patient: the image bootstrap itself
    ci = (bootstrap_auc(y, score, groups=patients if by_patient else None) if both
          else np.full(BOOTSTRAP_RESAMPLES, np.nan))
    auc = at_model["auc"]
    ci95 = [_nanpct(ci, 2.5), _nanpct(ci, 97.5)]
    if both and not ci95[0] < ci95[1]:  # e.g. a perfect separation: every resample gives the same AUC
        ci95 = [math.nan, math.nan]
        warnings.append("the AUC's bootstrap interval has no width (perfect separation, or too few cases): "
                        "not estimable, reported as undefined")
    if both and min(counts["positives"], counts["negatives"]) < 10:
        warnings.append(f"only {min(counts['positives'], counts['negatives'])} "
                        f"{'positives' if counts['positives'] < counts['negatives'] else 'negatives'}: "
                        "the AUC's interval is unreliable")
    unit = f"patients ({n_patients} for {idx.size} images)" if by_patient else "images"
    one_class = int(np.isnan(ci).sum()) if both else 0  # a patient resample without a negative (or positive)
    metrics["auc"] = {"value": auc, "ci95": ci95,
                      "std_error": float(np.nanstd(ci, ddof=1)) if both else math.nan,
                      "method": f"stratified bootstrap over {unit}, percentile interval, {BOOTSTRAP_RESAMPLES} "
                                f"resamples, seed {BOOTSTRAP_SEED}"
                                + (f"; {one_class} resamples with one class only left out" if one_class else ""),
                      "resampled": "patients" if by_patient else "images"}
    metrics["at_model_threshold"] = at_model
    metrics["operating_points"] = [
        {"target_sensitivity": t, **_operating_point(y, score, threshold_for_sensitivity(y, score, t))}
        for t in SENSITIVITY_TARGETS
    ] if both else []
    metrics["curves"] = _curves(y, score) if both else {}
    from sklearn.metrics import brier_score_loss

    metrics["calibration"] = {"brier": float(brier_score_loss(y, score)) if y.size else math.nan,
                              **calibration_bins(y, score)}
    metrics["score_summary"] = {name: _summary(score[mask]) for name, mask in
                                (("normal", ~y), ("pneumonia", y)) if mask.any()}
    sub = np.array([t if t in _SUBTYPES else "normal" if t == "normal" else subtype_from_name(name, "pneumonia")
                    for name, t in zip(names, truths)])
    metrics["subtypes"] = _subtypes(sub, score, pred, threshold, metrics["operating_points"])
    return metrics, {"y": y, "score": score, "subtype": sub}


def _folders_and_names(paths: Sequence[str]) -> tuple[list[str], list[str]]:
    """Each path's folder and file name, by string splitting: a PurePosixPath per row cost the report of a
    million rows ~15 s."""
    split = [p.replace("\\", "/").rpartition("/") for p in paths]
    return [folder for folder, _, _ in split], [name for _, _, name in split]


def _patient_key(path: str, folder: str, name: str) -> str:
    """The patient a film belongs to for the bootstrap: a Kermany-style id in its name, within its folder
    (an OsiriX/Horos export names every study's films IM-0001-0001 too), else the film itself."""
    pid = known_patient_id(name)
    return f"{folder}/{pid}" if pid else path


def _min_max(table: pa.Table, name: str) -> tuple[str | None, str | None]:
    """The smallest and largest non-null value of a column, as text (Nones when it has none)."""
    if name not in table.column_names or table.column(name).null_count == table.num_rows:
        return None, None
    lo, hi = pc.min_max(table.column(name)).values()
    return str(lo.as_py()), str(hi.as_py())


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < y.size else math.nan


def _nanpct(a: np.ndarray, q: float) -> float:
    return float(np.nanpercentile(a, q)) if np.isfinite(a).any() else math.nan


def _operating_point(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, Any]:
    """cxr.metrics.binary_metrics at one threshold, plus Wilson 95% CIs of sensitivity and specificity."""
    m = binary_metrics(y, score, threshold)
    m["sensitivity_ci95"] = list(wilson_interval(m["tp"], m["tp"] + m["fn"]))
    m["specificity_ci95"] = list(wilson_interval(m["tn"], m["tn"] + m["fp"]))
    m["flagged_fraction"] = (m["tp"] + m["fp"]) / max(1, y.size)
    return m


def _curves(y: np.ndarray, score: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    fpr, tpr, roc_thr = roc_curve(y, score)
    prec, rec, pr_thr = precision_recall_curve(y, score)
    roc_pts = _thin(fpr, tpr, roc_thr)
    pr_pts = _thin(prec[:-1], rec[:-1], pr_thr)  # the final (1, 0) point has no threshold
    return {
        "roc": {"fpr": roc_pts[0], "tpr": roc_pts[1], "thresholds": roc_pts[2], "points": int(fpr.size)},
        "pr": {"precision": pr_pts[0] + [1.0], "recall": pr_pts[1] + [0.0], "thresholds": pr_pts[2],
               "points": int(prec.size), "average_precision": float(average_precision_score(y, score)),
               "prevalence": float(y.mean())},
    }


def _summary(s: np.ndarray) -> dict[str, float]:
    q = np.percentile(s, [5, 25, 50, 75, 95])
    return {"n": int(s.size), "mean": float(s.mean()), "p05": q[0], "p25": q[1], "median": q[2], "p75": q[3], "p95": q[4]}


def _subtypes(sub: np.ndarray, score: np.ndarray, pred: list[str], threshold: float,
              points: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Recall per pneumonia subtype (``sub``: bacteria/virus from true_label, else from the file name).

    None when no subtype is known: the breakdown would be one 'unknown' row.
    """
    if not np.isin(sub, _SUBTYPES).any():
        return None
    out: dict[str, Any] = {"source": "true_label, else the file name (cxr.data.subtype_from_name)", "groups": {}}
    for name in ("bacteria", "virus", "unknown", "normal"):
        mask = sub == name
        if not mask.any():
            continue
        s = score[mask]
        flagged = int((s >= threshold).sum())
        entry: dict[str, Any] = {"n": int(mask.sum()), "mean_score": float(s.mean())}
        if name == "normal":  # for normals the same number is specificity
            entry["specificity"] = 1.0 - flagged / mask.sum()
        else:
            entry["recall"] = flagged / mask.sum()
            entry["recall_ci95"] = list(wilson_interval(flagged, int(mask.sum())))
            entry["recall_at_targets"] = {f"{p['target_sensitivity']:g}": float((s >= p["threshold"]).mean()) for p in points}
            if name in _SUBTYPES and any(p in _SUBTYPES for p in pred):  # subtype model: right subtype named?
                entry["subtype_accuracy"] = float(np.mean([pred[k] == name for k in np.flatnonzero(mask)]))
        out["groups"][name] = entry
    return out


# ----------------------------------------------------------------------------- JSON


def _json_ready(obj: Any) -> Any:
    """numpy scalars -> Python; NaN/inf -> None (JSON has no NaN; null reads as 'undefined')."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _json_ready(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


# ----------------------------------------------------------------------------- plots


def _write_plots(metrics: dict[str, Any], data: dict[str, Any], out: Path) -> dict[str, Path]:
    """PNG plots through matplotlib's object API (no pyplot: no global backend, no GUI)."""
    from matplotlib.figure import Figure

    y, score, pn = data["y"], data["score"], data["subtype"]
    thr = metrics["model"]["threshold"]
    paths: dict[str, Path] = {}

    def save(fig: Figure, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=110)
        paths[name] = out / f"{name}.png"

    curves = metrics.get("curves") or {}
    if curves:
        roc = curves["roc"]
        fig = Figure(figsize=(5, 4.6))
        ax = fig.add_subplot()
        ax.plot(roc["fpr"], roc["tpr"], color="#1f5fa8", lw=2, label=f"ROC (AUC {metrics['auc']['value']:.3f})")
        ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1)
        m = metrics["at_model_threshold"]
        ax.plot(1 - m["specificity"], m["sensitivity"], "o", color="#c0392b", label=f"model threshold {thr:g}")
        for p, mk in zip(metrics["operating_points"], ("s", "^", "D")):
            ax.plot(1 - p["specificity"], p["sensitivity"], mk, ms=5, mfc="none", color="#333",
                    label=f"sens ≥ {p['target_sensitivity']:g} (t={p['threshold']:.4g})")
        ax.set(xlabel="1 − specificity (false positive rate)", ylabel="sensitivity", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01),
               title="ROC curve")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        save(fig, "roc")

        pr = curves["pr"]
        fig = Figure(figsize=(5, 4.6))
        ax = fig.add_subplot()
        ax.step(pr["recall"], pr["precision"], where="post", color="#1f5fa8", lw=2,
                label=f"PR (AP {pr['average_precision']:.3f})")
        ax.axhline(pr["prevalence"], color="#999", ls="--", lw=1, label=f"prevalence {pr['prevalence']:.2f}")
        ax.set(xlabel="recall (sensitivity)", ylabel="precision", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01),
               title="Precision-recall curve")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
        save(fig, "pr")

    cal = metrics["calibration"]
    fig = Figure(figsize=(5, 5.4))
    ax, axh = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centres = (np.array(cal["bin_edges"][:-1]) + np.array(cal["bin_edges"][1:])) / 2
    mp, fp = np.array(cal["mean_predicted"], dtype=float), np.array(cal["fraction_positive"], dtype=float)
    ok = np.isfinite(mp)
    ax.plot([0, 1], [0, 1], color="#999", ls="--", lw=1, label="perfectly calibrated")
    ax.plot(mp[ok], fp[ok], "o-", color="#1f5fa8", label=f"model (ECE {cal['ece']:.3f}, Brier {cal['brier']:.3f})")
    ax.set(ylabel="fraction pneumonia", ylim=(-0.01, 1.01), title="Reliability diagram (pneumonia score)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    axh.bar(centres, cal["count"], width=1 / cal["n_bins"] * 0.9, color="#8aa9cf")
    axh.set(xlabel="predicted pneumonia score (bin)", ylabel="rows", xlim=(0, 1))
    save(fig, "calibration")

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    bins = np.linspace(0, 1, 41)
    sub = metrics.get("subtypes")
    if sub:  # split the pneumonia class by subtype: which one the model misses shows here
        names = [("bacteria", "#c0392b"), ("virus", "#e67e22"), ("unknown", "#8e44ad")]
        groups = [("normal", ~y, "#2e86c1")]
        groups += [(n, y & (pn == n), c) for n, c in names]
    else:
        groups = [("normal", ~y, "#2e86c1"), ("pneumonia", y, "#c0392b")]
    for name, mask, colour in groups:
        if mask.any():
            ax.hist(score[mask], bins=bins, histtype="stepfilled", alpha=0.35, color=colour,
                    label=f"{name} (n={int(mask.sum())})")
            ax.hist(score[mask], bins=bins, histtype="step", color=colour, lw=1.2)
    ax.axvline(thr, color="#222", ls="--", lw=1, label=f"threshold {thr:g}")
    ax.set(xlabel="pneumonia score (p(not normal))", ylabel="rows", xlim=(0, 1), title="Score distribution by true class")
    ax.legend(fontsize=8)
    save(fig, "score_hist")

    clf = metrics["classification"]
    cm = np.array(clf["confusion_matrix"])
    k = len(clf["labels"])
    fig = Figure(figsize=(1.6 + 1.1 * k, 1.3 + 1.0 * k))
    ax = fig.add_subplot()
    rowsum = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rowsum, out=np.zeros_like(cm, dtype=float), where=rowsum > 0)
    ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, f"{v}\n{frac[i, j]:.0%}", ha="center", va="center", fontsize=10,
                color="white" if frac[i, j] > 0.6 else "#111")
    ax.set_xticks(range(k), clf["labels"])
    ax.set_yticks(range(k), clf["labels"])
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    save(fig, "confusion")
    return paths


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;color:#1d2733;
margin:0;background:#f4f6f9}
main{max-width:1080px;margin:0 auto;padding:24px 28px 48px;background:#fff;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;padding-bottom:4px;border-bottom:2px solid #e4e8ee}
.sub{color:#5b6775;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{flex:1 1 96px;border:1px solid #e1e5eb;border-radius:8px;padding:8px 12px;background:#fafbfc}
.card b{display:block;font-size:20px}.card span{color:#5b6775;font-size:12px}
table{border-collapse:collapse;margin:6px 0 12px;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;border-bottom:1px solid #e6e9ee;text-align:right}
th{background:#f1f4f8;font-weight:600}td:first-child,th:first-child{text-align:left}
tr.avg td{color:#5b6775}table.errors td:last-child,table.errors th:last-child{text-align:left}
.plots{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}.plots figure{margin:0;flex:1 1 420px;max-width:560px}
.plots img{width:100%;height:auto;border:1px solid #e6e9ee;border-radius:6px}.plots table{flex:0 0 auto}
.warn{background:#fff6e0;border-left:4px solid #e0a800;padding:6px 10px;margin:6px 0}
.na{background:#fdecea;border-left:4px solid #c0392b;padding:8px 12px}
code{font-size:12px;background:#f1f4f8;padding:1px 4px;border-radius:3px;word-break:break-all}
.note{color:#5b6775;font-size:12px}
"""


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return html.escape(str(v))


def _threshold(v: float | None) -> str:
    """Enough digits to reuse: a threshold for sensitivity 0.99 may be 0.00051675 (4 decimals read 0.0005),
    and float32 scores lie 1e-7 apart (9 significant digits tell any two apart)."""
    return "—" if v is None else f"{v:.9g}"


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def _ci(pair: Any, pct: bool = True) -> str:
    if not pair or pair[0] is None:
        return ""
    f = _pct if pct else _fmt
    return f' <span class="note">[{f(pair[0])}, {f(pair[1])}]</span>'


def _table(header: list[str], body: list[list[str]], classes: list[str] | None = None, css: str = "") -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    rows = "".join(f'<tr{f" class={chr(34)}{c}{chr(34)}" if c else ""}>' + "".join(f"<td>{v}</td>" for v in r) + "</tr>"
                   for r, c in zip(body, classes or [""] * len(body)))
    return f"<table{f' class={chr(34)}{css}{chr(34)}' if css else ''}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _render_html(m: dict[str, Any], plots: dict[str, Path]) -> str:
    """One page, no external resources: CSS inline, plots as base64 data URIs."""
    model, counts = m["model"], m["counts"]
    title = f"Screening report — {model['model_id'] or 'unknown model'}"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<meta name='viewport' content='width=device-width,initial-scale=1'><style>{_CSS}</style></head><body><main>",
             f"<h1>{html.escape(title)}</h1>",
             f"<p class='sub'>model version <code>{_fmt(model['model_version'])}</code> · classes "
             f"{html.escape(', '.join(model['classes']))} · decision threshold <b>{model['threshold']:g}</b> on the pneumonia "
             f"score (p(not normal)) · scored {_fmt(model['scored_from'])} → {_fmt(model['scored_to'])} · "
             f"report {html.escape(m['generated_at'])} (cxr {html.escape(m['cxr_version'])})</p>"]
    cards = [("rows", counts["rows"]), ("scored", counts["scored"]), ("errors", counts["errors"]),
             ("labelled (in metrics)", counts["labelled"]), ("unlabelled", counts["unlabelled"])]
    if m["metrics_available"]:
        cards += [("ROC AUC", m["auc"]["value"]), ("sensitivity", m["at_model_threshold"]["sensitivity"]),
                  ("specificity", m["at_model_threshold"]["specificity"])]
    parts.append("<div class='cards'>" + "".join(f"<div class='card'><b>{_fmt(v)}</b><span>{k}</span></div>" for k, v in cards) + "</div>")
    parts += [f"<div class='warn'>{html.escape(w)}</div>" for w in m["warnings"]]
    if not m["metrics_available"]:
        parts.append(f"<p class='na'><b>Metrics unavailable.</b> {html.escape(m['reason'])}.</p>")
    else:
        parts.append(_html_metrics(m, plots))
    parts.append(_html_errors(m))
    parts.append("<p class='note'>All numbers are in <code>metrics.json</code> beside this page (NaN as null). Rows without a "
                 "true_label are excluded from the metrics; error rows are never scored.</p></main></body></html>")
    return "\n".join(parts)


def _img(plots: dict[str, Path], name: str, alt: str, width: int | None = None) -> str:
    """The plot inlined as a base64 data URI (the page must open offline, e.g. as an e-mail attachment)."""
    if name not in plots:
        return ""
    data = base64.b64encode(plots[name].read_bytes()).decode("ascii")
    style = f" style='flex:0 1 {width}px'" if width else ""
    return f"<figure{style}><img src='data:image/png;base64,{data}' alt='{html.escape(alt)}'></figure>"


def _html_metrics(m: dict[str, Any], plots: dict[str, Path]) -> str:
    parts: list[str] = []
    auc, at = m["auc"], m["at_model_threshold"]
    c = m["counts"]
    parts.append("<h2>Screening performance</h2>")
    parts.append(f"<p>{c['positives']:,} pneumonia and {c['negatives']:,} normal labelled rows. ROC AUC "
                 f"<b>{_fmt(auc['value'])}</b>{_ci(auc['ci95'], pct=False)} <span class='note'>(95% CI, {html.escape(auc['method'])})</span>"
                 f" · average precision <b>{_fmt((m['curves'].get('pr') or {}).get('average_precision'))}</b>"
                 f" · accuracy at the threshold (normal vs pneumonia) <b>{_fmt(at['accuracy'])}</b>"
                 + (f" · {len(m['classification']['labels'])}-class accuracy <b>{_fmt(m['classification']['accuracy'])}</b>"
                    if m["classification"]["level"] == "model_classes" else "") + "</p>")
    body, cls = [], []
    for name, p in [("model threshold", at)] + [(f"sensitivity ≥ {p['target_sensitivity']:g}", p) for p in m["operating_points"]]:
        body.append([name, _threshold(p["threshold"]), _pct(p["sensitivity"]) + _ci(p["sensitivity_ci95"]),
                     _pct(p["specificity"]) + _ci(p["specificity_ci95"]), _pct(p["precision"]), _fmt(p["f1"]),
                     _pct(p["flagged_fraction"]), f"{p['tp']:,} / {p['fp']:,} / {p['tn']:,} / {p['fn']:,}"])
        cls.append("" if name == "model threshold" else "avg")
    parts.append(_table(["operating point", "threshold", "sensitivity [95% CI]", "specificity [95% CI]", "precision (PPV)",
                         "F1", "flagged", "TP / FP / TN / FN"], body, cls))
    parts.append("<p class='note'>" + ("Thresholds for a target sensitivity are chosen on these same rows, so their "
                 "specificities are optimistic; confirm them on held-out data before changing the deployed threshold "
                 "(thresholds are shown to 9 significant digits, enough to reuse). " if m["operating_points"] else "")
                 + "Sensitivity and specificity intervals (Wilson) count images as independent; several films "
                 "of one patient make them somewhat too narrow.</p>")

    clf = m["classification"]
    level = "model classes" if clf["level"] == "model_classes" else "binary (non-normal predictions count as pneumonia)"
    parts.append(f"<h2>Per-class metrics</h2><p class='note'>Level: {level}. Predictions are the delivered <code>label</code> column.</p>")
    has_auc = any("auc_ovr" in clf["per_class"][k] for k in clf["labels"])
    body, cls = [], []
    for k, v in clf["per_class"].items():
        row = [html.escape(k), _fmt(v["precision"]), _fmt(v["recall"]), _fmt(v["f1"]), _fmt(v["support"])]
        if has_auc:
            row.append(_fmt(v.get("auc_ovr")))
        body.append(row)
        cls.append("avg" if k.endswith(" avg") else "")
    parts.append(_table(["class", "precision", "recall", "F1", "support"] + (["AUC (one-vs-rest)"] if has_auc else []), body, cls))
    cm = clf["confusion_matrix"]
    parts.append("<div class='plots'>" + _table(["true \\ predicted"] + [html.escape(x) for x in clf["labels"]],
                 [[html.escape(lab)] + [f"{v:,}" for v in row] for lab, row in zip(clf["labels"], cm)])
                 + _img(plots, "confusion", "confusion matrix", width=340) + "</div>")

    sub = m.get("subtypes")
    if sub:
        parts.append(f"<h2>Per-subtype breakdown</h2><p class='note'>Subtype from {html.escape(sub['source'])}. "
                     "Recall = share of the subtype flagged as pneumonia.</p>")
        targets = [f"{p['target_sensitivity']:g}" for p in m["operating_points"]]
        with_acc = any("subtype_accuracy" in g for g in sub["groups"].values())
        body = []
        for name, g in sub["groups"].items():
            if name == "normal":
                row = [name, _fmt(g["n"]), _fmt(g["mean_score"]), f"specificity {_pct(g['specificity'])}"] + [""] * len(targets)
            else:
                row = [name, _fmt(g["n"]), _fmt(g["mean_score"]), _pct(g["recall"]) + _ci(g["recall_ci95"])]
                row += [_pct(g["recall_at_targets"].get(t)) for t in targets]
            if with_acc:
                row.append(_pct(g.get("subtype_accuracy")) if "subtype_accuracy" in g else "")
            body.append(row)
        parts.append(_table(["subtype", "n", "mean score", f"recall at {m['model']['threshold']:g} [95% CI]"]
                            + [f"recall at sens ≥ {t}" for t in targets] + (["right subtype named"] if with_acc else []), body))

    parts.append("<h2>Curves</h2><div class='plots'>" + _img(plots, "roc", "ROC curve") + _img(plots, "pr", "precision-recall curve")
                 + "</div>")
    cal = m["calibration"]
    parts.append(f"<h2>Calibration and score distribution</h2><p>Brier score <b>{_fmt(cal['brier'], 4)}</b> · expected "
                 f"calibration error <b>{_fmt(cal['ece'], 4)}</b> <span class='note'>({cal['n_bins']} equal-width bins of the "
                 "pneumonia score)</span></p>")
    parts.append("<div class='plots'>" + _img(plots, "calibration", "reliability diagram")
                 + _img(plots, "score_hist", "score histogram by true class") + "</div>")
    summ = m.get("score_summary") or {}
    if summ:
        parts.append(_table(["true class", "n", "mean", "5%", "25%", "median", "75%", "95%"],
                            [[k, _fmt(v["n"])] + [_fmt(v[q]) for q in ("mean", "p05", "p25", "median", "p75", "p95")]
                             for k, v in summ.items()]))
    return "\n".join(parts)


def _html_errors(m: dict[str, Any]) -> str:
    err = m["errors"]
    if not err["by_code"]:
        return "<h2>Errors</h2><p>No error rows.</p>"
    body = []
    for code, e in err["by_code"].items():
        ex = "<br>".join(f"<code>{html.escape(x['path'])}</code>" + (f" — {html.escape(str(x['error']))}" if x["error"] else "")
                         for x in e["examples"])
        body.append([f"<code>{html.escape(code)}</code>", f"{e['count']:,}", ex])
    return (f"<h2>Errors</h2><p>{err['total']:,} rows could not be scored"
            f" ({m['counts']['errors_with_label']:,} of them labelled, left out of the metrics).</p>"
            + _table(["error code", "rows", "examples"], body, css="errors"))
