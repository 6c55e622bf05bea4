"""Classification metrics against hand-computed values, scikit-learn and the definitions they implement."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, confusion_matrix, roc_auc_score, roc_curve

from medtransfer.metrics import (
    UndefinedMetricWarning,
    apply_temperature,
    average_precision,
    binary_auc,
    binary_metrics_at,
    bootstrap_ci,
    choose_threshold,
    delong_ci,
    delong_test,
    evaluate_classification,
    expected_calibration_error,
    fit_temperature,
    multiclass_metrics,
    paired_bootstrap_auc_diff,
    reliability_curve,
    roc_auc,
    roc_points,
)


# ------------------------------------------------------------------------------------------------ AUC
def test_binary_auc_hand_computed_four_samples():
    # y = [0, 0, 1, 1], p = [0.1, 0.4, 0.35, 0.8]: 2 positives x 2 negatives = 4 pairs.
    # (0.35 > 0.1) yes, (0.35 > 0.4) no, (0.8 > 0.1) yes, (0.8 > 0.4) yes  ->  AUC = 3/4.
    y, p = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert roc_auc(y, p, "binary") == pytest.approx(0.75, abs=1e-12)
    assert roc_auc(y, p, "binary") == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    # (N, 2) probabilities: the last column is the positive class.
    p2 = np.column_stack([1 - np.asarray(p), p])
    assert roc_auc(np.array(y)[:, None], p2, "binary") == pytest.approx(0.75, abs=1e-12)


def test_binary_auc_ties_count_half():
    # 1 positive, 2 negatives: (0.5 vs 0.5) tie = 1/2, (0.5 > 0.2) = 1  ->  AUC = 1.5 / 2 = 0.75.
    assert roc_auc([0, 1, 0], [0.5, 0.5, 0.2], "binary") == pytest.approx(0.75, abs=1e-12)
    rng = np.random.default_rng(3)
    y, s = rng.integers(0, 2, 300), rng.integers(0, 5, 300) / 4.0  # many ties
    assert binary_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_roc_points_match_sklearn_roc_curve():
    rng = np.random.default_rng(11)
    y, s = rng.integers(0, 2, 200), np.round(rng.random(200), 2)  # ties
    for ours, ref in zip(roc_points(y, s), roc_curve(y, s, drop_intermediate=False)):
        np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_single_class_gives_nan_with_warning_not_crash():
    with pytest.warns(UndefinedMetricWarning, match="only one class"):
        assert math.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9], "binary"))
    with pytest.warns(UndefinedMetricWarning, match="no positive"):
        assert math.isnan(average_precision([0, 0, 0], [0.2, 0.5, 0.9], "binary"))
    with pytest.warns(UndefinedMetricWarning):
        assert math.isnan(choose_threshold([0, 0], [0.1, 0.2]))


def test_multiclass_auc_is_exactly_medmnist_macro_ovr():
    rng = np.random.default_rng(42)
    n, c = 120, 4
    y = rng.integers(0, c, (n, 1))  # MedMNIST labels are (N, 1)
    logits = rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y[:, 0]]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    # MedMNIST's getAUC, multi-class branch, written out independently.
    expected = 0.0
    for i in range(prob.shape[1]):
        y_true_binary = (y == i).astype(float)
        expected += roc_auc_score(y_true_binary, prob[:, i])
    expected /= prob.shape[1]
    assert roc_auc(y, prob, "multiclass") == pytest.approx(expected, abs=1e-12)
    assert roc_auc(y, prob, "multiclass") == pytest.approx(
        roc_auc_score(y[:, 0], prob, multi_class="ovr", average="macro"), abs=1e-12)
    per = roc_auc(y, prob, "multiclass", average=None)
    assert per.shape == (c,)
    assert per[2] == pytest.approx(roc_auc_score(y[:, 0] == 2, prob[:, 2]), abs=1e-12)


def test_multiclass_absent_class_is_nan_and_left_out_of_macro():
    y = np.array([0, 0, 1, 1, 0, 1])  # class 2 never occurs
    prob = np.array([[.7, .2, .1], [.6, .3, .1], [.2, .7, .1], [.4, .5, .1], [.3, .4, .3], [.5, .4, .1]])
    with pytest.warns(UndefinedMetricWarning, match=r"class\(es\) \[2\]"):
        per = roc_auc(y, prob, "multiclass", average=None)
    assert math.isnan(per[2])
    with pytest.warns(UndefinedMetricWarning):
        macro = roc_auc(y, prob, "multiclass")
    assert macro == pytest.approx((per[0] + per[1]) / 2, abs=1e-12)


def test_multilabel_masks_missing_labels_per_class():
    y = np.array([[1, 0], [0, np.nan], [1, 1], [0, -1], [np.nan, 0], [0, 1]], dtype=float)
    p = np.array([[.9, .2], [.3, .9], [.6, .8], [.7, .1], [.1, .4], [.2, .3]])
    # class 0 annotated rows 0,1,2,3,5: y=[1,0,1,0,0], p=[.9,.3,.6,.7,.2]
    #   positives .9 and .6 vs negatives .3,.7,.2: .9 beats 3, .6 beats 2 -> 5/6
    # class 1 annotated rows 0,2,4,5: y=[0,1,0,1], p=[.2,.8,.4,.3]
    #   positives .8, .3 vs negatives .2, .4: .8 beats 2, .3 beats 1 -> 3/4
    per = roc_auc(y, p, "multilabel", average=None)
    np.testing.assert_allclose(per, [5 / 6, 3 / 4], atol=1e-12)
    assert roc_auc(y, p, "multilabel") == pytest.approx((5 / 6 + 3 / 4) / 2, abs=1e-12)
    ap = average_precision(y, p, "multilabel", average=None)
    assert ap[0] == pytest.approx(average_precision_score([1, 0, 1, 0, 0], [.9, .3, .6, .7, .2]), abs=1e-12)
    y_one = y.copy()
    y_one[:, 1] = [0, np.nan, 0, -1, 0, 0]  # class 1 has no positive among annotated rows
    with pytest.warns(UndefinedMetricWarning):
        assert roc_auc(y_one, p, "multilabel") == pytest.approx(5 / 6, abs=1e-12)


def test_unknown_task_suggests_the_right_one():
    with pytest.raises(ValueError, match="Did you mean 'multiclass'"):
        roc_auc([0, 1], [0.1, 0.9], "multiclas")


# ------------------------------------------------------------------------------------- operating point
# 4 negatives, 3 positives. Positive iff p >= t.
Y7 = np.array([0, 0, 0, 0, 1, 1, 1])
P7 = np.array([0.1, 0.2, 0.3, 0.6, 0.5, 0.8, 0.9])


def test_choose_threshold_hand_computed():
    # t=0.8: sens 2/3, spec 4/4 -> J = 0.667;  t=0.5: sens 3/3, spec 3/4 -> J = 0.75 (best);
    # t=0.6: sens 2/3, spec 3/4 -> 0.417.
    assert choose_threshold(Y7, P7, "youden") == 0.5
    # highest threshold with sensitivity >= 0.6 is 0.8 (sens 2/3); >= 1.0 needs 0.5.
    assert choose_threshold(Y7, P7, "sensitivity", target=0.6) == 0.8
    assert choose_threshold(Y7, P7, "sensitivity", target=1.0) == 0.5
    # lowest threshold with specificity 1.0 is 0.8 (0.6 would call a negative positive).
    assert choose_threshold(Y7, P7, "specificity", target=1.0) == 0.8
    # specificity 0.75 allows one false positive: 0.5 (sens 1.0).
    assert choose_threshold(Y7, P7, "specificity", target=0.75) == 0.5
    with pytest.raises(ValueError, match="target"):
        choose_threshold(Y7, P7, "sensitivity")
    with pytest.raises(ValueError, match="Did you mean 'youden'"):
        choose_threshold(Y7, P7, "yuoden")


def test_binary_metrics_at_hand_counts():
    m = binary_metrics_at(Y7, P7, 0.5)
    # predicted positive: 0.6 (neg), 0.5, 0.8, 0.9 (pos) -> TP 3, FP 1, TN 3, FN 0
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (3, 1, 3, 0, 7)
    assert m["confusion_matrix"] == confusion_matrix(Y7, (P7 >= 0.5).astype(int)).tolist() == [[3, 1], [0, 3]]
    assert m["sensitivity"] == 1.0
    assert m["specificity"] == 0.75
    assert m["ppv"] == 0.75
    assert m["npv"] == 1.0
    assert m["f1"] == pytest.approx(6 / 7)
    assert m["balanced_accuracy"] == pytest.approx(0.875)
    assert m["accuracy"] == pytest.approx(6 / 7)
    assert math.isnan(binary_metrics_at([0, 0], [0.1, 0.2], 0.5)["sensitivity"])  # 0/0


def test_multiclass_metrics_match_sklearn():
    y = np.array([0, 1, 2, 2, 1, 0, 2])
    prob = np.eye(3)[[0, 2, 2, 1, 1, 0, 2]] * 0.8 + 0.2 / 3
    m = multiclass_metrics(y, prob)
    assert m["confusion_matrix"] == confusion_matrix(y, prob.argmax(1)).tolist()
    assert m["accuracy"] == pytest.approx(5 / 7)
    # recalls: class0 2/2, class1 1/2, class2 2/3
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 2 / 3) / 3)


# ------------------------------------------------------------------------------------------ calibration
def test_ece_and_reliability_hand_computed():
    # 10 bins; p = .05 (bin 0, y=0), .35 (bin 3, y=0), .65 (bin 6, y=1), .95 (bin 9, y=1)
    # ECE = 1/4 * (|0-.05| + |0-.35| + |1-.65| + |1-.95|) = 0.8 / 4 = 0.2
    y, p = [0, 0, 1, 1], [0.05, 0.35, 0.65, 0.95]
    assert expected_calibration_error(y, p) == pytest.approx(0.2, abs=1e-12)
    rc = reliability_curve(y, p, n_bins=10)
    assert rc["count"].tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 0, 1]
    assert rc["frequency"][6] == 1.0 and math.isnan(rc["frequency"][1])
    # p = 1.0 falls in the last bin, not outside
    assert reliability_curve([1], [1.0], n_bins=10)["count"][-1] == 1
    # multiclass: top-label confidence; both cases in bin 7 (conf .7 and .75, mean .725), 1 of 2 correct
    # -> ECE = |0.5 - 0.725| = 0.225
    prob = np.array([[.7, .2, .1], [.15, .1, .75]])
    assert expected_calibration_error([0, 0], prob, task="multiclass") == pytest.approx(0.225, abs=1e-12)


def test_fit_temperature_recovers_known_overconfidence_binary():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-z))).astype(int)  # z is the calibrated logit
    t = fit_temperature(3.0 * z, y)  # a model three times overconfident
    assert t == pytest.approx(3.0, rel=0.1)
    # the fitted T minimises the NLL (checked on a grid, independently of L-BFGS)
    grid = np.linspace(1.5, 4.5, 301)
    nll = [np.mean(np.logaddexp(0, 3 * z / g) - y * 3 * z / g) for g in grid]
    assert t == pytest.approx(grid[int(np.argmin(nll))], abs=0.02)
    p_cal = apply_temperature(3.0 * z, t)
    assert expected_calibration_error(y, p_cal) < expected_calibration_error(y, 1 / (1 + np.exp(-3 * z)))


def test_fit_temperature_multiclass():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.0, (3000, 3))
    pz = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in pz])
    t = fit_temperature(2.0 * z, y)
    assert t == pytest.approx(2.0, rel=0.12)
    np.testing.assert_allclose(apply_temperature(2.0 * z, 2.0), pz, atol=1e-12)


# -------------------------------------------------------------------------------------------- bootstrap
def _binormal(seed: int, n_pos: int, n_neg: int, shift: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    return y, np.r_[rng.normal(shift, 1, n_pos), rng.normal(0, 1, n_neg)]


def test_bootstrap_ci_width_matches_delong_and_hanley_mcneil():
    n_pos, n_neg = 400, 600
    y, s = _binormal(0, n_pos, n_neg)
    point, low, high, n_images, n_groups = bootstrap_ci(roc_auc, y, s, n_boot=1000, seed=0)
    assert (n_images, n_groups) == (1000, None)
    assert point == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert low < point < high
    auc, _, _, se_delong = delong_ci(y, s)
    # Hanley & McNeil (1982) standard error
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    se_hm = math.sqrt((auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg))
    width = high - low
    assert width == pytest.approx(2 * 1.96 * se_delong, rel=0.10)
    assert width == pytest.approx(2 * 1.96 * se_hm, rel=0.15)


def test_grouped_bootstrap_with_duplicated_images_is_wider():
    y0, s0 = _binormal(1, 80, 120)
    # every patient contributes 5 identical images: resampling images pretends there are 1000 cases
    y, s = np.repeat(y0, 5), np.repeat(s0, 5)
    patients = np.repeat([f"P{i:03d}" for i in range(200)], 5)
    img = bootstrap_ci(roc_auc, y, s, n_boot=500, seed=0)
    grp = bootstrap_ci(roc_auc, y, s, groups=patients, n_boot=500, seed=0)
    ref = bootstrap_ci(roc_auc, y0, s0, n_boot=500, seed=0)  # one image per patient
    assert (grp.n_images, grp.n_groups, grp.resampled) == (1000, 200, "groups")
    assert grp.point == img.point == pytest.approx(ref.point, abs=1e-12)
    w_img, w_grp, w_ref = img.high - img.low, grp.high - grp.low, ref.high - ref.low
    assert w_grp > 1.8 * w_img  # about sqrt(5) = 2.24 wider
    assert w_grp == pytest.approx(w_ref, rel=0.2)


def test_bootstrap_skips_and_counts_single_class_resamples():
    y = np.r_[np.zeros(9, int), 1]
    s = np.linspace(0, 1, 10)
    with pytest.warns(UndefinedMetricWarning, match="skipped"):
        ci = bootstrap_ci(roc_auc, y, s, n_boot=400, seed=0)
    # P(a resample of 10 holds no positive) = 0.9**10 = 0.349
    expected, sd = 400 * 0.9**10, math.sqrt(400 * 0.9**10 * (1 - 0.9**10))
    assert abs(ci.n_skipped - expected) < 4 * sd
    assert ci.point == 1.0 and ci.high == 1.0


def test_counted_auc_equals_auc_of_the_expanded_resample_with_ties():
    from medtransfer.metrics.stats import CountedAUC

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.random(300), 1)  # 11 distinct scores: ties everywhere
    counted = CountedAUC(y, s)
    for _ in range(20):
        counts = np.bincount(rng.integers(0, 300, 300), minlength=300)
        idx = np.repeat(np.arange(300), counts)
        assert counted(counts) == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)
    assert math.isnan(counted(np.where(y == 1, 0, 1)))  # no positive drawn
    rows = np.flatnonzero(rng.random(300) < 0.5)  # a subset of a longer count vector (multilabel mask)
    sub = CountedAUC(y[rows], s[rows], rows)
    counts = np.bincount(rng.integers(0, 300, 300), minlength=300)
    idx = np.repeat(rows, counts[rows])
    assert sub(counts) == pytest.approx(roc_auc_score(y[idx], s[idx]), abs=1e-12)


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_counted_bootstrap_gives_the_resampling_bootstrap_interval(task, monkeypatch):
    """The fast path (draw counts) and building every resample give the same CIs, patients or images."""
    from medtransfer.metrics import stats

    rng = np.random.default_rng(4)
    n, k = 240, {"binary": 2, "multiclass": 4, "multilabel": 3}[task]
    if task == "multilabel":
        y = (rng.random((n, k)) < 0.3).astype(float)
        y[rng.random((n, k)) < 0.1] = np.nan
        p = np.round(rng.random((n, k)), 2)
    else:
        y = rng.integers(0, k, n)
        p = np.round(rng.dirichlet(np.ones(k), n), 2)
    kw = dict(task=task, label_names=[str(i) for i in range(k)], patient_ids=[f"p{i // 3}" for i in range(n)],
              threshold=None if task == "multiclass" else 0.4, n_boot=150)
    fast = evaluate_classification(y, p, **kw)
    original = stats._bootstrap_values
    monkeypatch.setattr(stats, "_bootstrap_values",
                        lambda fn, arrays, groups, n_boot, seed, counted=None: original(fn, arrays, groups, n_boot, seed))
    slow = evaluate_classification(y, p, **kw)
    assert fast["auc"]["ci_low"] == pytest.approx(slow["auc"]["ci_low"], abs=1e-12)
    assert fast["auc"]["ci_high"] == pytest.approx(slow["auc"]["ci_high"], abs=1e-12)
    assert fast["auc"]["ci_low"] < fast["auc"]["value"] < fast["auc"]["ci_high"]
    if task == "binary":
        for key in ("sensitivity_ci", "specificity_ci"):
            assert fast["operating_point"][key] == pytest.approx(slow["operating_point"][key], abs=1e-12)


# ---------------------------------------------------------------------------------------- DeLong
def _delong_reference(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """DeLong et al. (1988) with the O(m*n) placement values, written from the paper (diff, z)."""
    def psi(x, yy):
        return (x > yy) + 0.5 * (x == yy)

    pos, neg = y == 1, y == 0
    v10, v01 = [], []
    for s in (a, b):
        kern = psi(s[pos][:, None], s[neg][None, :])
        v10.append(kern.mean(axis=1))  # one per positive
        v01.append(kern.mean(axis=0))  # one per negative
    aucs = [v.mean() for v in v10]
    s10, s01 = np.cov(np.vstack(v10)), np.cov(np.vstack(v01))
    cov = s10 / pos.sum() + s01 / neg.sum()
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return aucs[0] - aucs[1], (aucs[0] - aucs[1]) / math.sqrt(var)


def test_delong_identical_predictors():
    y, s = _binormal(2, 30, 40)
    r = delong_test(y, s, s)
    assert r.diff == 0.0 and r.p_value == 1.0 and r.z == 0.0
    assert r.auc_a == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_delong_matches_reference_and_paired_bootstrap():
    rng = np.random.default_rng(5)
    y, s = _binormal(5, 120, 180)
    a = s + rng.normal(0, 0.5, s.size)
    b = s + rng.normal(0, 1.2, s.size)
    b[::7] = np.round(b[::7], 1)  # some ties
    r = delong_test(y, a, b)
    diff, z = _delong_reference(y, a, b)
    assert r.diff == pytest.approx(diff, abs=1e-12)
    assert r.z == pytest.approx(z, rel=1e-9)
    assert r.p_value == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)
    assert r.ci_low < r.diff < r.ci_high
    boot = paired_bootstrap_auc_diff(y, a, b, n_boot=1000, seed=0)
    assert boot.diff == pytest.approx(r.diff, abs=1e-12)
    assert boot.ci_low == pytest.approx(r.ci_low, abs=0.02)
    assert boot.ci_high == pytest.approx(r.ci_high, abs=0.02)
    assert (boot.p_value < 0.05) == (r.p_value < 0.05)
    same = paired_bootstrap_auc_diff(y, a, a, n_boot=100)
    assert (same.diff, same.ci_low, same.ci_high, same.p_value) == (0.0, 0.0, 0.0, 1.0)


# ------------------------------------------------------------------------------------------- summary
def test_evaluate_classification_binary_is_json_and_consistent():
    y, s = _binormal(7, 60, 90)
    ids = [f"p{i // 3}" for i in range(150)]
    out = evaluate_classification(y, s, task="binary", label_names=["normal", "pneumonia"], patient_ids=ids,
                                  threshold=0.5, n_boot=200, seed=0)
    json.dumps(out, allow_nan=False)
    assert out["n"] == 150 and out["n_patients"] == 50
    assert out["n_positive"] == 60 and out["n_negative"] == 90
    assert out["auc"]["value"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert out["auc"]["ci_low"] < out["auc"]["value"] < out["auc"]["ci_high"]
    assert out["auc"]["resampled"] == "patients"
    assert out["average_precision"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    op = out["operating_point"]
    assert op["threshold"] == 0.5 and op["tp"] == int(np.sum((s >= 0.5) & (y == 1)))
    lo, hi = op["sensitivity_ci"]
    assert lo <= op["sensitivity"] <= hi


def test_evaluate_classification_nan_becomes_none():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        out = evaluate_classification([1, 1, 1], [0.2, 0.4, 0.9], task="binary", label_names=["a", "b"],
                                      threshold=0.5, n_boot=50)
    assert out["auc"]["value"] is None and out["average_precision"] is not None
    assert out["operating_point"]["specificity"] is None
    json.dumps(out, allow_nan=False)


def test_evaluate_classification_multiclass():
    rng = np.random.default_rng(9)
    y = rng.integers(0, 3, 90)
    prob = rng.dirichlet([1, 1, 1], 90) * 0.5 + np.eye(3)[y] * 0.5
    out = evaluate_classification(y, prob, task="multiclass", label_names=["a", "b", "c"], n_boot=100)
    json.dumps(out, allow_nan=False)
    assert out["auc"]["value"] == pytest.approx(roc_auc_score(y, prob, multi_class="ovr"), abs=1e-12)
    assert out["confusion_matrix"] == confusion_matrix(y, prob.argmax(1)).tolist()
    assert out["per_class"]["b"]["auc"] == pytest.approx(roc_auc_score(y == 1, prob[:, 1]), abs=1e-12)
    assert out["per_class"]["c"]["n_positive"] == int(np.sum(y == 2))
    assert out["n_patients"] is None and out["auc"]["resampled"] == "images"


def test_ordinal_grade_is_the_median_not_the_argmax():
    from medtransfer.metrics.classification import ordinal_grade

    # P(y > 0) = 0.6, P(y > 1) = 0.4: the median grade is 1 although classes 0 and 2 are likelier
    assert ordinal_grade(np.array([[0.4, 0.2, 0.4], [0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])).tolist() == [1, 2, 0]


def test_quadratic_weighted_kappa_and_grade_mae():
    from sklearn.metrics import cohen_kappa_score

    from medtransfer.metrics import ordinal_metrics, quadratic_weighted_kappa
    from medtransfer.metrics.classification import grade_mae, ordinal_grade

    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 300)
    p = rng.dirichlet(np.ones(5), 300)
    p[np.arange(300), y] += 0.3
    p /= p.sum(1, keepdims=True)
    want = cohen_kappa_score(y, ordinal_grade(p), weights="quadratic")
    assert quadratic_weighted_kappa(y, p) == pytest.approx(want) and 0.2 < want < 0.8
    assert grade_mae(y, p) == pytest.approx(np.abs(ordinal_grade(p) - y).mean())
    assert quadratic_weighted_kappa(y, np.eye(5)[y]) == pytest.approx(1.0)
    m = ordinal_metrics(y, p, patient_ids=[f"P{i // 3}" for i in range(300)], n_boot=200)
    qwk = m["quadratic_weighted_kappa"]
    assert qwk["ci_low"] < qwk["value"] < qwk["ci_high"] and qwk["resampled"] == "patients"
