"""cxr.report: the numbers equal scikit-learn's on the same predictions, and the outputs are usable.

Synthetic screening results (no model, no Ray): realistic probabilities with ties, error
rows, unlabelled rows and Kermany-style file names that carry the pneumonia subtype.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import (average_precision_score, brier_score_loss, classification_report, confusion_matrix,
                             recall_score, roc_auc_score, roc_curve)

from cxr.errors import CxrError
from cxr.metrics import decide, pneumonia_score, threshold_for_sensitivity
from cxr.report import bootstrap_auc, calibration_bins, compute_metrics, wilson_interval, write_report

BINARY = ["normal", "pneumonia"]
SUBTYPE = ["normal", "bacteria", "virus"]


def make_results(classes: list[str], n_normal: int = 160, n_bacteria: int = 200, n_virus: int = 120,
                 n_unlabelled: int = 25, n_errors: int = 9, truth: str = "binary", threshold: float = 0.5,
                 seed: int = 0) -> pa.Table:
    """Screening output as the job writes it; ``truth``: 'binary' (normal/pneumonia) or 'subtype' names."""
    rng = np.random.default_rng(seed)
    subtypes = ["normal"] * n_normal + ["bacteria"] * n_bacteria + ["virus"] * n_virus
    subtypes += list(rng.choice(["normal", "bacteria", "virus"], size=n_unlabelled))
    n = len(subtypes)
    # pneumonia score: virus is harder to separate than bacteria; rounded so that ties occur
    a = np.array([{"normal": 2.0, "bacteria": 6.0, "virus": 3.5}[s] for s in subtypes])
    b = np.array([{"normal": 5.0, "bacteria": 2.0, "virus": 2.5}[s] for s in subtypes])
    score = np.round(rng.beta(a, b), 2)
    if classes == BINARY:
        probs = np.stack([1 - score, score], axis=1)
    else:  # split the pneumonia mass between bacteria and virus, leaning to the true subtype
        share = np.clip(rng.normal([{"normal": 0.5, "bacteria": 0.7, "virus": 0.35}[s] for s in subtypes], 0.15), 0, 1)
        probs = np.stack([1 - score, score * share, score * (1 - share)], axis=1)
    labels = decide(probs, classes, threshold)
    names, truths = [], []
    for i, s in enumerate(subtypes):
        if s == "normal":
            names.append(f"/archive/test/NORMAL/IM-{i:04d}-0001.jpeg")
        else:
            names.append(f"/archive/test/PNEUMONIA/person{i}_{s}_{i % 7}.jpeg")
        if i >= n_normal + n_bacteria + n_virus:
            truths.append(None)
        elif truth == "binary":
            truths.append("normal" if s == "normal" else "pneumonia")
        else:
            truths.append(s)
    codes = ["corrupt", "not_image", "empty", "corrupt", "truncated", "corrupt", "too_large", "empty", "corrupt"]
    err_codes: list[str | None] = [None] * n + [codes[k % len(codes)] for k in range(n_errors)]
    names += [f"/archive/bad/file {k}.jpeg" for k in range(n_errors)]
    # error rows may well carry a label (from the folder): they must still stay out of the metrics
    truths += ["pneumonia" if k % 2 else None for k in range(n_errors)]
    m = n + n_errors
    cols: dict[str, list] = {
        "path": names,
        "size_bytes": [int(x) for x in rng.integers(1000, 90_000, size=m)],
        "sha256": [f"{k:064x}" for k in range(m)],
        "width": [1024] * n + [None] * n_errors,
        "height": [1024] * n + [None] * n_errors,
    }
    for j, c in enumerate(classes):
        cols[f"prob_{c}"] = [float(x) for x in probs[:, j]] + [None] * n_errors
    cols.update({
        "label": labels + [None] * n_errors,
        "threshold": [threshold] * n + [None] * n_errors,
        "model_id": ["resnet50-abc123"] * m,
        "model_version": ["2024.11.1"] * m,
        "scored_at": [datetime(2024, 11, 23, 3, 0, k % 60, tzinfo=timezone.utc) for k in range(m)],
        "error_code": err_codes,
        "error": [None] * n + [f"cannot decode ({c})" for c in err_codes[n:]],
        "true_label": truths,
    })
    return pa.table(cols)


def labelled_arrays(table: pa.Table, classes: list[str]) -> tuple[np.ndarray, list[str], list[str], list[str]]:
    """(probs, true labels, predicted labels, paths) of the scored, labelled rows, the reference way."""
    rows = [r for r in table.to_pylist() if r["error_code"] is None and r["true_label"] is not None]
    probs = np.array([[r[f"prob_{c}"] for c in classes] for r in rows])
    return probs, [r["true_label"] for r in rows], [r["label"] for r in rows], [r["path"] for r in rows]


def strict_json(path: Path) -> dict:
    def no_constants(name: str) -> None:
        raise AssertionError(f"metrics.json holds {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href", "srcset", "data", "poster") and v is not None]


def test_the_score_of_a_confident_normal_keeps_its_digits() -> None:
    """1 - P(normal) in float32 is 0 for P(normal) = 1.0f: every such film tied, an AUC of 0.5 on an
    untrained model that sklearn on prob_pneumonia ranks at 0.68 (an operations review)."""
    probs = np.array([[1.0, 3e-9], [1.0, 2e-8], [0.25, 0.75]], dtype=np.float32)
    np.testing.assert_array_equal(pneumonia_score(probs, BINARY), probs[:, 1].astype(np.float64))
    subtype = np.array([[0.5, 0.2, 0.3]], dtype=np.float32)
    assert pneumonia_score(subtype, SUBTYPE)[0] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def binary_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, dict, Path]:
    table = make_results(BINARY)
    out = tmp_path_factory.mktemp("report")
    return table, write_report(table, out), out


def test_binary_numbers_equal_sklearn(binary_report: tuple[pa.Table, dict, Path]) -> None:
    table, m, _ = binary_report
    probs, truth, pred, _ = labelled_arrays(table, BINARY)
    y = np.array([t == "pneumonia" for t in truth])
    score = pneumonia_score(probs, BINARY)

    assert m["counts"] == {"rows": table.num_rows, "scored": 480 + 25, "errors": 9, "labelled": 480, "unlabelled": 25,
                           "errors_with_label": 4, "errors_with_pneumonia_label": 4, "unrecognised_label": 0,
                           "positives": 320, "negatives": 160}
    assert any("4 pneumonia-labelled files could not be scored" in w for w in m["warnings"])
    ref = classification_report(truth, pred, labels=BINARY, output_dict=True, zero_division=np.nan)
    clf = m["classification"]
    assert clf["level"] == "binary" and clf["labels"] == BINARY
    for k in BINARY + ["macro avg", "weighted avg"]:
        for metric in ("precision", "recall", "f1-score", "support"):
            assert m["classification"]["per_class"][k][metric.replace("-score", "")] == pytest.approx(ref[k][metric], abs=1e-12)
    assert clf["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
    assert clf["confusion_matrix"] == confusion_matrix(truth, pred, labels=BINARY).tolist()
    assert clf["per_class"]["pneumonia"]["auc_ovr"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-12)

    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    lo, hi = m["auc"]["ci95"]
    assert lo < m["auc"]["value"] < hi and hi - lo < 0.1
    at = m["at_model_threshold"]
    assert at["threshold"] == 0.5
    assert at["sensitivity"] == pytest.approx(recall_score(y, score >= 0.5), abs=1e-12)
    assert at["specificity"] == pytest.approx(recall_score(~y, score < 0.5), abs=1e-12)
    assert at["sensitivity"] == pytest.approx(ref["pneumonia"]["recall"])  # label column and threshold agree

    assert [p["target_sensitivity"] for p in m["operating_points"]] == [0.95, 0.98, 0.99]
    for p in m["operating_points"]:
        assert recall_score(y, score >= p["threshold"]) == pytest.approx(p["sensitivity"])
        assert p["sensitivity"] >= p["target_sensitivity"]
        assert p["specificity"] == pytest.approx(recall_score(~y, score < p["threshold"]))
        # the best such cut (it sits midway below the lowest kept positive): cutting above that positive loses the target
        higher = np.unique(score[score > p["threshold"]])
        assert higher.size < 2 or recall_score(y, score >= higher[1]) < p["target_sensitivity"]

    fpr, tpr, _ = roc_curve(y, score)
    assert np.allclose(m["curves"]["roc"]["fpr"], fpr) and np.allclose(m["curves"]["roc"]["tpr"], tpr)
    assert m["curves"]["pr"]["average_precision"] == pytest.approx(average_precision_score(y, score), abs=1e-12)
    cal = m["calibration"]
    assert cal["brier"] == pytest.approx(brier_score_loss(y, score), abs=1e-12)
    frac, mean = calibration_curve(y, score, n_bins=10, strategy="uniform")
    nonempty = [i for i, c in enumerate(cal["count"]) if c]
    assert np.allclose([cal["fraction_positive"][i] for i in nonempty], frac)
    assert np.allclose([cal["mean_predicted"][i] for i in nonempty], mean)
    counts = np.array([cal["count"][i] for i in nonempty])
    assert cal["ece"] == pytest.approx(float(np.sum(counts / y.size * np.abs(frac - mean))), abs=1e-12)


def test_subtype_breakdown_from_file_names(binary_report: tuple[pa.Table, dict, Path]) -> None:
    table, m, _ = binary_report
    probs, truth, _, paths = labelled_arrays(table, BINARY)
    score = pneumonia_score(probs, BINARY)
    groups = m["subtypes"]["groups"]
    assert set(groups) == {"bacteria", "virus", "normal"}
    for name, n in (("bacteria", 200), ("virus", 120)):
        mask = np.array([f"_{name}_" in p for p in paths])
        assert groups[name]["n"] == n == mask.sum()
        assert groups[name]["recall"] == pytest.approx(float((score[mask] >= 0.5).mean()))
        assert groups[name]["recall_ci95"][0] < groups[name]["recall"] < groups[name]["recall_ci95"][1]
    # the synthetic virus scores are lower: the report must show that the model misses virus first
    assert groups["virus"]["recall"] < groups["bacteria"]["recall"]
    assert groups["normal"]["specificity"] == pytest.approx(m["at_model_threshold"]["specificity"])


def test_errors_counted_with_examples(binary_report: tuple[pa.Table, dict, Path]) -> None:
    _, m, _ = binary_report
    by_code = m["errors"]["by_code"]
    assert {k: v["count"] for k, v in by_code.items()} == {"corrupt": 4, "empty": 2, "not_image": 1, "too_large": 1, "truncated": 1}
    assert list(by_code)[0] == "corrupt" and len(by_code["corrupt"]["examples"]) == 3
    assert by_code["empty"]["examples"][0] == {"path": "/archive/bad/file 2.jpeg", "error": "cannot decode (empty)"}


def test_files_exist_html_self_contained_json_strict(binary_report: tuple[pa.Table, dict, Path]) -> None:
    _, m, out = binary_report
    for name in ("roc", "pr", "calibration", "score_hist", "confusion"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert m["plots"][name] == png.name
    assert strict_json(out / "metrics.json") == m
    page = (out / "report.html").read_text(encoding="utf-8")
    parser = _Links()
    parser.feed(page)
    assert parser.refs and all(r.startswith(("data:", "#")) for r in parser.refs), parser.refs[:3]
    assert parser.tags.count("img") == 5 and "script" not in parser.tags and "link" not in parser.tags
    assert "url(" not in page and "@import" not in page
    for text in ("resnet50-abc123", "2024.11.1", "Per-subtype breakdown", "too_large", "/archive/bad/file 0.jpeg",
                 f"{m['auc']['value']:.3f}"):
        assert text in page


def test_bootstrap_equals_explicit_resamples() -> None:
    """The vectorised replicates are exactly roc_auc_score on the resampled rows (same draws)."""
    table = make_results(BINARY, n_normal=40, n_bacteria=30, n_virus=20, n_unlabelled=0, n_errors=0, seed=3)
    probs, truth, _, _ = labelled_arrays(table, BINARY)
    y = np.array([t == "pneumonia" for t in truth])
    score = pneumonia_score(probs, BINARY)
    pos, neg = score[y], np.sort(score[~y])
    fast = bootstrap_auc(y, score, n_resamples=30, seed=7, chunk_elems=7 * 50)  # chunks of 7 resamples
    rng = np.random.default_rng(7)
    slow = []
    for start in range(0, 30, 7):
        b = min(7, 30 - start)
        ip, ineg = rng.integers(0, pos.size, (b, pos.size)), rng.integers(0, neg.size, (b, neg.size))
        for k in range(b):
            s = np.concatenate([pos[ip[k]], neg[ineg[k]]])
            slow.append(roc_auc_score(np.r_[np.ones(pos.size), np.zeros(neg.size)], s))
    assert np.allclose(fast, slow, atol=1e-12)


def test_bootstrap_over_patients_is_not_fooled_by_repeated_films() -> None:
    """Three films per patient are not three times the evidence: resampling images narrows the interval,
    resampling patients keeps the width of one film per patient (a statistics review)."""
    rng = np.random.default_rng(1)
    y1 = rng.random(200) < 0.5
    s1 = np.clip(rng.normal(0.4 + 0.2 * y1, 0.2), 0, 1)
    y3, s3, who = np.repeat(y1, 3), np.repeat(s1, 3), np.repeat(np.arange(200), 3)

    def width(a: np.ndarray) -> float:
        return float(np.percentile(a, 97.5) - np.percentile(a, 2.5))

    once = width(bootstrap_auc(y1, s1))
    assert width(bootstrap_auc(y3, s3)) < 0.75 * once  # images as units: overconfident
    assert abs(width(bootstrap_auc(y3, s3, groups=who)) - once) < 0.15 * once
    # one group per image is the image-level bootstrap itself, draw for draw
    assert np.array_equal(bootstrap_auc(y1, s1, groups=[f"p{i}" for i in range(200)]), bootstrap_auc(y1, s1))


def test_report_resamples_patients_named_by_kermany_file_names(tmp_path: Path) -> None:
    table = make_results(BINARY, n_normal=30, n_bacteria=20, n_virus=10, n_unlabelled=0, n_errors=0, seed=5)
    m = write_report(table, tmp_path)
    assert m["auc"]["resampled"] == "images"  # make_results names no patient twice
    paths = table.column("path").to_pylist()
    films = [f"/a/{'NORMAL' if 'NORMAL' in p else 'PNEUMONIA'}/person{k // 2}_bacteria_{k}.jpeg"
             if "NORMAL" not in p else f"/a/NORMAL/IM-{k // 2:04d}-000{k % 2}.jpeg" for k, p in enumerate(paths)]
    m2 = write_report(table.set_column(table.schema.get_field_index("path"), "path", pa.array(films)), tmp_path / "b")
    assert m2["auc"]["resampled"] == "patients" and "patients (30 for 60 images)" in m2["auc"]["method"]
    assert m2["auc"]["value"] == m["auc"]["value"] and m2["auc"]["ci95"] != m["auc"]["ci95"]
    # an OsiriX/Horos export names every study's first film IM-0001-0001: one folder per study, not one patient
    studies = [f"/pacs/study{k}/IM-0001-0001.dcm" for k in range(len(paths))]
    m3 = write_report(table.set_column(table.schema.get_field_index("path"), "path", pa.array(studies)), tmp_path / "c")
    assert m3["auc"]["resampled"] == "images" and m3["auc"]["ci95"] == m["auc"]["ci95"]


def test_three_class_scores_just_over_one_and_degenerate_intervals(tmp_path: Path) -> None:
    """float32 probabilities of three classes can sum to 1.0000001: scikit-learn's Brier score refused
    that and the report (and the end of a screening run) crashed. A perfect separation has no interval."""
    probs = np.array([[1e-8, 0.3427021, 0.6572980], [0.9, 0.05, 0.05]], dtype=np.float32)
    assert probs[0, 1:].astype(np.float64).sum() > 1.0 and pneumonia_score(probs, SUBTYPE)[0] == 1.0
    table = make_results(SUBTYPE, n_normal=8, n_bacteria=6, n_virus=6, n_unlabelled=0, n_errors=0, truth="subtype")
    cols = {c: table.column(f"prob_{c}").to_numpy().copy() for c in SUBTYPE}
    sick = np.array([t != "normal" for t in table.column("true_label").to_pylist()])
    cols["normal"][sick], cols["bacteria"][sick], cols["virus"][sick] = 1e-8, 0.3427021, 0.6572980
    cols["normal"][~sick], cols["bacteria"][~sick], cols["virus"][~sick] = 0.9, 0.05, 0.05
    for c, v in cols.items():
        table = table.set_column(table.schema.get_field_index(f"prob_{c}"), f"prob_{c}", pa.array(v, pa.float32()))
    m = write_report(table, tmp_path)
    assert m["auc"]["value"] == 1.0 and m["auc"]["ci95"] == [None, None] and m["calibration"]["brier"] >= 0
    assert any("not estimable" in w for w in m["warnings"]) and any("only 8 negatives" in w for w in m["warnings"])
    page = (tmp_path / "report.html").read_text()
    assert "3-class accuracy" in page and "accuracy at the threshold" in page


def test_a_threshold_between_adjacent_floats_keeps_the_negative_out() -> None:
    """The midpoint of two adjacent doubles rounds to the lower one: the negative just below the cut
    would be flagged and specificity lost."""
    below = np.nextafter(0.3, 0)
    t = threshold_for_sensitivity(np.array([1, 0, 0]), np.array([0.3, below, 0.1]), 0.95)
    assert below < t <= 0.3


def test_bootstrap_is_fast_and_seeded() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(10_000) < 0.6
    score = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    t0 = time.perf_counter()
    a = bootstrap_auc(y, score)
    assert time.perf_counter() - t0 < 10.0  # ~0.5 s idle; generous for a shared 2-core box
    assert np.array_equal(a, bootstrap_auc(y, score)) and a.shape == (1000,)
    auc = roc_auc_score(y, score)
    assert abs(a.mean() - auc) < 0.005 and 0.001 < a.std() < 0.01


def test_subtype_model_three_classes(tmp_path: Path) -> None:
    table = make_results(SUBTYPE, truth="subtype", threshold=0.4, seed=1)
    m = write_report(table, tmp_path)
    probs, truth, pred, _ = labelled_arrays(table, SUBTYPE)
    clf = m["classification"]
    assert clf["level"] == "model_classes" and clf["labels"] == SUBTYPE
    ref = classification_report(truth, pred, labels=SUBTYPE, output_dict=True, zero_division=np.nan)
    for k in SUBTYPE + ["macro avg", "weighted avg"]:
        for metric in ("precision", "recall", "f1-score", "support"):
            assert clf["per_class"][k][metric.replace("-score", "")] == pytest.approx(ref[k][metric], abs=1e-12)
    assert clf["accuracy"] == pytest.approx(ref["accuracy"])
    assert clf["confusion_matrix"] == confusion_matrix(truth, pred, labels=SUBTYPE).tolist()
    for j, c in enumerate(SUBTYPE):
        assert clf["per_class"][c]["auc_ovr"] == pytest.approx(roc_auc_score(np.array(truth) == c, probs[:, j]))
    y = np.array([t != "normal" for t in truth])
    score = pneumonia_score(probs, SUBTYPE)
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(y, score))
    assert m["at_model_threshold"]["threshold"] == 0.4
    assert m["at_model_threshold"]["sensitivity"] == pytest.approx(recall_score(y, score >= 0.4))
    assert m["calibration"]["brier"] == pytest.approx(brier_score_loss(y, score))
    g = m["subtypes"]["groups"]
    for name in ("bacteria", "virus"):
        mask = np.array(truth) == name
        assert g[name]["recall"] == pytest.approx(float((score[mask] >= 0.4).mean()))
        assert g[name]["subtype_accuracy"] == pytest.approx(ref[name]["recall"])
    assert strict_json(tmp_path / "metrics.json") == m
    assert (tmp_path / "confusion.png").is_file()


def test_subtype_model_with_binary_truth_collapses(tmp_path: Path) -> None:
    table = make_results(SUBTYPE, truth="binary", seed=2)
    m = write_report(table, tmp_path)
    _, truth, pred, _ = labelled_arrays(table, SUBTYPE)
    collapsed = ["normal" if p == "normal" else "pneumonia" for p in pred]
    assert m["classification"]["level"] == "binary"
    assert m["classification"]["confusion_matrix"] == confusion_matrix(truth, collapsed, labels=BINARY).tolist()
    assert set(m["subtypes"]["groups"]) == {"bacteria", "virus", "normal"}


def test_no_labels_reports_counts_and_errors(tmp_path: Path) -> None:
    table = make_results(BINARY, n_normal=0, n_bacteria=0, n_virus=0, n_unlabelled=30, n_errors=5)
    table = table.set_column(table.schema.get_field_index("true_label"), "true_label", pa.nulls(table.num_rows, pa.string()))
    m = write_report(table, tmp_path)
    assert m["metrics_available"] is False and "no scored row has a true_label" in m["reason"]
    assert m["counts"]["scored"] == 30 and m["counts"]["unlabelled"] == 30 and m["counts"]["errors"] == 5
    assert sum(e["count"] for e in m["errors"]["by_code"].values()) == 5
    assert strict_json(tmp_path / "metrics.json") == m
    page = (tmp_path / "report.html").read_text()
    assert "Metrics unavailable" in page and "not_image" in page
    assert not list(tmp_path.glob("*.png"))


def test_degenerate_inputs_do_not_crash(tmp_path: Path) -> None:
    # only one true class: per-class table still works, AUC and operating points are undefined (null)
    one = make_results(BINARY, n_normal=0, n_bacteria=20, n_virus=5, n_unlabelled=0, n_errors=0)
    m = write_report(one, tmp_path / "one")
    assert m["auc"]["value"] is None and m["auc"]["ci95"] == [None, None] and m["operating_points"] == []
    assert m["classification"]["per_class"]["normal"]["recall"] is None
    assert any("all pneumonia" in w for w in m["warnings"])
    strict_json(tmp_path / "one" / "metrics.json")
    # an empty table and an all-error table
    empty = make_results(BINARY).slice(0, 0)
    assert write_report(empty, tmp_path / "empty")["counts"]["rows"] == 0
    errors = make_results(BINARY).slice(505)
    write_report(make_results(BINARY, n_errors=0), tmp_path / "errors")  # then rerun into the same folder
    m = write_report(errors, tmp_path / "errors")
    assert m["counts"]["errors"] == 9 and m["metrics_available"] is False
    assert not list((tmp_path / "errors").glob("*.png"))  # no stale plots from the earlier run
    with pytest.raises(CxrError, match="prob_normal"):
        write_report(one.drop_columns(["prob_normal"]), tmp_path / "bad")


def test_undefined_ratios_match_sklearn_zero_division_nan() -> None:
    """A class never predicted (precision undefined) or never true (recall undefined): NaN, averaged like sklearn."""
    from cxr.report import per_class_table

    truth = ["normal"] * 5 + ["bacteria"] * 4 + ["virus"] * 3
    pred = ["normal"] * 4 + ["bacteria"] * 6 + ["normal"] * 2
    for labels in (SUBTYPE, ["normal", "bacteria", "virus", "fungus"]):
        table, cm = per_class_table(truth, pred, labels)
        ref = classification_report(truth, pred, labels=labels, output_dict=True, zero_division=np.nan)
        for k in labels + ["macro avg", "weighted avg"]:
            for metric in ("precision", "recall", "f1-score"):
                got, want = table[k][metric.replace("-score", "")], ref[k][metric]
                assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want), (k, metric, got, want)
        assert cm.tolist() == confusion_matrix(truth, pred, labels=labels).tolist()


def test_delivered_label_mismatch_is_warned() -> None:
    table = make_results(BINARY, n_unlabelled=0, n_errors=0)
    labels = table.column("label").to_pylist()
    labels[0] = "pneumonia" if labels[0] == "normal" else "normal"
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    m = compute_metrics(table)
    assert any("1 labelled rows have a label that differs" in w for w in m["warnings"])


def test_small_helpers() -> None:
    assert wilson_interval(0, 10)[0] == 0.0 and 0.25 < wilson_interval(0, 10)[1] < 0.35
    assert all(wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0 for n in range(1, 300))  # no 1e-17
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(1 - hi) and 0.40 < lo < 0.41
    cal = calibration_bins(np.array([0, 1, 1]), np.array([0.1, 0.1, 1.0]))
    assert cal["count"][0] == 2 and cal["count"][-1] == 1  # 0.1 falls in the first bin, as in sklearn
    assert cal["ece"] == pytest.approx(2 / 3 * abs(0.5 - 0.1))
