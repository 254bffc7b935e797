"""Task metrics in plain numpy, so evaluation needs no scikit-learn at run time.

Every function matches scikit-learn's definition (the tests check it); where a metric is undefined
on the data given (R² of a constant target, Cohen's kappa when chance agreement is 1, F1 of a class
that is neither present nor predicted) it is NaN rather than a made-up 0 or 1, so that a table never
shows a number that was not measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

TASKS = ("binary", "multiclass", "multilabel", "regression")

Direction = Literal["lower", "higher", "zero"]

# The metric each task selects models on: (name, lower_is_better). mAP for multilabel because,
# unlike F1, it does not hinge on the 0.5 threshold.
PRIMARY: dict[str, tuple[str, bool]] = {
    "regression": ("rmse", True),
    "binary": ("f1_macro", False),
    "multiclass": ("f1_macro", False),
    "multilabel": ("map", False),
}

# Every scalar metric of a task, the primary one first: the Markdown tables show one each.
TABLE_METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("rmse", "mae", "r2", "bias"),
    "binary": ("f1_macro", "oa", "kappa"),
    "multiclass": ("f1_macro", "oa", "kappa"),
    "multilabel": ("map", "f1_micro", "f1_macro", "f1_weighted"),
}

_LOWER_IS_BETTER = frozenset({"rmse", "mae", "mse", "loss"})
_ZERO_IS_BETTER = frozenset({"bias"})


def metric_direction(metric: str) -> Direction:
    """Which way is better for `metric`: a bias is best at 0, errors low, everything else high."""
    if metric in _LOWER_IS_BETTER or metric.startswith("loss"):
        return "lower"
    if metric in _ZERO_IS_BETTER:
        return "zero"
    return "higher"


def _safe_div(num: np.ndarray | float, den: np.ndarray | float) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den != 0)
    return out


# ----------------------------------------------------------------------------------- regression


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """RMSE, MAE, R² and bias (mean of prediction − target) over the samples with a finite target.

    Missing targets are NaN in the archive; they carry no information to score against.
    A NaN prediction for a finite target is kept, and turns the metrics NaN, because hiding a
    model's failure to predict would flatter it.
    """
    t = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} values but y_pred has {p.size}")
    keep = np.isfinite(t)
    t, p = t[keep], p[keep]
    if t.size == 0:
        return {"rmse": np.nan, "mae": np.nan, "r2": np.nan, "bias": np.nan}
    err = p - t
    ss_res = float(np.sum(err**2))
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "r2": float(1.0 - ss_res / ss_tot) if ss_tot > 0 else np.nan,
        "bias": float(np.mean(err)),
    }


# ------------------------------------------------------------------------------- classification


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    names = [str(c) for c in class_names]
    if not names:
        raise ValueError("class_names is empty; a classification task needs its class names")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names has duplicates: {names}")
    return names


def _to_labels(proba_or_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Hard labels from what a model or a caller has at hand.

    Accepted: labels [N] (integers, or floats that are whole numbers); class probabilities or
    logits [N, C] (argmax); for two classes, the positive-class probability [N] or [N, 1]
    (thresholded at 0.5).
    """
    a = np.asarray(proba_or_labels)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim == 2:
        if a.shape[1] != num_classes:
            raise ValueError(f"predictions have {a.shape[1]} columns but there are {num_classes} classes")
        if not np.all(np.isfinite(a)):
            raise ValueError("class scores contain NaN or inf")
        return np.argmax(a, axis=1)
    if a.ndim != 1:
        raise ValueError(f"predictions must be [N] or [N, C], got shape {a.shape}")
    if a.dtype.kind in "iu" or a.dtype.kind == "b":
        return a.astype(np.int64)
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError("predictions contain NaN or inf")
    if np.all(a == np.round(a)):
        return a.astype(np.int64)
    if num_classes == 2:
        if a.min() < 0 or a.max() > 1:
            raise ValueError(
                "a 1-D float prediction for a binary task must be the positive-class probability in [0, 1]; apply a sigmoid to logits first"
            )
        return (a >= 0.5).astype(np.int64)
    raise ValueError("1-D non-integer predictions are only understood for two classes; pass [N, C] scores")


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise ValueError(f"{what} has label {int(bad[0])} outside 0..{num_classes - 1}")


def _f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    # 2TP / (2TP + FP + FN): equal to the harmonic mean of precision and recall wherever that is
    # defined, and defined also when a present class is never predicted (F1 = 0).
    return _safe_div(2.0 * tp, 2.0 * tp + fp + fn)


def classification_metrics(y_true: np.ndarray, proba_or_labels: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Overall accuracy, macro F1, Cohen's kappa and per-class F1 (`f1/<class>`).

    Macro F1 averages the classes that occur in the targets or the predictions (as scikit-learn
    does): a class absent from both has no F1, and counting it as 0 or 1 would move the average by
    something the model did not do.
    """
    names = _check_class_names(class_names)
    c = len(names)
    t = np.asarray(y_true).reshape(-1)
    if t.dtype.kind == "f":
        if not np.all(t == np.round(t)):
            raise ValueError("y_true must hold integer class labels")
    t = t.astype(np.int64)
    p = _to_labels(proba_or_labels, c)
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} samples but predictions have {p.size}")
    _check_labels(t, c, "y_true")
    _check_labels(p, c, "predictions")
    n = t.size
    if n == 0:
        out = {"oa": np.nan, "f1_macro": np.nan, "kappa": np.nan}
        out.update({f"f1/{name}": np.nan for name in names})
        return out

    cm = np.bincount(t * c + p, minlength=c * c).reshape(c, c).astype(np.float64)  # rows = truth
    tp = np.diag(cm)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    f1 = _f1_from_counts(tp, fp, fn)
    defined = np.isfinite(f1)

    po = tp.sum() / n
    pe = float(np.sum(cm.sum(axis=0) * cm.sum(axis=1))) / n**2
    kappa = (po - pe) / (1.0 - pe) if pe < 1.0 else np.nan

    out = {
        "oa": float(po),
        "f1_macro": float(f1[defined].mean()) if defined.any() else np.nan,
        "kappa": float(kappa),
    }
    out.update({f"f1/{name}": float(v) for name, v in zip(names, f1)})
    return out


# ----------------------------------------------------------------------------------- multilabel


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the step precision–recall curve (scikit-learn's `average_precision_score`).

    Tied scores form one threshold, so the result does not depend on the order of the samples.
    NaN when there is no positive, since recall is then undefined.
    """
    y = np.asarray(y_true).reshape(-1).astype(bool)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    n_pos = int(y.sum())
    if n_pos == 0:
        return np.nan
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), s.size - 1]
    tps = np.cumsum(y)[last_of_tie].astype(np.float64)
    precision = tps / (last_of_tie + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def multilabel_metrics(y_true: np.ndarray, scores: np.ndarray, class_names: Sequence[str], threshold: float = 0.5) -> dict[str, float]:
    """Micro / macro / weighted F1 at `threshold`, per-class F1 and mean average precision.

    `scores` are per-class probabilities (sigmoid outputs); a label is predicted where the score is
    >= threshold. mAP needs no threshold, and averages only classes with a positive in `y_true`,
    because AP is undefined without one. Macro F1 skips classes neither present nor predicted, for
    the same reason as in `classification_metrics`.
    """
    names = _check_class_names(class_names)
    t = np.asarray(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if t.ndim != 2 or t.shape != s.shape:
        raise ValueError(f"y_true and scores must both be [N, K]; got {t.shape} and {s.shape}")
    if t.shape[1] != len(names):
        raise ValueError(f"targets have {t.shape[1]} labels but there are {len(names)} class names")
    if not np.all((t == 0) | (t == 1)):
        raise ValueError("multilabel targets must be 0 or 1")
    t = t.astype(bool)
    pred = s >= threshold
    tp = np.sum(t & pred, axis=0).astype(np.float64)
    fp = np.sum(~t & pred, axis=0).astype(np.float64)
    fn = np.sum(t & ~pred, axis=0).astype(np.float64)
    f1 = _f1_from_counts(tp, fp, fn)
    defined = np.isfinite(f1)
    support = tp + fn
    weighted = _safe_div(np.sum(np.where(defined, f1, 0.0) * support), support.sum())

    ap = np.array([average_precision(t[:, k], s[:, k]) for k in range(t.shape[1])])
    has_pos = np.isfinite(ap)

    out = {
        "f1_micro": float(_f1_from_counts(tp.sum(), fp.sum(), fn.sum())),
        "f1_macro": float(f1[defined].mean()) if defined.any() else np.nan,
        "f1_weighted": float(weighted),
        "map": float(ap[has_pos].mean()) if has_pos.any() else np.nan,
    }
    out.update({f"f1/{name}": float(v) for name, v in zip(names, f1)})
    return out


# ------------------------------------------------------------------------------------- dispatch


def compute_metrics(task: str, y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str] = ()) -> dict[str, float]:
    """The metrics of an archive's `task`, so callers need not know which function fits which task."""
    if task == "regression":
        return regression_metrics(y_true, y_pred)
    if task in ("binary", "multiclass"):
        return classification_metrics(y_true, y_pred, class_names)
    if task == "multilabel":
        return multilabel_metrics(y_true, y_pred, class_names)
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
