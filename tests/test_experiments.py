"""One-epoch smoke runs of every experiment entry point on small real subsets (../shared/data)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data sets not found at {SHARED_DATA}")


def _run(module: str, *args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env=env)


QUICK_LOOK = "python -m experiments.cifar_vgg --limit 512 --epochs 1"  # the docstring's quick look


@pytest.fixture(scope="module")
def quick_look(tmp_path_factory) -> tuple[Path, dict]:
    """The cifar_vgg quick look, run once for the tests below: (its folder, the environment it ran in)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    folder = tmp_path_factory.mktemp("quick_look")
    env = {**os.environ, "JAXVGG_DATA_DIR": str(SHARED_DATA), "PYTHONPATH": str(ROOT)}
    out = _run("experiments.cifar_vgg", *QUICK_LOOK.split()[3:], cwd=folder, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return folder, env


def test_cifar_vgg_quick_look_of_its_docstring_runs_as_shown(quick_look):
    """``python -m experiments.cifar_vgg --limit 512 --epochs 1``, exactly (3 steps of the default one-cycle
    schedule, the data from $JAXVGG_DATA_DIR), leaves every file its docstring names."""
    assert QUICK_LOOK in importlib.import_module("experiments.cifar_vgg").__doc__
    workdir = quick_look[0] / "runs" / "cifar_vgg"
    summary = json.loads((workdir / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_loss"] > 0
    assert summary["n_examples"] == 512 and summary["policy"]["forms"] in ("cpu", "native")
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0
    assert len(json.loads((workdir / "history.json").read_text())["batch"]["lr"]) == 3
    assert set(summary["superclass"]["within_group_error_fraction"]) == {"vehicle", "animal"}
    for name in ("config.json", "history.json", "history.png", "confusion_matrix.png", "test_samples.png",
                 "report.md"):
        assert (workdir / name).stat().st_size > 0, name
    assert (workdir / "checkpoints" / "last" / "1").is_dir()


@pytest.mark.slow  # the CI budget on the Zen 3 EPYC (23 s)
def test_cifar_vgg_resumed_after_its_last_epoch_only_reevaluates(quick_look):
    folder, env = quick_look
    again = _run("experiments.cifar_vgg", "--limit", "512", "--epochs", "1", "--quiet", "true", "--resume", "true",
                 cwd=folder, env=env)
    assert again.returncode == 0, again.stderr
    assert "resumed" in again.stdout + again.stderr
    history = json.loads((folder / "runs" / "cifar_vgg" / "history.json").read_text())
    assert len(history["batch"]["lr"]) == 3  # no step trained again


def test_vgga_transfer_trains_a_new_head_on_the_quick_looks_vgga(quick_look, tmp_path):
    """Its VGG-A as a frozen backbone: a new head on MNIST (the real transfer run of the README, in small)."""
    transfer = tmp_path / "transfer"
    out = _run("experiments.vgga_transfer", "--backbone", str(quick_look[0] / "runs" / "cifar_vgg"), "--data-dir",
               str(SHARED_DATA / "mnist"), "--limit", "200", "--epochs", "1", "--batch-size", "32", "--workdir",
               str(transfer), "--quiet", "true")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((transfer / "summary.json").read_text())
    assert summary["backbone_epoch"] == 1 and summary["backbone_checkpoint"] == "best"
    assert summary["trainable_parameters"] == 4096 * 256 + 256 + 256 * 10 + 10
    assert 0.0 <= summary["test_accuracy"] <= summary["top5_accuracy"] <= 1.0 and summary["n_examples"] == 200
    for name in ("history.png", "confusion_matrix.png", "report.md"):
        assert (transfer / name).stat().st_size > 0, name
    assert summary["layer"] == "classifier_4" and summary["feature_width"] == 4096


@pytest.mark.slow  # the CI budget on the Zen 3 EPYC (22 s); the classifier.4 head's run stays in CI
def test_vgga_transfer_layer_puts_the_head_on_block_4s_max_pool(quick_look, tmp_path):
    """--layer features_15: the head on block 4's max-pool (2x2x512, flattened) instead of classifier.4."""
    on_conv = tmp_path / "transfer_conv"
    out = _run("experiments.vgga_transfer", "--backbone", str(quick_look[0] / "runs" / "cifar_vgg"), "--data-dir",
               str(SHARED_DATA / "mnist"), "--limit", "200", "--epochs", "1", "--batch-size", "32", "--workdir",
               str(on_conv), "--quiet", "true", "--layer", "features_15")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((on_conv / "summary.json").read_text())
    assert summary["layer"] == "features_15" and summary["feature_width"] == 2 * 2 * 512
    assert summary["trainable_parameters"] == 2048 * 256 + 256 + 256 * 10 + 10


def test_vgga_transfer_names_a_missing_backbone(tmp_path):
    out = _run("experiments.vgga_transfer", "--backbone", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "w"))
    assert out.returncode == 2
    assert "nowhere" in out.stderr and "experiments.cifar_vgg" in out.stderr


@pytest.mark.slow  # the CI budget: VGG11-BN's CLI path; its BN training and resume are tested in CI elsewhere
@needs_data
def test_cifar_vgg_trains_a_batchnorm_vgg_and_its_running_statistics_reach_the_transfer(tmp_path):
    """``--model vgg11_bn`` in bfloat16: the checkpoint carries batch_stats, and vgga_transfer's frozen
    backbone normalises with them."""
    from jaxvgg.checkpoint import Checkpoints

    env = {**os.environ, "JAXVGG_DATA_DIR": str(SHARED_DATA), "PYTHONPATH": str(ROOT)}
    workdir = tmp_path / "bn"
    out = _run("experiments.cifar_vgg", "--model", "vgg11_bn", "--limit", "256", "--epochs", "1", "--batch-size",
               "64", "--precision", "bf16", "--workdir", str(workdir), "--quiet", "true", cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["model"] == "vgg11_bn" and summary["parameters"] == 28_149_514  # vgg11's 28,144,010 + 2 x 2,752
    assert "VGG11-BN" in (workdir / "report.md").read_text()
    checkpoints = Checkpoints(workdir / "checkpoints", keep=1, best_metric="val_accuracy")
    variables, meta = checkpoints.restore_variables()
    checkpoints.close()
    assert meta["epoch"] == 1 and set(variables) == {"params", "batch_stats"}
    steps = len(json.loads((workdir / "history.json").read_text())["batch"]["step"])
    assert int(variables["batch_stats"]["features_1"]["num_batches_tracked"]) == steps == 3  # 230 images // 64

    transfer = tmp_path / "transfer"
    out = _run("experiments.vgga_transfer", "--backbone", str(workdir), "--data-dir", str(SHARED_DATA / "mnist"),
               "--limit", "200", "--epochs", "1", "--batch-size", "32", "--workdir", str(transfer), "--quiet", "true")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads((transfer / "summary.json").read_text())["backbone_model"] == "vgg11_bn"
    out = _run("experiments.vgga_transfer", "--backbone", str(workdir), "--data-dir", str(SHARED_DATA / "mnist"),
               "--layer", "features_15", "--workdir", str(tmp_path / "refused"))
    assert out.returncode == 2 and out.stderr.strip().startswith("error: --layer: the features_* choices are VGG-A's")


def test_cifar_vgg_hidden_sets_the_width_of_both_hidden_linear_layers():
    """--hidden 512: the 512 -> 512 -> 512 -> 10 head of many CIFAR VGG ports, in place of the paper's 4096-wide one."""
    from experiments import cifar_vgg
    from jaxvgg.policy import Policy

    state = cifar_vgg.build_state(cifar_vgg.Config(model="vgg11_bn", hidden=512), 10, Policy())
    shapes = {k: v["kernel"].shape for k, v in state.params.items() if k.startswith("classifier")}
    assert shapes == {"classifier_0": (512, 512), "classifier_3": (512, 512), "classifier_6": (512, 10)}
