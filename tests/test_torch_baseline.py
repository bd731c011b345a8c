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


@needs_data
def test_baseline_trains_on_real_cifar10_and_writes_its_history(tmp_path):
    out_file = tmp_path / "torch.json"
    out = _run("--data-dir", str(SHARED_DATA), "--limit", "300", "--epochs", "2", "--batch-size", "64",
               "--dropout", "0", "--threads", "2", "--out", str(out_file))
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out_file.read_text())
    assert [r["epoch"] for r in result["history"]] == [1, 2] and result["model"] == "vgg11_bn"
    assert all(np.isfinite(r["train_loss"]) and 0 <= r["val_accuracy"] <= 1 for r in result["history"])
    assert 0.0 <= result["test"]["accuracy"] <= 1.0 and result["test"]["loss"] > 0
    assert "test accuracy" in out.stdout
