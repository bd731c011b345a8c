"""Each plot of jaxvgg.plots writes a real, non-blank PNG."""

from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest

from jaxvgg import metrics, plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASS_NAMES = ["plane", "car", "bird", "cat"]


def assert_is_non_blank_png(path, expected: Path) -> None:
    """The returned path is the requested one, the file is a PNG, and its pixels are not all equal."""
    assert Path(path) == expected
    assert expected.read_bytes()[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(expected)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert pixels[..., :3].std() > 0


@pytest.fixture(autouse=True)
def no_figures_left_open():
    """Every plot function closes the figure it opened."""
    before = len(plt.get_fignums())
    yield
    assert len(plt.get_fignums()) == before


def make_history(epochs: int = 3, batches_per_epoch: int = 20, seed: int = 0, with_val: bool = True) -> dict:
    """A history dict in the training engine's format with decreasing loss and rising accuracy."""
    rng = np.random.default_rng(seed)
    n = epochs * batches_per_epoch
    step = np.arange(1, n + 1)
    loss = 2.3 * np.exp(-step / n) + 0.1 * rng.random(n)
    acc = np.clip(1 - loss / 2.5, 0, 1)
    def per_epoch(values):
        """Mean of each epoch's batches: (epochs * batches,) -> (epochs,)."""
        return values.reshape(epochs, batches_per_epoch).mean(axis=1).tolist()

    history = {
        "batch": {"step": step.tolist(), "epoch": (step / batches_per_epoch).tolist(), "loss": loss.tolist(),
                  "accuracy": acc.tolist(), "lr": [0.01] * n},
        "epoch": {"epoch": list(range(1, epochs + 1)), "train_loss": per_epoch(loss),
                  "train_accuracy": per_epoch(acc), "lr": [0.01] * epochs, "time_s": [1.0] * epochs},
    }
    if with_val:
        history["epoch"]["val_loss"] = [1.5, None, 0.9][:epochs]  # an epoch without validation
        history["epoch"]["val_accuracy"] = [0.5, None, 0.7][:epochs]
    return history


def random_images(n: int, channels: int, seed: int = 0) -> np.ndarray:
    """(n, 16, 16, channels) uint8 noise images."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 16, 16, channels), dtype=np.uint8)


def test_plot_history_writes_a_png_with_validation_gaps(tmp_path):
    path = tmp_path / "history.png"
    assert_is_non_blank_png(plots.plot_history(make_history(), path, label="toy run"), path)


def test_plot_history_works_without_validation_or_batch_logs(tmp_path):
    history = make_history(with_val=False)
    history["batch"] = {"step": [], "epoch": [], "loss": [], "accuracy": [], "lr": []}
    path = tmp_path / "sub" / "history.png"
    assert_is_non_blank_png(plots.plot_history(history, path), path)


def test_plot_history_comparison_writes_a_png(tmp_path):
    histories = {"lr 0.01": make_history(seed=0), "lr 0.005": make_history(seed=1)}
    path = tmp_path / "compare.png"
    assert_is_non_blank_png(plots.plot_history_comparison(histories, path), path)


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion_matrix_writes_a_png(tmp_path, normalize):
    cm = np.array([[5, 1, 0, 0], [2, 6, 0, 1], [0, 0, 7, 3], [0, 0, 0, 0]])  # last class empty: no 0/0 crash
    path = tmp_path / "cm.png"
    assert_is_non_blank_png(plots.plot_confusion_matrix(cm, CLASS_NAMES, path, normalize=normalize), path)


@pytest.mark.parametrize("channels", [1, 3])
def test_plot_image_grid_writes_a_png_for_gray_and_colour_images(tmp_path, channels):
    path = tmp_path / f"grid{channels}.png"
    result = plots.plot_image_grid(random_images(7, channels), [0, 1, 2, 3, 0, 1, 2], [0, 2, 2, 3, 1, 1, 2],
                                   CLASS_NAMES, path, ncols=3)
    assert_is_non_blank_png(result, path)


def test_plot_lr_range_writes_a_png_with_suggestions_and_a_diverging_tail(tmp_path):
    lrs = np.geomspace(1e-6, 10, 80)
    losses = 2.3 - 1.5 * np.exp(-((np.log10(lrs) + 2) ** 2)) + np.where(lrs > 1, 50 * lrs, 0)
    losses[-1] = np.inf  # a diverged last step must not break the y range
    smoothed = metrics.ewa(np.where(np.isfinite(losses), losses, 1e3), 0.2)
    path = tmp_path / "lr.png"
    result = plots.plot_lr_range(lrs, losses, smoothed, path, suggestions={"steepest": 1e-3, "min / 10": 1e-3 / 10})
    assert_is_non_blank_png(result, path)


def test_plot_roc_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3)) + 2 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    curves = {f"class {c}": metrics.roc_for_class(labels, probs, c) for c in range(3)}
    path = tmp_path / "roc.png"
    assert_is_non_blank_png(plots.plot_roc(curves, path), path)


def test_plot_reject_curves_writes_a_png_with_the_exact_curve(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    logits = rng.normal(size=(200, 10)) + 3 * np.eye(10)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    path = tmp_path / "reject.png"
    result = plots.plot_reject_curves(metrics.reject_option_curves(labels, probs), path,
                                      exact=metrics.reject_curve_by_count(labels, probs))
    assert_is_non_blank_png(result, path)


def test_plot_tsne_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 10)
    embedding = rng.normal(size=(40, 2)) + 4 * np.eye(4, 2)[labels]
    path = tmp_path / "tsne.png"
    assert_is_non_blank_png(plots.plot_tsne(embedding, labels, CLASS_NAMES, path), path)


def test_plot_per_class_vs_count_writes_a_png_skipping_nan(tmp_path):
    path = tmp_path / "per_class.png"
    result = plots.plot_per_class_vs_count([0.9, 0.7, np.nan, 0.5], [500, 300, 0, 100], CLASS_NAMES, path)
    assert_is_non_blank_png(result, path)


def test_plot_topk_predictions_writes_a_png(tmp_path):
    topk_indices = np.array([[1, 0, 2], [2, 3, 0]])
    topk_probs = np.array([[0.6, 0.3, 0.05], [0.5, 0.4, 0.1]])
    path = tmp_path / "topk.png"
    result = plots.plot_topk_predictions(random_images(2, 3), topk_indices, topk_probs, [1, 3], CLASS_NAMES, path)
    assert_is_non_blank_png(result, path)


def test_plot_moving_mean_loss_writes_a_png(tmp_path):
    losses = make_history()["batch"]["loss"]
    path = tmp_path / "moving.png"
    assert_is_non_blank_png(plots.plot_moving_mean_loss(losses, 10, path), path)


def test_plot_image_grid_rejects_images_that_do_not_match_the_labels(tmp_path):
    with pytest.raises(ValueError, match="images has 2 entries but true_labels has 3"):
        plots.plot_image_grid(random_images(2, 3), [0, 1, 2], [0, 1, 2], CLASS_NAMES, tmp_path / "bad.png")
