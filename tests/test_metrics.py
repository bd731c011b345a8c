"""Unit tests of jaxvgg.metrics on hand-made inputs whose answers are worked out in comments."""

import json

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from jaxvgg import metrics


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_counts_two_of_four_correct_as_one_half():
    # matches at positions 0 and 2 -> 2 / 4
    assert metrics.accuracy([0, 1, 2, 2], [0, 2, 2, 1]) == 0.5


def test_topk_accuracy_breaks_ties_toward_the_lower_class_index():
    scores = np.array([
        [0.5, 0.5, 0.0],  # order 0, 1, 2  (0 and 1 tie: 0 first)
        [0.2, 0.4, 0.4],  # order 1, 2, 0  (1 and 2 tie: 1 first)
        [0.1, 0.1, 0.8],  # order 2, 0, 1  (0 and 1 tie: 0 first)
    ])
    labels = [1, 2, 1]
    # top-1 = {0}, {1}, {2}: no hit -> 0
    assert metrics.topk_accuracy(labels, scores, 1) == 0.0
    # top-2 = {0,1} hit, {1,2} hit, {2,0} miss (class 1 loses the tie to class 0) -> 2/3
    assert metrics.topk_accuracy(labels, scores, 2) == pytest.approx(2 / 3)
    # top-3 holds every class -> 1
    assert metrics.topk_accuracy(labels, scores, 3) == 1.0


def test_topk_ranking_of_equal_scores_is_class_order():
    np.testing.assert_array_equal(metrics.topk_ranking(np.zeros((2, 4)), 3), [[0, 1, 2], [0, 1, 2]])


def test_topk_accuracy_is_the_same_on_probs_logits_and_log_probs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 10, size=50)
    expected = metrics.topk_accuracy(labels, probs, 3)
    assert metrics.topk_accuracy(labels, logits, 3) == expected
    assert metrics.topk_accuracy(labels, np.log(probs), 3) == expected


def test_per_class_accuracy_is_nan_for_a_class_without_examples():
    # class 0: labels at 0,1, preds 0,1 -> 1/2; class 1: labels at 2,3,4, preds 1,1,0 -> 2/3; class 2: none
    result = metrics.per_class_accuracy([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], num_classes=3)
    np.testing.assert_allclose(result[:2], [0.5, 2 / 3])
    assert np.isnan(result[2])


# ----------------------------------------------------------------------------- confusion


def test_confusion_matrix_counts_a_hand_made_example():
    # (true, pred) pairs: (0,0) (0,1) (1,1) (2,2) (2,0) (2,2); class 3 never appears but keeps its row/column
    cm = metrics.confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], num_classes=4)
    expected = [
        [1, 1, 0, 0],
        [0, 1, 0, 0],
        [1, 0, 2, 0],
        [0, 0, 0, 0],
    ]
    np.testing.assert_array_equal(cm, expected)
    assert np.issubdtype(cm.dtype, np.integer)


def test_most_confused_pairs_sorts_off_diagonal_counts_and_skips_zeros():
    cm = [[5, 3, 0],
          [1, 4, 3],
          [2, 0, 6]]
    # off-diagonal non-zero: (0,1)=3 (1,0)=1 (1,2)=3 (2,0)=2; equal counts ordered by (true, pred)
    assert metrics.most_confused_pairs(cm, k=5) == [(0, 1, 3), (1, 2, 3), (2, 0, 2), (1, 0, 1)]
    assert metrics.most_confused_pairs(cm, k=2) == [(0, 1, 3), (1, 2, 3)]


def test_superclass_confusion_of_a_four_class_toy_with_two_groups():
    cm = np.array([
        [5, 2, 1, 0],
        [1, 6, 0, 1],
        [0, 3, 4, 2],
        [0, 0, 1, 7],
    ])
    result = metrics.superclass_confusion(cm, {"A": [0, 1], "B": [2, 3]})
    assert result["group_names"] == ["A", "B"]
    # A->A = 5+2+1+6 = 14, A->B = 1+0+0+1 = 2, B->A = 0+3+0+0 = 3, B->B = 4+2+1+7 = 14
    np.testing.assert_array_equal(result["group_matrix"], [[14, 2], [3, 14]])
    # errors of A: row 0 off-diag 2+1, row 1 off-diag 1+1 -> 5; within A: cm[0,1] + cm[1,0] = 3 -> 3/5
    # errors of B: row 2 off-diag 0+3+2, row 3 off-diag 1 -> 6; within B: cm[2,3] + cm[3,2] = 3 -> 1/2
    assert result["n_errors"] == {"A": 5, "B": 6}
    assert result["n_within_group_errors"] == {"A": 3, "B": 3}
    assert result["within_group_error_fraction"] == pytest.approx({"A": 0.6, "B": 0.5})


def test_superclass_confusion_fraction_is_nan_for_a_group_without_errors():
    result = metrics.superclass_confusion(np.diag([3, 4, 5]), {"x": [0], "y": [1, 2]})
    assert np.isnan(result["within_group_error_fraction"]["x"])


def test_cifar10_groups_partition_the_ten_classes():
    members = sorted(c for group in metrics.CIFAR10_GROUPS.values() for c in group)
    assert members == list(range(10))


# ----------------------------------------------------------------------------- F1 and ROC


def test_f1_scores_match_a_hand_computation():
    labels = [0, 0, 0, 1, 1, 2]
    preds = [0, 0, 1, 1, 2, 2]
    # class 0: TP 2, FP 0, FN 1 -> P 1,   R 2/3 -> F1 = 2*(2/3)/(5/3) = 4/5
    # class 1: TP 1, FP 1, FN 1 -> P 1/2, R 1/2 -> F1 = 1/2
    # class 2: TP 1, FP 1, FN 0 -> P 1/2, R 1   -> F1 = 2*(1/2)/(3/2) = 2/3
    # macro = (4/5 + 1/2 + 2/3) / 3 = 59/90; micro = accuracy = 4/6
    scores = metrics.f1_scores(labels, preds)
    assert scores["micro"] == pytest.approx(2 / 3)
    assert scores["macro"] == pytest.approx(59 / 90)
    # counting an unseen class 3 (F1 0) divides the same sum by 4: 59/120
    assert metrics.f1_scores(labels, preds, num_classes=4)["macro"] == pytest.approx(59 / 120)


def test_roc_auc_is_one_for_a_perfectly_separating_score():
    labels = [0, 0, 1, 1]
    probs = [[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9]]
    roc = metrics.roc_for_class(labels, probs, cls=1)
    assert roc["auc"] == 1.0
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    np.testing.assert_array_equal(metrics.one_vs_rest_auc(labels, probs), [1.0, 1.0])


def test_roc_auc_is_one_half_for_a_constant_or_uninformative_score():
    assert metrics.roc_for_class([0, 1, 0, 1], [[0.5, 0.5]] * 4, cls=1)["auc"] == 0.5
    # positives score {0.2, 0.8}, negatives {0.2, 0.8}: pairs win 1 + tie 1/2 + tie 1/2 + loss 0 -> 2/4
    probs = [[0.8, 0.2], [0.8, 0.2], [0.2, 0.8], [0.2, 0.8]]
    assert metrics.roc_for_class([0, 1, 0, 1], probs, cls=1)["auc"] == 0.5


def test_roc_auc_counts_ordered_pairs_by_hand():
    # positives score {0.35, 0.8}, negatives {0.1, 0.4}: 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    probs = [[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]]
    assert metrics.roc_for_class([0, 0, 1, 1], probs, cls=1)["auc"] == pytest.approx(0.75)


def test_one_vs_rest_auc_is_nan_for_a_class_absent_from_labels():
    probs = [[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]]
    aucs = metrics.one_vs_rest_auc([0, 1, 0], probs)
    # class 0: positives {0.7, 0.6} beat negative {0.2} -> 1; class 1 likewise -> 1
    np.testing.assert_array_equal(aucs[:2], [1.0, 1.0])
    assert np.isnan(aucs[2])


def test_roc_for_class_rejects_a_class_without_positives():
    with pytest.raises(ValueError, match="class 2 needs positive and negative examples, got 0 of 3"):
        metrics.roc_for_class([0, 1, 0], [[0.7, 0.2, 0.1]] * 3, cls=2)


# ----------------------------------------------------------------------------- reject option


def _reject_toy():
    """Five examples, argmax always class 0, confidences 0.95 ok, 0.9 ok, 0.8 wrong, 0.6 ok, 0.55 wrong."""
    confidence = np.array([0.95, 0.9, 0.8, 0.6, 0.55])
    probs = np.stack([confidence, 1 - confidence], axis=1)
    labels = np.array([0, 0, 1, 0, 1])
    return labels, probs


def test_reject_option_curves_count_accepted_errors_by_hand():
    labels, probs = _reject_toy()
    curves = metrics.reject_option_curves(labels, probs, thresholds=[0.0, 0.55, 0.56, 0.8, 0.85, 0.95, 1.0])
    # t=0 and 0.55 accept all 5 (2 errors); 0.56 drops the 0.55 error; 0.8 keeps {0.95, 0.9, 0.8};
    # 0.85 keeps only the two correct ones; 0.95 keeps one; 1.0 keeps none
    np.testing.assert_array_equal(curves["n_accepted"], [5, 5, 4, 3, 2, 1, 0])
    np.testing.assert_array_equal(curves["n_rejected"], [0, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(curves["n_errors_accepted"], [2, 2, 1, 1, 0, 0, 0])
    np.testing.assert_allclose(curves["error_rate_accepted"], [2 / 5, 2 / 5, 1 / 4, 1 / 3, 0, 0, np.nan])


def test_reject_option_curves_default_grid_is_monotone_and_error_free_above_the_last_error():
    labels, probs = _reject_toy()
    curves = metrics.reject_option_curves(labels, probs)
    assert curves["thresholds"].shape == (101,)
    assert np.all(np.diff(curves["n_accepted"]) <= 0)
    np.testing.assert_array_equal(curves["n_accepted"] + curves["n_rejected"], 5)
    assert curves["n_accepted"][0] == 5
    # the most confident error has confidence 0.8: above it only correct points remain
    assert np.all(curves["n_errors_accepted"][curves["thresholds"] > 0.8] == 0)


def test_reject_curve_by_count_rejects_the_least_confident_first():
    labels, probs = _reject_toy()
    curve = metrics.reject_curve_by_count(labels, probs)
    # ascending confidence: 0.55 wrong, 0.6 ok, 0.8 wrong, 0.9 ok, 0.95 ok
    np.testing.assert_array_equal(curve["n_rejected"], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(curve["n_errors_accepted"], [2, 1, 1, 0, 0, 0])
    np.testing.assert_allclose(curve["error_rate_accepted"], [2 / 5, 1 / 4, 1 / 3, 0, 0, np.nan])


# ----------------------------------------------------------------------------- summary


def test_summarize_classification_is_strict_json_with_names_and_groups():
    labels = np.array([0, 0, 1, 1, 2, 3, 3])
    preds = np.array([0, 1, 1, 1, 3, 3, 2])
    probs = np.full((7, 4), 0.1)
    probs[np.arange(7), preds] = 0.7
    summary = metrics.summarize_classification(labels, probs, ["a", "b", "c", "d"], groups={"ab": [0, 1], "cd": [2, 3]})
    json.dumps(summary, allow_nan=False)
    assert summary["accuracy"] == pytest.approx(4 / 7)  # hits at positions 0, 2, 3, 5
    assert "top5_accuracy" not in summary  # only 4 classes
    assert summary["per_class_accuracy"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.0, "d": 0.5})
    assert summary["class_counts"] == {"a": 2, "b": 2, "c": 1, "d": 2}
    assert summary["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]]
    # off-diagonal counts are all 1: ordered by (true, predicted)
    assert summary["most_confused_pairs"][0] == {"true": "a", "predicted": "b", "count": 1}
    assert summary["f1"]["micro"] == pytest.approx(4 / 7)
    # errors: a->b (within ab), c->d and d->c (within cd)
    assert summary["superclass"]["group_matrix"] == [[4, 0], [0, 3]]
    assert summary["superclass"]["within_group_error_fraction"] == {"ab": 1.0, "cd": 1.0}


def test_summarize_classification_reports_top5_and_none_for_undefined_numbers():
    labels = np.array([0, 1, 2, 3, 4, 0])
    probs = np.full((6, 6), 1 / 6)
    summary = metrics.summarize_classification(labels, probs, list("uvwxyz"))
    json.dumps(summary, allow_nan=False)
    # equal scores rank classes 0..4 first, so every label 0..4 is in the top 5
    assert summary["top5_accuracy"] == 1.0
    assert summary["per_class_accuracy"]["z"] is None  # class 5 has no examples
    assert summary["one_vs_rest_auc"]["z"] is None


# ----------------------------------------------------------------------------- smoothing and embedding


def test_ewa_follows_the_recurrence_from_the_first_value():
    # y0 = 1; y1 = 0.5*1 + 0.5*2 = 1.5; y2 = 0.5*1.5 + 0.5*3 = 2.25; y3 = 0.5*2.25 + 0.5*4 = 3.125
    np.testing.assert_allclose(metrics.ewa([1, 2, 3, 4], alpha=0.5), [1, 1.5, 2.25, 3.125])
    np.testing.assert_allclose(metrics.ewa([3, 1, 4], alpha=1.0), [3, 1, 4])
    assert metrics.ewa([], alpha=0.1).shape == (0,)


def test_moving_mean_averages_a_trailing_window_shortened_at_the_start():
    # window 3: [1], [1,2], [1,2,3], [2,3,4], [3,4,5]
    np.testing.assert_allclose(metrics.moving_mean([1, 2, 3, 4, 5], 3), [1, 1.5, 2, 3, 4])
    np.testing.assert_allclose(metrics.moving_mean([1, 2, 3], 1), [1, 2, 3])


def test_tsne_embedding_is_two_dimensional_and_reproducible_on_few_points():
    features = np.random.default_rng(0).normal(size=(12, 2, 3))  # flattened to (12, 6); perplexity clamped to 11/3
    # One OpenMP thread: on a busy 2-core machine sklearn's threaded gradient took 26 s instead of 0.2 s.
    with threadpool_limits(limits=1):
        first = metrics.tsne_embedding(features, seed=1)
        again = metrics.tsne_embedding(features, seed=1)
    assert first.shape == (12, 2) and np.all(np.isfinite(first))
    np.testing.assert_allclose(again, first)


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: metrics.accuracy([0, 1], [0, 1, 1]), r"same shape, got \(2,\) and \(3,\)"),
        (lambda: metrics.accuracy([[0, 1]], [[0, 1]]), r"labels must be 1-D \(N,\), got shape \(1, 2\)"),
        (lambda: metrics.accuracy([0.5, 1], [0, 1]), "labels must hold integers, got dtype float64"),
        (lambda: metrics.accuracy([], []), "got 0 examples"),
        (lambda: metrics.confusion_matrix([0, 3], [0, 1], 3), r"labels must lie in \[0, 3\), got 3 at index 1"),
        (lambda: metrics.per_class_accuracy([0, 1], [0, -1], 2), r"preds must lie in \[0, 2\), got -1"),
        (lambda: metrics.per_class_accuracy([0], [0], 0), "num_classes must be a positive int, got 0"),
        (lambda: metrics.topk_accuracy([0], [[0.2, 0.8]], 3), r"k must be an int in \[1, 2\], got 3"),
        (lambda: metrics.topk_accuracy([0], [[np.nan, 0.8]], 1), "must not contain NaN"),
        (lambda: metrics.one_vs_rest_auc([0, 1], [[0.5, 0.6], [0.5, 0.5]]), "row 0 sums to 1.1"),
        (lambda: metrics.roc_for_class([0, 1], [[1.5, -0.5], [0.5, 0.5]], 0),
         r"probs must lie in \[0, 1\], got min -0.5"),
        (lambda: metrics.reject_option_curves([0, 1], [[1.0, 0.0]]), "probs has 1 rows but labels has 2"),
        (lambda: metrics.most_confused_pairs([[1, 2, 3]]), r"square \(C, C\) matrix, got shape \(1, 3\)"),
        (lambda: metrics.superclass_confusion(np.eye(3), {"a": [0, 1], "b": [1, 2]}),
         "class 1 of 'b' is already in 'a'"),
        (lambda: metrics.superclass_confusion(np.eye(3), {"a": [0]}), r"missing \[1, 2\]"),
        (lambda: metrics.superclass_confusion(np.eye(3), {"a": [0, 1, 5]}), r"lie in \[0, 3\), got 5"),
        (lambda: metrics.summarize_classification([0], [[0.5, 0.5]], ["a"]), "class_names must have 2 entries"),
        (lambda: metrics.ewa([1.0, 2.0], alpha=0.0), r"alpha must be in \(0, 1\], got 0.0"),
        (lambda: metrics.moving_mean([1.0], window=0), "window must be a positive int, got 0"),
        (lambda: metrics.tsne_embedding(np.ones((1, 3))), r"N >= 2, got shape \(1, 3\)"),
    ],
)
def test_bad_inputs_raise_value_errors_that_name_the_bad_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()
