"""The end of a run: `evaluate_and_report` scores the test set and writes every file; `write_report` shows the
numbers and figures."""

from __future__ import annotations

import json
import time

import jax
import numpy as np
import pytest

import jaxvgg
from jaxvgg import data, metrics, optim, plots, report
from jaxvgg.train import FitConfig, TrainState, fit, predict

CLASS_NAMES = ("plane", "car", "bird", "cat")


def _scaled(images):
    return images.astype(np.float32) / 255.0


def _toy_mnist(n: int, seed: int) -> tuple[data.Dataset, object, TrainState]:
    """``n`` random 28x28 images with labels, and mnist_linear with a fresh state."""
    rng = np.random.default_rng(seed)
    test = data.Dataset(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n),
                        data.MNIST_CLASSES)
    model = jaxvgg.create_model("mnist_linear")
    state = TrainState.for_model("mnist_linear", model, jaxvgg.init_params("mnist_linear", jax.random.PRNGKey(seed)),
                                 optim.sgd(0.01), rng=jax.random.PRNGKey(1))
    return test, model, state


def test_evaluate_and_report_scores_the_test_set_writes_every_file_and_adds_the_extra(tmp_path):
    test, _, state = _toy_mnist(30, seed=0)
    state, history = fit(state, test, None, FitConfig(epochs=1, batch_size=10, quiet=True),
                         train_transform=lambda key, x: _scaled(x), eval_transform=_scaled)
    seen = {}

    def extra(predictions):
        seen["predictions"] = predictions
        return {"mine": 1}, [plots.plot_moving_mean_loss(history["batch"]["loss"], 2, tmp_path / "extra.png")]

    summary = report.evaluate_and_report(state, test, _scaled, tmp_path, history, title="Toy run",
                                         summary={"model": "mnist_linear"}, extra=extra, batch_size=7,
                                         started=time.perf_counter())
    outputs = np.asarray(predict(state, test, _scaled), np.float64)  # 30 examples in one pass
    log_probs = outputs - np.log(np.exp(outputs - outputs.max(1, keepdims=True)).sum(1, keepdims=True)) \
        - outputs.max(1, keepdims=True)
    assert summary["test_accuracy"] == pytest.approx(np.mean(outputs.argmax(1) == test.labels))
    assert summary["test_loss"] == pytest.approx(-np.mean(log_probs[np.arange(30), test.labels]), rel=1e-6)
    assert summary["mine"] == 1 and summary["model"] == "mnist_linear" and summary["epochs"] == 1
    assert summary["wall_time_s"] >= 0 and summary["n_examples"] == 30
    np.testing.assert_array_equal(seen["predictions"].predicted, outputs.argmax(1))
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# Toy run") and "![extra](extra.png)" in text
    assert (tmp_path / "history.png").stat().st_size > 0 and (tmp_path / "confusion_matrix.png").stat().st_size > 0


def test_write_report_contains_every_number_and_links_every_figure(tmp_path):
    labels = np.array([0, 0, 1, 1, 2, 3, 3])
    preds = np.array([0, 1, 1, 1, 3, 3, 2])
    probs = np.full((7, 4), 0.1)
    probs[np.arange(7), preds] = 0.7
    summary = metrics.summarize_classification(labels, probs, CLASS_NAMES, groups={"vehicle": [0, 1], "animal": [2, 3]})
    summary["n_epochs"] = 3
    figures_dir = tmp_path / "figures"
    cm = np.array(summary["confusion_matrix"])
    figure = plots.plot_confusion_matrix(cm, CLASS_NAMES, figures_dir / "confusion.png")

    written = report.write_report(tmp_path, "Toy run", summary, [figure], extra_md="## Notes\n\nhand-made data")

    assert written == tmp_path / "report.md"
    text = written.read_text()
    assert text.startswith("# Toy run")
    assert "| accuracy | 0.571429 |" in text  # 4/7
    assert "| n_epochs | 3 |" in text
    assert "| bird | 0 |" in text  # per-class accuracy of bird
    assert "| true \\ predicted | plane | car | bird | cat |" in text  # confusion matrix header from class_names
    assert "| plane | 1 | 1 | 0 | 0 |" in text  # its first row
    assert "| true \\ predicted | vehicle | animal |" in text  # superclass matrix labelled by group_names
    assert "| plane | car | 1 |" in text  # most confused pair row
    assert "![confusion](figures/confusion.png)" in text
    assert (tmp_path / "figures" / "confusion.png").exists()
    assert text.rstrip().endswith("hand-made data")


def test_tta_log_probs_are_the_log_of_the_weighted_mean_of_each_views_probabilities():
    from jaxvgg import evaluation

    test, model, state = _toy_mnist(9, seed=3)

    def probs(images):  # by hand: one forward pass of the whole view, softmax in float64
        out = np.asarray(model.apply(state.variables, _scaled(images)), np.float64)
        e = np.exp(out - out.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    x = test.images
    moved = {}
    for name, (dy, dx) in {"up_left": (-2, -2), "down_right": (2, 2)}.items():
        padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
        moved[name] = padded[:, 2 - dy:2 - dy + 28, 2 - dx:2 - dx + 28]
    level1 = np.log(0.5 * probs(x) + 0.5 * probs(x[:, :, ::-1]))
    level2 = np.log(0.25 * probs(x) + 0.25 * probs(x[:, :, ::-1])
                    + sum(0.125 * probs(m) + 0.125 * probs(m[:, :, ::-1]) for m in moved.values()))
    np.testing.assert_allclose(evaluation.tta_log_probs(state, test, _scaled, 1, batch_size=4), level1, atol=1e-5)
    np.testing.assert_allclose(evaluation.tta_log_probs(state, test, _scaled, 2, batch_size=4), level2, atol=1e-5)
    np.testing.assert_allclose(evaluation.tta_log_probs(state, test, _scaled, 0),
                               evaluation.predict_log_probs(state, test, _scaled), atol=1e-12)
