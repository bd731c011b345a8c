"""The epoch loop: history, checkpoints, resume after SIGKILL, NaN guard, plateau and early stopping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxvgg
from jaxvgg import augment, data, optim
from jaxvgg.train import FitConfig, TrainState, evaluate, fit
from tests import faults
from tests.test_batchnorm import small_bn_vgg

ROOT = Path(__file__).resolve().parents[1]


def _dataset(n: int, seed: int = 0) -> data.Dataset:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 60, (n, 28, 28, 1), dtype=np.uint8)
    images[np.arange(n), labels * 2, 3:20, 0] = 255  # a learnable mark: a bright row per class
    return data.Dataset(images, labels, data.MNIST_CLASSES)


def _transforms():
    norm = lambda x: augment.normalize(x, augment.MNIST_MEAN, augment.MNIST_STD)  # noqa: E731
    return (lambda key, x: augment.random_crop(key, norm(x), padding=1)), norm


def _state(lr: float = 0.05):
    model = jaxvgg.create_model("mnist_lenet")
    params = jaxvgg.init_params("mnist_lenet", jax.random.PRNGKey(0))
    return TrainState.for_model("mnist_lenet", model, params, optim.sgd(lr, 0.9, 5e-4), rng=jax.random.PRNGKey(1))


def _bn_state(lr: float = 0.05):
    """`tests.test_batchnorm.small_bn_vgg` (with dropout) on 28x28x1 digits."""
    model = small_bn_vgg(dropout_rate=0.1)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1), np.float32))
    return TrainState.create(apply_fn=model.apply, params=variables, tx=optim.sgd(lr, 0.9, 5e-4),
                             rng=jax.random.PRNGKey(1))


STATES = {"lenet": _state, "bn": _bn_state}


def test_fit_learns_writes_history_and_checkpoints(tmp_path):
    train, val = data.train_val_split(_dataset(320), 0.2, seed=0)
    train_tf, eval_tf = _transforms()
    cfg = FitConfig(epochs=3, batch_size=32, workdir=str(tmp_path), quiet=True)
    state, history = fit(_state(), train, val, cfg, train_transform=train_tf, eval_transform=eval_tf)
    assert history["epoch"]["epoch"] == [1, 2, 3]
    assert len(history["batch"]["loss"]) == 3 * (256 // 32)
    assert history["batch"]["epoch"][-1] == pytest.approx(3.0)
    assert history["epoch"]["val_loss"][-1] < history["epoch"]["val_loss"][0] - 0.3  # it learns the marks
    assert json.loads((tmp_path / "history.json").read_text()) == json.loads(json.dumps(history))
    assert sorted(os.listdir(tmp_path / "checkpoints" / "last")) == ["1", "2", "3"]
    final = evaluate(state, val, eval_tf, batch_size=48)  # 64 examples: one partial batch, padded
    assert final["accuracy"] == pytest.approx(history["epoch"]["val_accuracy"][-1])


def test_fit_refuses_to_overwrite_an_earlier_run(tmp_path):
    train, val = data.train_val_split(_dataset(64), 0.25, seed=0)
    train_tf, eval_tf = _transforms()
    cfg = FitConfig(epochs=1, batch_size=16, workdir=str(tmp_path), quiet=True)
    fit(_state(), train, val, cfg, train_transform=train_tf, eval_transform=eval_tf)
    with pytest.raises(FileExistsError, match="already holds epoch 1"):
        fit(_state(), train, val, cfg, train_transform=train_tf, eval_transform=eval_tf)


def test_nan_loss_stops_with_step_and_lr_and_keeps_earlier_checkpoints(tmp_path):
    train, val = data.train_val_split(_dataset(64), 0.25, seed=0)
    train_tf, eval_tf = _transforms()
    cfg = FitConfig(epochs=1, batch_size=16, workdir=str(tmp_path), quiet=True)
    fit(_state(0.01), train, val, cfg, train_transform=train_tf, eval_transform=eval_tf)
    poisoned = lambda key, x: train_tf(key, x) * 1e30  # noqa: E731  (overflows: the loss is inf/NaN)
    cfg = FitConfig(epochs=3, batch_size=16, workdir=str(tmp_path), resume=True, quiet=True)
    with pytest.raises(FloatingPointError, match=r"loss is (nan|-?inf) at step \d+ \(epoch 2, batch \d\), lr 0.01"):
        fit(_state(0.01), train, val, cfg, train_transform=poisoned, eval_transform=eval_tf)
    assert sorted(os.listdir(tmp_path / "checkpoints" / "last")) == ["1"]


def test_plateau_rule_divides_lr_by_ten_at_most_three_times_and_early_stopping_restores_best():
    train, val = data.train_val_split(_dataset(96), 0.5, seed=0)
    train_tf, eval_tf = _transforms()
    cfg = FitConfig(epochs=8, batch_size=16, plateau_patience=0, plateau_threshold=0.5, quiet=True)
    state, history = fit(_state(), train, val, cfg, train_transform=train_tf, eval_transform=eval_tf)
    # threshold 0.5: no epoch counts as an improvement after the first, so lr drops every epoch until 1e-3 x
    np.testing.assert_allclose(history["epoch"]["lr"], [0.05, 0.05, 5e-3, 5e-4, 5e-5, 5e-5, 5e-5, 5e-5], rtol=1e-5)

    cfg = FitConfig(epochs=30, batch_size=16, early_stopping_patience=2, quiet=True)
    state, history = fit(_state(0.5), train, val, cfg, train_transform=train_tf, eval_transform=eval_tf)
    losses = history["epoch"]["val_loss"]
    best = int(np.argmin(losses))
    assert len(losses) == best + 3  # stopped two epochs after the best one
    assert evaluate(state, val, eval_tf)["loss"] == pytest.approx(losses[best], rel=1e-5)


def test_on_step_is_called_after_every_step_with_the_metrics_its_history_holds(tmp_path):
    train, val = data.train_val_split(_dataset(200), 0.2, seed=0)  # 160 images: 5 batches of 32 an epoch
    train_tf, eval_tf = _transforms()
    calls = []
    cfg = FitConfig(epochs=2, batch_size=32, quiet=True)
    _, history = fit(_state(), train, val, cfg, train_transform=train_tf, eval_transform=eval_tf,
                     on_step=lambda epoch, batch, metrics: calls.append((epoch, batch, metrics)))
    assert [(e, b) for e, b, _ in calls] == [(e, b) for e in (1, 2) for b in range(1, 6)]
    assert [m["loss"] for _, _, m in calls] == history["batch"]["loss"]
    assert [m["lr"] for _, _, m in calls] == history["batch"]["lr"]


_RUN = textwrap.dedent("""
    import argparse, sys
    sys.path.insert(0, {root!r})
    from tests import faults
    from tests.test_fit import STATES, _dataset, _transforms
    from jaxvgg import data
    from jaxvgg.train import FitConfig, fit
    import numpy as np
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir"), parser.add_argument("kind")
    faults.add_arguments(parser)
    args = parser.parse_args()
    train, val = data.train_val_split(_dataset(800), 0.2, seed=0)  # 40 steps an epoch
    train_tf, eval_tf = _transforms()
    cfg = FitConfig(epochs=3, batch_size=16, workdir=args.workdir, resume=True, quiet=True)
    state, history = fit(STATES[args.kind](), train, val, cfg, train_transform=train_tf, eval_transform=eval_tf,
                         on_step=faults.hook_from(args))
    leaves = __import__("jax").tree_util.tree_leaves((state.params, state.batch_stats))  # BatchNorm's too
    np.savez(args.workdir + "/final.npz", *[np.asarray(x) for x in leaves])
""")


def _history_without_timing(path: Path) -> dict:
    history = json.loads(path.read_text())
    for key in ("time_s", "images_per_s"):
        history["epoch"].pop(key)
    return history


# the CI budget: LeNet's kill stays in CI, the BatchNorm VGG's (54 s on the Zen 3 EPYC) runs with the slow tests
@pytest.mark.parametrize("kind", ["lenet", pytest.param("bn", marks=pytest.mark.slow)])
def test_sigkill_mid_epoch_then_resume_gives_the_same_run(tmp_path, kind):
    """LeNet, and a VGG with BatchNorm, whose running statistics must resume exactly too: killed at batch 20
    of epoch 2's 40 (the child signals it reached it and waits), resumed from epoch 1's checkpoint."""
    script = tmp_path / "run.py"
    script.write_text(_RUN.format(root=str(ROOT)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run([sys.executable, str(script), str(reference), kind], check=True, env=env, capture_output=True)

    faults.kill_at([sys.executable, str(script), str(killed), kind], 2, 20, env)
    assert not (killed / "final.npz").exists()
    assert (killed / "checkpoints" / "last" / "1").exists()
    assert not (killed / "checkpoints" / "last" / "2").exists()

    subprocess.run([sys.executable, str(script), str(killed), kind], check=True, env=env, capture_output=True)
    with np.load(reference / "final.npz") as a, np.load(killed / "final.npz") as b:
        # LeNet: 5 layers' kernels and biases; the BN VGG: 14 parameters and 2 x 3 batch_stats
        assert len(a.files) == len(b.files) == {"lenet": 10, "bn": 20}[kind]
        for k in a.files:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert _history_without_timing(reference / "history.json") == _history_without_timing(killed / "history.json")


def test_write_json_replaces_whole_files_and_leaves_the_old_one_on_failure(tmp_path):
    from jaxvgg.checkpoint import write_json

    path = write_json(tmp_path / "summary.json", {"test_accuracy": 0.5})
    assert json.loads(path.read_text()) == {"test_accuracy": 0.5}
    write_json(path, {"test_accuracy": 0.75, "per_class": [1, 2]})
    assert json.loads(path.read_text()) == {"test_accuracy": 0.75, "per_class": [1, 2]}
    with pytest.raises(ValueError):  # NaN is not JSON: nothing written, the earlier file intact
        write_json(path, {"test_accuracy": float("nan")}, allow_nan=False)
    assert json.loads(path.read_text())["test_accuracy"] == 0.75
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary left behind
