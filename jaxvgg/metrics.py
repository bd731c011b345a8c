"""Evaluation metrics on numpy arrays: accuracy, confusion, F1, ROC, reject option, smoothing.

Inputs follow one convention throughout: `labels` and `preds` are integer arrays of shape (N,),
`probs` is a float array of shape (N, C) whose rows are probabilities (each sums to 1), and
`scores` is any (N, C) array whose order within a row is what matters (probs, logits, log-probs).
Nothing here needs jax; sklearn is used wherever it already has the function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from sklearn import metrics as skm
from sklearn.manifold import TSNE

# CIFAR-10 class indices: 0 airplane, 1 automobile, 2 bird, 3 cat, 4 deer, 5 dog, 6 frog,
# 7 horse, 8 ship, 9 truck.
CIFAR10_GROUPS: dict[str, tuple[int, ...]] = {
    "vehicle": (0, 1, 8, 9),
    "animal": (2, 3, 4, 5, 6, 7),
}

# How far a probability row may sum from 1: float32 softmax over 1000 classes stays well inside.
_PROB_SUM_ATOL = 1e-3


# ----------------------------------------------------------------------------- validation


def _as_label_array(values, name: str) -> np.ndarray:
    """Return `values` as a 1-D int64 array, or raise naming the bad dtype/shape."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(array == np.round(array)):
            raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _check_in_range(array: np.ndarray, name: str, num_classes: int) -> None:
    """Raise if any class index in `array` lies outside [0, num_classes)."""
    bad = (array < 0) | (array >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"{name} must lie in [0, {num_classes}), got {array[bad][0]} at index {np.flatnonzero(bad)[0]}"
        )


def _check_num_classes(num_classes) -> int:
    """Return `num_classes` as an int >= 1, or raise."""
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return int(num_classes)


def _label_pair(labels, preds) -> tuple[np.ndarray, np.ndarray]:
    """Validate labels/preds as equal-length, non-empty 1-D int arrays."""
    labels = _as_label_array(labels, "labels")
    preds = _as_label_array(preds, "preds")
    if labels.shape != preds.shape:
        raise ValueError(f"labels and preds must have the same shape, got {labels.shape} and {preds.shape}")
    if labels.size == 0:
        raise ValueError("labels must be non-empty, got 0 examples")
    return labels, preds


def _scores_with_labels(labels, scores, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Validate labels (N,) against finite-or-(-inf) scores (N, C); labels must lie in [0, C)."""
    labels = _as_label_array(labels, "labels")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {scores.shape}")
    if scores.shape[0] != labels.shape[0]:
        raise ValueError(f"{name} has {scores.shape[0]} rows but labels has {labels.shape[0]} entries")
    if labels.size == 0:
        raise ValueError("labels must be non-empty, got 0 examples")
    if np.any(np.isnan(scores)) or np.any(scores == np.inf):
        raise ValueError(f"{name} must not contain NaN or +inf, found {np.sum(~np.isfinite(scores))} such values")
    _check_in_range(labels, "labels", scores.shape[1])
    return labels, scores


def _probs_with_labels(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """Validate probs (N, C) as probabilities whose rows sum to 1, with labels in [0, C)."""
    labels, probs = _scores_with_labels(labels, probs, name="probs")
    if np.any(probs < 0) or np.any(probs > 1):
        raise ValueError(f"probs must lie in [0, 1], got min {probs.min()} and max {probs.max()}")
    row_sums = probs.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if abs(row_sums[worst] - 1.0) > _PROB_SUM_ATOL:
        raise ValueError(f"probs rows must sum to 1, row {worst} sums to {row_sums[worst]}")
    return labels, probs


def _as_series(values, name: str) -> np.ndarray:
    """Return `values` as a 1-D float64 array, or raise naming the bad shape."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    return array


# ----------------------------------------------------------------------------- accuracy


def accuracy(labels, preds) -> float:
    """Fraction of predictions equal to the labels.

    Args:
        labels: int (N,) true classes.
        preds: int (N,) predicted classes.

    Returns:
        Accuracy in [0, 1] as a python float.
    """
    labels, preds = _label_pair(labels, preds)
    return float(np.mean(labels == preds))


def topk_ranking(scores, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first; equal scores rank the lower class first.

    Args:
        scores: (N, C) probabilities, logits or log-probabilities; only the order in a row matters.
        k: how many classes to keep, 1 <= k <= C.

    Returns:
        int64 (N, k) class indices.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (N, C), got shape {scores.shape}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"k must be an int in [1, {scores.shape[1]}], got {k!r}")
    # A stable sort of the negated scores keeps equal scores in class-index order: deterministic ties.
    return np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)


def topk_accuracy(labels, scores, k: int) -> float:
    """Fraction of examples whose true class is among the k highest scores.

    Ties are broken deterministically: among equal scores the lower class index ranks higher,
    so with all-equal scores the top-k set is classes 0..k-1.

    Args:
        labels: int (N,) true classes in [0, C).
        scores: (N, C) probabilities, logits or log-probabilities (-inf allowed); only ranks matter.
        k: 1 <= k <= C.

    Returns:
        Top-k accuracy in [0, 1] as a python float.
    """
    labels, scores = _scores_with_labels(labels, scores)
    topk = topk_ranking(scores, k)
    return float(np.mean(np.any(topk == labels[:, None], axis=1)))


def per_class_accuracy(labels, preds, num_classes: int) -> np.ndarray:
    """Accuracy (recall) of each true class.

    Args:
        labels: int (N,) true classes in [0, num_classes).
        preds: int (N,) predicted classes in [0, num_classes).
        num_classes: C.

    Returns:
        float64 (C,): correct / examples of each class, NaN for a class with no examples.
    """
    labels, preds = _label_pair(labels, preds)
    num_classes = _check_num_classes(num_classes)
    _check_in_range(labels, "labels", num_classes)
    _check_in_range(preds, "preds", num_classes)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    correct = np.bincount(labels, weights=(labels == preds).astype(np.float64), minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, correct / np.maximum(counts, 1), np.nan)


# ----------------------------------------------------------------------------- confusion


def confusion_matrix(labels, preds, num_classes: int) -> np.ndarray:
    """Count matrix of true versus predicted classes.

    Args:
        labels: int (N,) true classes in [0, num_classes).
        preds: int (N,) predicted classes in [0, num_classes).
        num_classes: C; classes absent from both arrays still get a row and a column.

    Returns:
        int64 (C, C): entry [i, j] counts examples of true class i predicted as j.
    """
    labels, preds = _label_pair(labels, preds)
    num_classes = _check_num_classes(num_classes)
    # sklearn silently drops out-of-range classes, so reject them first.
    _check_in_range(labels, "labels", num_classes)
    _check_in_range(preds, "preds", num_classes)
    return skm.confusion_matrix(labels, preds, labels=np.arange(num_classes)).astype(np.int64)


def _as_confusion(cm) -> np.ndarray:
    """Return `cm` as a square non-negative int64 matrix, or raise."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (C, C) matrix, got shape {cm.shape}")
    if np.any(cm < 0) or not np.all(cm == np.round(cm)):
        raise ValueError(f"cm must hold non-negative integer counts, got min {cm.min()}")
    return cm.astype(np.int64)


def most_confused_pairs(cm, k: int = 5) -> list[tuple[int, int, int]]:
    """The k largest off-diagonal entries of a confusion matrix.

    Args:
        cm: (C, C) counts, rows true, columns predicted.
        k: how many pairs to return at most (>= 0).

    Returns:
        Up to k tuples (true, predicted, count) with count > 0, sorted by count descending,
        then by (true, predicted) ascending; pairs never confused are left out.
    """
    cm = _as_confusion(cm)
    if not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"k must be a non-negative int, got {k!r}")
    true_idx, pred_idx = np.nonzero(cm)
    pairs = [(int(t), int(p), int(cm[t, p])) for t, p in zip(true_idx, pred_idx) if t != p]
    pairs.sort(key=lambda pair: (-pair[2], pair[0], pair[1]))
    return pairs[:k]


def superclass_confusion(cm, groups: Mapping[str, Sequence[int]]) -> dict:
    """Confusion between groups of classes (e.g. CIFAR-10 vehicles vs animals).

    `groups` must partition the classes 0..C-1: every class in exactly one group.
    For a group G, an error of G is an example whose true class is in G and whose prediction
    is a different class; it stays within the group when the predicted class is also in G.

    Args:
        cm: (C, C) counts, rows true, columns predicted.
        groups: group name -> class indices; the dict order fixes the group order.

    Returns:
        dict with
          "group_names": list of the G group names, in order;
          "group_matrix": int64 (G, G), [a, b] = examples of a class in group a predicted as a
            class in group b (correct predictions land on the diagonal);
          "n_errors": {name: errors of that group};
          "n_within_group_errors": {name: those errors predicted as another class of the group};
          "within_group_error_fraction": {name: n_within_group_errors / n_errors, NaN if no errors}.
    """
    cm = _as_confusion(cm)
    num_classes = cm.shape[0]
    if not groups:
        raise ValueError(f"groups must name at least one group, got {groups!r}")
    group_of_class = np.full(num_classes, -1, dtype=np.int64)
    names = list(groups)
    for g, name in enumerate(names):
        members = np.asarray(list(groups[name]), dtype=np.int64)
        _check_in_range(members, f"groups[{name!r}]", num_classes)
        for cls in members.tolist():
            if group_of_class[cls] != -1:
                raise ValueError(
                    f"groups must be disjoint, class {cls} of {name!r} is already in {names[group_of_class[cls]]!r}"
                )
            group_of_class[cls] = g
    missing = np.flatnonzero(group_of_class == -1)
    if missing.size:
        raise ValueError(f"groups must cover every class 0..{num_classes - 1}, missing {missing.tolist()}")

    num_groups = len(names)
    # one_hot (C, G): summing cm over classes of each group on both axes gives the (G, G) matrix.
    one_hot = np.eye(num_groups, dtype=np.int64)[group_of_class]
    group_matrix = one_hot.T @ cm @ one_hot
    errors = cm - np.diag(np.diag(cm))
    n_errors, n_within, fraction = {}, {}, {}
    for g, name in enumerate(names):
        members = group_of_class == g
        n_errors[name] = int(errors[members].sum())
        n_within[name] = int(errors[np.ix_(members, members)].sum())
        fraction[name] = n_within[name] / n_errors[name] if n_errors[name] else math.nan
    return {
        "group_names": names,
        "group_matrix": group_matrix,
        "n_errors": n_errors,
        "n_within_group_errors": n_within,
        "within_group_error_fraction": fraction,
    }


# ----------------------------------------------------------------------------- F1 and ROC


def f1_scores(labels, preds, num_classes: int | None = None) -> dict[str, float]:
    """Micro- and macro-averaged F1 (sklearn.metrics.f1_score).

    Args:
        labels: int (N,) true classes.
        preds: int (N,) predicted classes.
        num_classes: if given, macro averages over classes 0..C-1 (a class never seen nor
            predicted scores 0); if None, over the classes present in labels or preds (sklearn's default).

    Returns:
        {"micro": float, "macro": float}. Micro F1 equals accuracy for single-label problems.
    """
    labels, preds = _label_pair(labels, preds)
    class_list = None
    if num_classes is not None:
        num_classes = _check_num_classes(num_classes)
        _check_in_range(labels, "labels", num_classes)
        _check_in_range(preds, "preds", num_classes)
        class_list = np.arange(num_classes)
    return {
        average: float(skm.f1_score(labels, preds, labels=class_list, average=average, zero_division=0))
        for average in ("micro", "macro")
    }


def roc_for_class(labels, probs, cls: int) -> dict:
    """One-vs-rest ROC curve of one class, scored by its probability column.

    Args:
        labels: int (N,) true classes in [0, C).
        probs: float (N, C) probabilities.
        cls: the positive class; every other class is negative. Both must occur in labels.

    Returns:
        dict(fpr, tpr, thresholds) as float arrays from sklearn.metrics.roc_curve and auc as a float.
    """
    labels, probs = _probs_with_labels(labels, probs)
    if not isinstance(cls, (int, np.integer)) or not 0 <= cls < probs.shape[1]:
        raise ValueError(f"cls must be an int in [0, {probs.shape[1]}), got {cls!r}")
    positive = labels == cls
    if positive.all() or not positive.any():
        raise ValueError(
            f"ROC of class {cls} needs positive and negative examples, "
            f"got {int(positive.sum())} of {labels.size} positive"
        )
    fpr, tpr, thresholds = skm.roc_curve(positive, probs[:, cls])
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds, "auc": float(skm.auc(fpr, tpr))}


def one_vs_rest_auc(labels, probs) -> np.ndarray:
    """Area under the one-vs-rest ROC curve of every class.

    Args:
        labels: int (N,) true classes in [0, C).
        probs: float (N, C) probabilities.

    Returns:
        float64 (C,) AUC per class (sklearn.metrics.roc_auc_score); NaN for a class that is
        absent from labels or is the only class present (the curve is undefined).
    """
    labels, probs = _probs_with_labels(labels, probs)
    aucs = np.full(probs.shape[1], np.nan)
    for cls in range(probs.shape[1]):
        positive = labels == cls
        if positive.any() and not positive.all():
            aucs[cls] = skm.roc_auc_score(positive, probs[:, cls])
    return aucs


# ----------------------------------------------------------------------------- reject option


def _errors_by_confidence(labels, probs) -> tuple[np.ndarray, np.ndarray]:
    """Confidences sorted ascending and suffix counts of errors: errors_from[i] = errors among sorted[i:]."""
    labels, probs = _probs_with_labels(labels, probs)
    confidence = probs.max(axis=1)
    wrong = probs.argmax(axis=1) != labels
    # Stable sort: equal confidences keep example order, so rejection order is deterministic.
    order = np.argsort(confidence, kind="stable")
    wrong_sorted = wrong[order].astype(np.int64)
    errors_from = np.concatenate([np.cumsum(wrong_sorted[::-1])[::-1], [0]])  # (N + 1,)
    return confidence[order], errors_from


def _error_rate(n_errors: np.ndarray, n_accepted: np.ndarray) -> np.ndarray:
    """n_errors / n_accepted, NaN where nothing is accepted."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_accepted > 0, n_errors / np.maximum(n_accepted, 1), np.nan)


def reject_option_curves(labels, probs, thresholds=None) -> dict[str, np.ndarray]:
    """Reject option: predict argmax only when the max probability reaches a threshold.

    For each threshold t an example is accepted when confidence = max(probs row) >= t and
    rejected otherwise; the prediction of an accepted example is its argmax class.
    Plot (a) n_errors_accepted against thresholds and (b) error_rate_accepted against n_rejected.

    Args:
        labels: int (N,) true classes in [0, C).
        probs: float (N, C) probabilities.
        thresholds: 1-D confidence thresholds, kept in the given order; default 101 points
            evenly spaced on [0, 1].

    Returns:
        dict of arrays, one entry per threshold: "thresholds" (float), "n_accepted",
        "n_rejected", "n_errors_accepted" (int64) and "error_rate_accepted" (float, NaN where
        nothing is accepted).
    """
    sorted_confidence, errors_from = _errors_by_confidence(labels, probs)
    thresholds = np.linspace(0.0, 1.0, 101) if thresholds is None else _as_series(thresholds, "thresholds")
    if np.any(np.isnan(thresholds)):
        raise ValueError(f"thresholds must not contain NaN, got {thresholds}")
    # Points with confidence < t come first in the sorted order: that count is the number rejected.
    n_rejected = np.searchsorted(sorted_confidence, thresholds, side="left").astype(np.int64)
    n_accepted = sorted_confidence.size - n_rejected
    n_errors = errors_from[n_rejected]
    return {
        "thresholds": thresholds,
        "n_accepted": n_accepted,
        "n_rejected": n_rejected,
        "n_errors_accepted": n_errors,
        "error_rate_accepted": _error_rate(n_errors, n_accepted),
    }


def reject_curve_by_count(labels, probs) -> dict[str, np.ndarray]:
    """Exact reject curve: reject the k least confident examples for every k = 0..N.

    Equal confidences are rejected in example order (a stable sort), so the curve is deterministic.

    Args:
        labels: int (N,) true classes in [0, C).
        probs: float (N, C) probabilities.

    Returns:
        dict of (N + 1,) arrays: "n_rejected" (0..N), "n_errors_accepted" and
        "error_rate_accepted" (NaN at k = N, where nothing is accepted).
    """
    sorted_confidence, errors_from = _errors_by_confidence(labels, probs)
    n_rejected = np.arange(sorted_confidence.size + 1, dtype=np.int64)
    n_accepted = sorted_confidence.size - n_rejected
    return {
        "n_rejected": n_rejected,
        "n_errors_accepted": errors_from,
        "error_rate_accepted": _error_rate(errors_from, n_accepted),
    }


# ----------------------------------------------------------------------------- summary


def _json_float(value) -> float | None:
    """A python float, or None for NaN so the result survives strict JSON."""
    value = float(value)
    return None if math.isnan(value) else value


def summarize_classification(
    labels, probs, class_names: Sequence[str], groups: Mapping[str, Sequence[int]] | None = None
) -> dict:
    """Every evaluation number of a classifier in one JSON-ready dict.

    Predictions are the argmax of probs. NaN values (a class with no examples) become None,
    so `json.dumps(summary, allow_nan=False)` works.

    Args:
        labels: int (N,) true classes in [0, C).
        probs: float (N, C) probabilities.
        class_names: C names, in class-index order.
        groups: optional superclass partition (e.g. CIFAR10_GROUPS) for the group breakdown.

    Returns:
        dict with "n_examples", "class_names", "accuracy", "top5_accuracy" (only if C >= 5),
        "per_class_accuracy" and "class_counts" ({name: value}), "confusion_matrix" (list of
        lists, rows true), "most_confused_pairs" (list of {"true", "predicted", "count"}, names),
        "f1" ({"micro", "macro"}), "one_vs_rest_auc" ({name: value}) and, if groups are given,
        "superclass" (the superclass_confusion result with lists in place of arrays).
    """
    labels, probs = _probs_with_labels(labels, probs)
    num_classes = probs.shape[1]
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
        raise ValueError(f"class_names must have {num_classes} entries (probs columns), got {len(class_names)}")
    preds = probs.argmax(axis=1)
    cm = confusion_matrix(labels, preds, num_classes)
    summary: dict = {
        "n_examples": int(labels.size),
        "class_names": class_names,
        "accuracy": accuracy(labels, preds),
    }
    if num_classes >= 5:
        summary["top5_accuracy"] = topk_accuracy(labels, probs, 5)
    per_class = per_class_accuracy(labels, preds, num_classes)
    summary["per_class_accuracy"] = {name: _json_float(v) for name, v in zip(class_names, per_class)}
    summary["class_counts"] = {name: int(n) for name, n in zip(class_names, cm.sum(axis=1))}
    summary["confusion_matrix"] = cm.tolist()
    summary["most_confused_pairs"] = [
        {"true": class_names[t], "predicted": class_names[p], "count": n} for t, p, n in most_confused_pairs(cm)
    ]
    summary["f1"] = f1_scores(labels, preds, num_classes)
    aucs = one_vs_rest_auc(labels, probs)
    summary["one_vs_rest_auc"] = {name: _json_float(v) for name, v in zip(class_names, aucs)}
    if groups is not None:
        superclass = superclass_confusion(cm, groups)
        superclass["group_matrix"] = superclass["group_matrix"].tolist()
        superclass["within_group_error_fraction"] = {
            name: _json_float(v) for name, v in superclass["within_group_error_fraction"].items()
        }
        summary["superclass"] = superclass
    return summary


# ----------------------------------------------------------------------------- smoothing and embedding


def ewa(values, alpha: float = 0.1) -> np.ndarray:
    """Exponentially weighted average, pandas `ewm(alpha=alpha, adjust=False).mean()` semantics.

    Args:
        values: 1-D series x (e.g. per-batch losses).
        alpha: weight of the newest value, 0 < alpha <= 1.

    Returns:
        float64 array y of the same length: y_0 = x_0, y_t = (1 - alpha) * y_{t-1} + alpha * x_t.
    """
    values = _as_series(values, "values")
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    smoothed = np.empty_like(values)
    running = values[0] if values.size else 0.0
    for t, x in enumerate(values):
        running = (1.0 - alpha) * running + alpha * x
        smoothed[t] = running
    return smoothed


def moving_mean(values, window: int) -> np.ndarray:
    """Trailing moving mean over `window` values, shorter windows at the start.

    Args:
        values: 1-D series x.
        window: number of values averaged, >= 1.

    Returns:
        float64 array of the same length: y_t = mean(x[max(0, t - window + 1) : t + 1]).
    """
    values = _as_series(values, "values")
    if not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    cumulative = np.concatenate([[0.0], np.cumsum(values)])
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(0, ends - window)
    return (cumulative[ends] - cumulative[starts]) / (ends - starts)


def tsne_embedding(features, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """2-D t-SNE embedding of feature vectors (sklearn.manifold.TSNE).

    Args:
        features: (N, ...) features, flattened to (N, D); N >= 2.
        seed: random_state, so the embedding is reproducible.
        perplexity: clamped to (N - 1) / 3 (at least 1) because sklearn needs perplexity < N.

    Returns:
        float64 (N, 2) embedding.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim < 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {features.shape}")
    if perplexity <= 0:
        raise ValueError(f"perplexity must be positive, got {perplexity}")
    features = features.reshape(features.shape[0], -1)  # (N, ...) -> (N, D)
    n = features.shape[0]
    perplexity = float(min(perplexity, max(1.0, (n - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    return tsne.fit_transform(features).astype(np.float64)
