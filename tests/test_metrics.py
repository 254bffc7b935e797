"""metrics.py against scikit-learn (a test-only reference) on random data and edge cases."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import sklearn.metrics as sk

from colearn_dist.metrics import (
    PRIMARY,
    TASKS,
    average_precision,
    classification_metrics,
    compute_metrics,
    metric_direction,
    multilabel_metrics,
    regression_metrics,
)


@pytest.fixture(autouse=True)
def _quiet_sklearn():
    # The edge cases deliberately trigger scikit-learn's "undefined metric" warnings.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _close(a: float, b: float) -> bool:
    return (np.isnan(a) and np.isnan(b)) or np.isclose(a, b, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------- regression


@pytest.mark.parametrize("seed", range(5))
def test_regression_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    t = rng.normal(50, 20, 300)
    p = t + rng.normal(3, 10, 300)
    m = regression_metrics(t, p)
    assert _close(m["rmse"], np.sqrt(sk.mean_squared_error(t, p)))
    assert _close(m["mae"], sk.mean_absolute_error(t, p))
    assert _close(m["r2"], sk.r2_score(t, p))
    assert _close(m["bias"], np.mean(p - t))


def test_regression_ignores_nan_targets():
    rng = np.random.default_rng(0)
    t = rng.normal(size=200).astype(np.float32)
    p = t + rng.normal(size=200).astype(np.float32)
    t_nan = t.copy()
    t_nan[::7] = np.nan
    keep = np.isfinite(t_nan)
    m = regression_metrics(t_nan, p)  # computed in float64 whatever the input dtype
    t64, p64 = t[keep].astype(np.float64), p[keep].astype(np.float64)
    assert _close(m["rmse"], np.sqrt(sk.mean_squared_error(t64, p64)))
    assert _close(m["r2"], sk.r2_score(t64, p64))
    assert all(isinstance(v, float) for v in m.values())


def test_regression_nan_prediction_is_not_hidden():
    m = regression_metrics([1.0, 2.0, 3.0], [1.0, np.nan, 3.0])
    assert np.isnan(m["rmse"])


def test_regression_undefined_cases():
    m = regression_metrics([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert np.isnan(m["r2"]) and _close(m["bias"], 0.0) and _close(m["mae"], 2 / 3)
    m = regression_metrics([np.nan, np.nan], [1.0, 2.0])
    assert all(np.isnan(v) for v in m.values())
    with pytest.raises(ValueError, match="y_pred"):
        regression_metrics([1.0, 2.0], [1.0])


# ------------------------------------------------------------------------------- classification


def _check_against_sklearn(t, labels, names):
    m = classification_metrics(t, labels, names)
    c = len(names)
    assert _close(m["oa"], sk.accuracy_score(t, labels))
    assert _close(m["f1_macro"], sk.f1_score(t, labels, average="macro"))
    assert _close(m["kappa"], sk.cohen_kappa_score(t, labels, labels=list(range(c))))
    per = sk.f1_score(t, labels, average=None, labels=list(range(c)), zero_division=np.nan)
    for k, name in enumerate(names):
        assert _close(m[f"f1/{name}"], per[k]), name
    return m


@pytest.mark.parametrize("seed", range(5))
def test_multiclass_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    names = ["water", "crop", "forest", "urban"]
    t = rng.integers(0, 4, 400)
    proba = rng.dirichlet(np.ones(4), 400)
    proba[np.arange(400), t] += rng.uniform(0, 0.6, 400)  # better than chance
    m = _check_against_sklearn(t, proba.argmax(1), names)
    assert m == classification_metrics(t, proba, names)  # scores [N, C] → argmax
    assert set(m) == {"oa", "f1_macro", "kappa", *(f"f1/{n}" for n in names)}


def test_class_never_predicted():
    rng = np.random.default_rng(1)
    t = rng.integers(0, 3, 100)
    p = rng.integers(0, 2, 100)  # class 2 present but never predicted
    m = _check_against_sklearn(t, p, ["a", "b", "c"])
    assert m["f1/c"] == 0.0


def test_class_absent_from_truth_and_prediction():
    rng = np.random.default_rng(2)
    t = rng.integers(0, 2, 100)
    p = rng.integers(0, 2, 100)
    m = _check_against_sklearn(t, p, ["a", "b", "c"])  # "c" nowhere: excluded from the macro mean
    assert np.isnan(m["f1/c"])
    assert _close(m["f1_macro"], (m["f1/a"] + m["f1/b"]) / 2)


def test_single_class_present():
    t = np.zeros(50, dtype=np.int64)
    p = np.zeros(50, dtype=np.int64)
    p[:10] = 1
    m = _check_against_sklearn(t, p, ["neg", "pos"])
    assert m["kappa"] == 0.0 and m["f1/pos"] == 0.0
    # Perfect agreement on one class: kappa is undefined (chance agreement is 1), like sklearn.
    m = classification_metrics(t, t, ["neg", "pos"])
    assert m["oa"] == 1.0 and m["f1_macro"] == 1.0 and np.isnan(m["kappa"]) and np.isnan(m["f1/pos"])


@pytest.mark.parametrize("seed", range(3))
def test_binary_accepts_probabilities(seed):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 2, 200)
    prob = np.clip(0.3 * t + rng.uniform(0, 0.7, 200), 0, 1)
    labels = (prob >= 0.5).astype(int)
    ref = _check_against_sklearn(t, labels, ["no", "yes"])
    assert classification_metrics(t, prob, ["no", "yes"]) == ref
    assert classification_metrics(t, prob[:, None], ["no", "yes"]) == ref
    assert classification_metrics(t, np.stack([1 - prob, prob], 1), ["no", "yes"]) == ref
    assert classification_metrics(t.astype(np.float32), labels.astype(np.float32), ["no", "yes"]) == ref
    assert compute_metrics("binary", t, prob, ["no", "yes"]) == ref


def test_classification_rejects_bad_input():
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 1, 3], [0, 1, 1], ["a", "b", "c"])
    with pytest.raises(ValueError, match="columns"):
        classification_metrics([0, 1], np.ones((2, 4)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="sigmoid"):
        classification_metrics([0, 1], [-1.5, 2.5], ["a", "b"])
    with pytest.raises(ValueError, match="only understood for two classes"):
        classification_metrics([0, 1], [0.2, 0.7], ["a", "b", "c"])
    with pytest.raises(ValueError, match="duplicates"):
        classification_metrics([0, 1], [0, 1], ["a", "a"])


# ----------------------------------------------------------------------------------- multilabel


@pytest.mark.parametrize("seed", range(5))
def test_multilabel_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = 300, 6
    t = (rng.uniform(size=(n, k)) < rng.uniform(0.05, 0.5, k)).astype(np.uint8)
    s = np.clip(0.4 * t + rng.uniform(0, 0.7, (n, k)), 0, 1)
    s = np.round(s, 2)  # ties, which AP must group
    names = [f"c{i}" for i in range(k)]
    m = multilabel_metrics(t, s, names)
    pred = (s >= 0.5).astype(int)
    for avg in ("micro", "macro", "weighted"):
        assert _close(m[f"f1_{avg}"], sk.f1_score(t, pred, average=avg, zero_division=np.nan)), avg
    assert _close(m["map"], sk.average_precision_score(t, s, average="macro"))
    per = sk.f1_score(t, pred, average=None, zero_division=np.nan)
    assert all(_close(m[f"f1/{c}"], per[i]) for i, c in enumerate(names))
    assert compute_metrics("multilabel", t.astype(np.float32), s, names) == m


def test_multilabel_class_without_positives_and_never_predicted():
    rng = np.random.default_rng(7)
    n, k = 200, 4
    t = (rng.uniform(size=(n, k)) < 0.3).astype(np.uint8)
    t[:, 2] = 0  # no positive: AP undefined, left out of mAP
    s = rng.uniform(size=(n, k))
    s[:, 2] = 0.1  # and never predicted: F1 undefined, left out of macro F1
    s[:, 3] = 0.2  # class 3 present but never predicted: F1 0
    names = list("abcd")
    m = multilabel_metrics(t, s, names)
    pred = (s >= 0.5).astype(int)
    keep = [0, 1, 3]
    assert _close(m["map"], sk.average_precision_score(t[:, keep], s[:, keep], average="macro"))
    assert _close(m["f1_macro"], sk.f1_score(t, pred, average="macro", zero_division=np.nan))
    assert _close(m["f1_weighted"], sk.f1_score(t, pred, average="weighted", zero_division=np.nan))
    assert np.isnan(m["f1/c"]) and m["f1/d"] == 0.0


def test_multilabel_threshold_and_no_positive_at_all():
    t = np.array([[1, 0], [0, 1], [1, 1]])
    s = np.array([[0.6, 0.1], [0.2, 0.4], [0.35, 0.9]])
    m = multilabel_metrics(t, s, ["x", "y"], threshold=0.3)
    pred = (s >= 0.3).astype(int)
    assert _close(m["f1_micro"], sk.f1_score(t, pred, average="micro"))
    empty = multilabel_metrics(np.zeros((3, 2)), s, ["x", "y"])
    assert np.isnan(empty["map"])
    with pytest.raises(ValueError, match="0 or 1"):
        multilabel_metrics(t * 2, s, ["x", "y"])


@pytest.mark.parametrize("seed", range(5))
def test_average_precision_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 100)
    y[0] = 1
    s = rng.integers(0, 5, 100).astype(float)  # many ties
    assert _close(average_precision(y, s), sk.average_precision_score(y, s))
    assert _close(average_precision(y, -s), sk.average_precision_score(y, -s))


# ------------------------------------------------------------------------------------- dispatch


def _example(task):
    if task == "regression":
        return [1.0, 2.0], [1.5, 2.0], []
    if task == "multilabel":
        return [[0, 1], [1, 1]], [[0.2, 0.9], [0.7, 0.4]], ["a", "b"]
    return [0, 1, 1], [0, 1, 0], ["a", "b"]


def test_compute_metrics_dispatch_and_primary():
    assert set(PRIMARY) == set(TASKS)
    for task, (metric, lower_is_better) in PRIMARY.items():
        assert isinstance(lower_is_better, bool)  # the engine negates the score on `if lower_is_better`
        assert metric_direction(metric) == ("lower" if lower_is_better else "higher")
        assert metric in compute_metrics(task, *_example(task))
    assert compute_metrics("regression", [1.0, 2.0], [1.0, 3.0])["rmse"] == pytest.approx(np.sqrt(0.5))
    assert set(compute_metrics("multiclass", [0, 1, 2], [0, 1, 1], ["a", "b", "c"])) >= {"oa", "kappa"}
    assert "map" in compute_metrics("multilabel", [[0, 1]], [[0.2, 0.9]], ["a", "b"])
    assert metric_direction("bias") == "zero" and metric_direction("mae") == "lower"
    assert metric_direction("f1/forest") == "higher"
    with pytest.raises(ValueError, match="unknown task"):
        compute_metrics("segmentation", [0], [0], [])
