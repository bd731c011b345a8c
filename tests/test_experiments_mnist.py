"""The MNIST lab and the lr range test entry points (smoke runs on ../shared/data), and their evaluation glue."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxvgg
from jaxvgg import augment, data, evaluation, optim
from jaxvgg.train import TrainState, evaluate

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"
needs_mnist = pytest.mark.skipif(not MNIST_DIR.is_dir(), reason=f"MNIST IDX files not found at {MNIST_DIR}")


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_a_missing_mnist_folder_is_a_message_and_exit_code_2(tmp_path):
    out = _run("experiments.mnist", "--data-dir", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "run"))
    assert out.returncode == 2 and "MNIST files not found" in out.stderr
    assert "Traceback" not in out.stderr


@needs_mnist
def test_mnist_lab_one_epoch_smoke_run_writes_summary_and_plots(tmp_path):
    workdir = tmp_path / "run"
    # 540 training images at batch 64: the range test runs its default one epoch, 8 steps
    out = _run("experiments.mnist", "--data-dir", str(MNIST_DIR), "--limit", "600", "--epochs", "1",
               "--tsne-points", "100", "--workdir", str(workdir), "--quiet", "true")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_loss"] > 0
    assert summary["n_examples"] == 600 and summary["epochs"] == 1 and summary["model"] == "mnist_lenet"
    assert summary["lr"] == pytest.approx(summary["lr_range_suggestions"]["min_loss_half"])
    assert summary["wall_time_s"] > 0 and summary["tsne_points"] == 100
    pair = summary["most_confused_pair"]
    assert len(pair["digits"]) == 2 and pair["digits"][0] < pair["digits"][1]
    assert pair["count_both_ways"] == pair["count_a_as_b"] + pair["count_b_as_a"] > 0
    assert [row["threshold"] for row in summary["reject_option"]] == [0.5, 0.9, 0.99]
    lr_range = json.loads((workdir / "lr_range.json").read_text())
    assert len(lr_range["lrs"]) == len(lr_range["losses"]) == len(lr_range["smoothed"]) == 8
    named = workdir / summary["history_file"]
    assert named.name == f"history_lenet_sgd_lr{summary['lr']:g}_bs64_e1.json"
    assert json.loads(named.read_text()) == json.loads((workdir / "history.json").read_text())
    for name in ("config.json", "lr_range.png", "history.png", "confusion_matrix.png", "tsne.png",
                 "reject_option.png", "report.md"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "checkpoints" / "last" / "1").is_dir()


@needs_mnist
def test_lr_range_smoke_run_on_a_small_subset(tmp_path):
    workdir = tmp_path / "range"
    out = _run("experiments.lr_range", "--model", "mnist_linear", "--data-dir", str(MNIST_DIR), "--limit", "400",
               "--batch-size", "32", "--workdir", str(workdir), "--quiet", "true")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["dataset"] == "mnist" and summary["num_steps"] == 360 // 32
    assert set(summary["suggestions"]) == {"min_loss_half", "steepest"}
    assert "test_accuracy" not in summary
    record = json.loads((workdir / "lr_range.json").read_text())
    assert record["lrs"][0] == 1e-5 and len(record["smoothed"]) == summary["steps_recorded"]
    assert (workdir / "lr_range.png").stat().st_size > 0


# --- the evaluation glue the lab uses --------------------------------------------------------------

def _lenet_state():
    model = jaxvgg.create_model("mnist_lenet")
    params = jaxvgg.init_params("mnist_lenet", jax.random.PRNGKey(0))
    return TrainState.for_model("mnist_lenet", model, params, optim.sgd(0.01), rng=jax.random.PRNGKey(1)), model


def _digits(n: int) -> data.Dataset:
    rng = np.random.default_rng(0)
    return data.Dataset(rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32),
                        data.MNIST_CLASSES)


def _normalize(images):
    return augment.normalize(images, augment.MNIST_MEAN, augment.MNIST_STD)


def test_predicted_probs_sum_to_one_and_their_nll_is_the_loss_evaluate_reports():
    state, _ = _lenet_state()
    dataset = _digits(70)
    log_probs = evaluation.predict_log_probs(state, dataset, _normalize, batch_size=32)  # 3 batches, last padded
    probs = evaluation.predict_probs(state, dataset, _normalize, batch_size=32)
    assert log_probs.shape == probs.shape == (70, 10) and probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    reference = evaluate(state, dataset, _normalize, batch_size=32)
    nll = evaluation.nll(log_probs, dataset.labels)
    assert abs(nll - reference["loss"]) < 1e-5, f"max abs difference {abs(nll - reference['loss']):.2e}"
    assert np.mean(probs.argmax(1) == dataset.labels) == pytest.approx(reference["accuracy"])


def test_lenet_penultimate_features_are_what_fc3_reads():
    state, model = _lenet_state()
    images = _digits(10).images
    variables = {"params": state.params}
    features = evaluation.penultimate_features("mnist_lenet", model, variables, images, transform=_normalize,
                                               batch_size=4)  # 3 batches, the last padded
    assert features.shape == (10, 84) and np.all(features >= 0)  # after the ReLU
    fc3 = state.params["fc3"]
    logits = features @ np.asarray(fc3["kernel"]) + np.asarray(fc3["bias"])
    expected = np.asarray(model.apply(variables, _normalize(images)))  # log-softmax of fc3's output
    got = np.asarray(jax.nn.log_softmax(logits))
    assert np.max(np.abs(got - expected)) < 1e-5, f"max abs difference {np.max(np.abs(got - expected)):.2e}"


def test_linear_penultimate_features_are_the_flattened_normalised_image():
    model = jaxvgg.create_model("mnist_linear")
    variables = jaxvgg.init_params("mnist_linear", jax.random.PRNGKey(0))
    images = _digits(3).images
    features = evaluation.penultimate_features("mnist_linear", model, variables, images, transform=_normalize)
    np.testing.assert_allclose(features, np.asarray(_normalize(images)).reshape(3, 784), rtol=1e-6)


def test_penultimate_features_name_the_unknown_model():
    with pytest.raises(ValueError, match="'resnet50'"):
        evaluation.penultimate_features("resnet50", None, {}, np.zeros((1, 28, 28, 1), np.uint8))
