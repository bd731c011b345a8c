"""scripts/torch_cifar_vgg.py, the PyTorch baseline of experiments.cifar_vgg: it augments as jaxvgg does,
and a short run on real CIFAR-10 writes its history and test accuracy."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxvgg import augment

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "torch_cifar_vgg.py"
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data sets not found at {SHARED_DATA}")


def _load():
    spec = importlib.util.spec_from_file_location("torch_cifar_vgg", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


def test_baseline_crop_and_flip_equal_jaxvggs_for_the_same_offsets_and_flips():
    baseline = _load()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    offsets, flips = rng.integers(0, 9, (16, 2)), rng.random(16) < 0.5
    flips[:2] = (True, False)
    ours = augment.flip_where(augment.pad_and_crop(jnp.asarray(images), jnp.asarray(offsets), 4), jnp.asarray(flips))
    theirs = baseline.crop_flip(images, offsets, flips)
    np.testing.assert_array_equal(theirs, np.asarray(ours))
    assert not np.array_equal(theirs, images)  # the crops moved the images
    # and its normalisation is jaxvgg's eval transform, in NCHW
    x = baseline.to_tensor(images).numpy().transpose(0, 2, 3, 1)
    ref = augment.eval_transform(jnp.asarray(images), augment.CIFAR10_MEAN, augment.CIFAR10_STD)
    np.testing.assert_allclose(x, np.asarray(ref), rtol=0, atol=1e-5)


def test_baseline_rejects_a_bad_flag_naming_it():
    out = _run("--epochs", "0")
    assert out.returncode == 2 and "--epochs: must be >= 1 (got 0)" in out.stderr
    assert _run("--help").returncode == 0


def test_baseline_schedule_moving_average_and_test_views_are_jaxvggs():
    import torch

    from jaxvgg import optim

    baseline = _load()
    factor = baseline.warmup_cosine(40, 0.3)
    ours = optim.make_schedule("cosine", 0.2, steps_per_epoch=10, epochs=4, warmup_fraction=0.3)
    np.testing.assert_allclose([0.2 * factor(t) for t in range(41)], [float(ours(t)) for t in range(41)], atol=1e-7)

    images = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    theirs = baseline.tta_views(images, 2)
    for (w, view), (ow, our_view) in zip(theirs, augment.tta_views(2), strict=True):
        assert w == ow
        np.testing.assert_array_equal(view, np.asarray(our_view(jnp.asarray(images))))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = baseline.EMA(model, 0.9)
    before = {k: v.detach().numpy().copy() for k, v in ema.model.state_dict().items()}
    model.train()
    model(torch.randn(4, 3))  # moves the running statistics and counts a batch
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(model, step=3)
    after = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    expected = optim.ema_update(before, after, 0.9, 3)
    for k, v in ema.model.state_dict().items():
        np.testing.assert_allclose(v.numpy(), np.asarray(expected[k]), rtol=1e-6, atol=1e-7, err_msg=k)


@needs_data
@pytest.mark.slow  # the CI budget (48 s on the Zen 3 EPYC); the recipe's pieces are checked above in CI
def test_baseline_trains_on_real_cifar10_resumes_from_its_checkpoint_and_writes_its_history(tmp_path):
    out_file, workdir = tmp_path / "torch.json", tmp_path / "run"
    flags = ("--data-dir", str(SHARED_DATA), "--limit", "300", "--batch-size", "64", "--dropout", "0", "--threads",
             "2", "--schedule", "cosine", "--warmup", "0.3", "--ema-decay", "0.9", "--workdir", str(workdir))
    first = _run(*flags, "--epochs", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert (workdir / "checkpoint.pt").is_file()
    refused = _run(*flags, "--epochs", "2")
    assert refused.returncode != 0 and "pass --resume 1" in refused.stderr
    out = _run(*flags, "--epochs", "2", "--resume", "1", "--tta", "2", "--out", str(out_file))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from" in out.stdout
    result = json.loads(out_file.read_text())
    assert [r["epoch"] for r in result["history"]] == [1, 2] and result["model"] == "vgg11_bn"
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["val_accuracy"] <= 1 for r in result["history"])
    assert 0.0 <= result["test"]["accuracy"] <= 1.0 and result["test"]["loss"] > 0
    assert 0.0 <= result["tta"]["accuracy"] <= 1.0 and "test accuracy" in out.stdout
