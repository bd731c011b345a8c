"""Smoke runs of experiments.cifar_cnn and experiments.vgg16_transfer on small real subsets (../shared/data),
and the pieces of the transfer experiment that can be checked in-process."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
from pathlib import Path

import jax
import numpy as np
import pytest

import jaxvgg
from experiments import vgg16_transfer
from jaxvgg import data, models
from jaxvgg.models import parameter_table

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data sets not found at {SHARED_DATA}")

# The tutorial prints 135,335,076 total / 1,074,532 trainable for 100 classes (parity_tests/test_forward.py);
# the head's last Linear(256, n) has 257 parameters per class, so 3 classes give 97 * 257 fewer.
VGG16_TRANSFER_3_CLASSES = (135_335_076 - 97 * 257, 1_074_532 - 97 * 257)  # (135,310,147, 1,049,603)
CLASSES = ("airplane", "automobile", "bird")
IMAGES_PER_CLASS = 8


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_parameter_table_lists_every_cifar_cnn_layer_and_sums_to_537610():
    shapes = jax.eval_shape(lambda: jaxvgg.init_params("cifar_cnn", jax.random.key(0)))
    rows = parameter_table(shapes)
    assert [name for name, _, _ in rows][:2] == ["conv1/bias", "conv1/kernel"]
    assert ("fc1/kernel", (1024, 128), 131_072) in rows
    assert sum(count for _, _, count in rows) == 537_610  # the tutorial's count (parity_tests/test_forward.py)


@needs_data
def test_cifar_cnn_one_epoch_smoke_run_writes_metrics_and_plots(tmp_path):
    workdir = tmp_path / "run"
    out = _run("experiments.cifar_cnn", "--data-dir", str(SHARED_DATA), "--limit", "300", "--epochs", "1",
               "--workdir", str(workdir), "--quiet", "true")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "conv3/kernel" in out.stdout and "537,610" in out.stdout  # the parameter table and its total
    summary = json.loads((workdir / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_loss"] > 0
    assert summary["n_examples"] == 300 and summary["parameters"] == 537_610
    assert set(summary["f1"]) == {"micro", "macro"}
    assert summary["f1"]["micro"] == pytest.approx(summary["test_accuracy"])  # single-label: micro F1 = accuracy
    assert 0.0 <= summary["cat_auc"] <= 1.0
    assert summary["one_vs_rest_auc"]["cat"] == pytest.approx(summary["cat_auc"])
    assert len(summary["one_vs_rest_auc"]) == 10 and np.sum(summary["confusion_matrix"]) == 300
    roc = json.loads((workdir / "roc_cat.json").read_text())
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
    for name in ("config.json", "history.json", "loss_moving_mean.png", "history.png", "confusion_matrix.png",
                 "roc_cat.png", "roc_all_classes.png", "report.md"):
        assert (workdir / name).stat().st_size > 0, name


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory) -> tuple[Path, tuple]:
    """One epoch of the CIFAR CNN in bfloat16 on 300 images, for the tests below: (its workdir, its flags)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    workdir = tmp_path_factory.mktemp("bf16") / "run"
    common = ("--data-dir", str(SHARED_DATA), "--limit", "300", "--workdir", str(workdir), "--quiet", "true")
    out = _run("experiments.cifar_cnn", *common, "--epochs", "1", "--precision", "bf16")
    assert out.returncode == 0, out.stdout + out.stderr
    return workdir, common


@pytest.mark.slow  # the CI budget on the Zen 3 EPYC (22 s); bf16 numerics stay in CI (parity_tests/test_bf16.py)
def test_cifar_cnn_in_bf16_records_its_precision(bf16_run):
    workdir, _ = bf16_run
    config = json.loads((workdir / "config.json").read_text())
    summary = json.loads((workdir / "summary.json").read_text())
    for record in (config, summary):
        assert record["precision"] == "bf16" and record["policy"]["dtype"] == "bfloat16"
    assert config["policy"]["gemm"] == "xla"  # MKL's products are float32 ones


@pytest.mark.slow  # the CI budget: the bf16 run's first epoch (the test above) stays in CI
def test_cifar_cnn_in_bf16_resumes_to_a_second_epoch(bf16_run):
    """History and checkpoints work as in float32: resume continues the run to epoch 2."""
    workdir, common = bf16_run
    out = _run("experiments.cifar_cnn", *common, "--epochs", "2", "--precision", "bf16", "--resume", "true")
    assert out.returncode == 0, out.stdout + out.stderr
    history = json.loads((workdir / "history.json").read_text())
    assert history["epoch"]["epoch"] == [1, 2] and all(np.isfinite(history["batch"]["loss"]))


def test_cifar_cnn_run_in_bf16_refuses_to_resume_in_float32(bf16_run):
    """A run is one precision: resuming it in float32 is refused before any work."""
    workdir, common = bf16_run
    out = _run("experiments.cifar_cnn", *common, "--epochs", "3", "--precision", "fp32", "--resume", "true")
    assert out.returncode == 2 and "precision: 'bf16' -> 'fp32'" in out.stderr, out.stderr


# --- VGG16 transfer ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def transfer_inputs(tmp_path_factory):
    """A flat <class>/ folder of 3 x 8 real CIFAR-10 test images (PNG) and a random torchvision VGG16 .pth."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA}")
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    from PIL import Image

    root = tmp_path_factory.mktemp("transfer")
    test = data.load_cifar10(SHARED_DATA)["test"]
    for name in CLASSES:
        folder = root / "flat" / name
        folder.mkdir(parents=True)
        for i in np.flatnonzero(test.labels == data.CIFAR10_CLASSES.index(name))[:IMAGES_PER_CLASS]:
            Image.fromarray(test.images[i]).save(folder / f"{i:05d}.png")
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), root / "vgg16.pth")
    torch.save(torchvision.models.vgg11_bn(weights=None).state_dict(), root / "vgg11_bn.pth")
    return root


def test_vgg16_transfer_cached_features_smoke_run(transfer_inputs, tmp_path):
    workdir, split = tmp_path / "run", tmp_path / "split"
    out = _run("experiments.vgg16_transfer", "--split-from", str(transfer_inputs / "flat"), "--data-root", str(split),
               "--weights", str(transfer_inputs / "vgg16.pth"), "--cache-features", "true", "--epochs", "1",
               "--batch-size", "4", "--workdir", str(workdir), "--quiet", "true")
    assert out.returncode == 0, out.stdout + out.stderr
    total, trainable = VGG16_TRANSFER_3_CLASSES
    assert f"{total:,} parameters, {trainable:,} trainable" in out.stdout
    for name, per_class in (("train", 4), ("valid", 2), ("test", 2)):  # 50/25/25 of 8 images per class
        assert sorted(p.name for p in (split / name).iterdir()) == list(CLASSES)
        assert all(len(list((split / name / c).iterdir())) == per_class for c in CLASSES), name
    summary = json.loads((workdir / "summary.json").read_text())
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_loss"] > 0
    assert summary["top_k_accuracy"] == 1.0 and summary["top_k"] == 3  # 3 classes: top-3 always hits
    assert summary["n_examples"] == 6 and summary["cached_features"] is True
    assert (summary["parameters"], summary["trainable_parameters"]) == VGG16_TRANSFER_3_CLASSES
    for name in ("history.json", "history.png", "confusion_matrix.png", "per_class_vs_count.png",
                 "topk_predictions.png", "report.md"):
        assert (workdir / name).stat().st_size > 0, name


@pytest.mark.slow  # the CI budget: the cached-features vgg16_transfer smoke run stays in CI
def test_vgg16_transfer_takes_another_torchvision_vgg_with_arch(transfer_inputs, tmp_path):
    """--arch vgg11_bn: torchvision's VGG11-BN backbone, BatchNorm statistics and all; the wrong weights for
    the arch are one line naming --weights."""
    workdir, split = tmp_path / "run", tmp_path / "split"
    common = ["--data-root", str(split), "--cache-features", "true", "--epochs", "1", "--batch-size", "4",
              "--quiet", "true", "--arch", "vgg11_bn"]
    out = _run("experiments.vgg16_transfer", *common, "--split-from", str(transfer_inputs / "flat"),
               "--weights", str(transfer_inputs / "vgg11_bn.pth"), "--workdir", str(workdir))
    assert out.returncode == 0, out.stdout + out.stderr
    # torchvision vgg11_bn's 132,868,840 less classifier.6 (4096 x 1000 + 1000), plus the 3-class head
    head = 4096 * 256 + 256 + 256 * 3 + 3
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["arch"] == "vgg11_bn"
    assert (summary["parameters"], summary["trainable_parameters"]) == (132_868_840 - 4_097_000 + head, head)
    out = _run("experiments.vgg16_transfer", *common, "--weights", str(transfer_inputs / "vgg16.pth"),
               "--workdir", str(tmp_path / "wrong"))  # the split made above
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    line = out.stderr.strip().splitlines()
    assert len(line) == 1 and line[0].startswith("error: --weights: not a torchvision vgg11_bn state_dict"), line


@pytest.mark.slow
def test_vgg16_transfer_full_model_smoke_run_with_tta(transfer_inputs, tmp_path):
    """train/ and valid/ stream from disk, decoded in a grain worker process."""
    split = tmp_path / "split"
    data.split_image_folder(transfer_inputs / "flat", split, seed=0)
    workdir = tmp_path / "run"
    out = _run("experiments.vgg16_transfer", "--data-root", str(split), "--weights", str(transfer_inputs / "vgg16.pth"),
               "--limit", "4", "--epochs", "1", "--batch-size", "2", "--tta", "2", "--workdir", str(workdir),
               "--quiet", "true", "--workers", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["n_examples"] == 4 and summary["cached_features"] is False
    assert summary["tta_views"] == 2 and 0.0 <= summary["tta_accuracy"] <= 1.0 and summary["tta_loss"] > 0


@pytest.fixture(scope="module")
def small_transfer_model():
    """vgg16_transfer (3 classes) with 64-wide hidden layers at 32x32: the same code path at a fraction of the cost."""
    model = jaxvgg.create_model("vgg16_transfer", 3, hidden=64)
    params = jaxvgg.init_params("vgg16_transfer", jax.random.PRNGKey(0), 3, (32, 32, 3), hidden=64)
    return model, params["params"]


def test_transfer_head_on_classifier_4_features_equals_the_full_model(small_transfer_model):
    model, params = small_transfer_model
    images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
    full, acts = models.layer_outputs(model, {"params": params}, images)
    head = jaxvgg.create_model("transfer_head", 3)
    head_params = {k: v for k, v in params.items() if k.startswith(models.TRANSFER_PREFIX)}
    head_shapes = jax.eval_shape(head.init, jax.random.PRNGKey(2), acts["classifier_4"])["params"]
    assert jax.tree_util.tree_map(np.shape, head_shapes) == jax.tree_util.tree_map(np.shape, head_params)
    out = head.apply({"params": head_params}, acts["classifier_4"])
    diff = float(np.max(np.abs(np.asarray(out) - np.asarray(full))))
    assert diff < 1e-5, f"max |head(features) - full model| = {diff}"  # float32, same ops in the same order


def test_transfer_head_starts_from_the_tutorial_s_torch_default_init():
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, as torch's nn.Linear, not flax's lecun normal."""
    params = jaxvgg.init_params("transfer_head", jax.random.PRNGKey(0), 10)["params"]
    for layer, fan_in in (("classifier_6_0", 4096), ("classifier_6_3", 256)):
        bound = 1 / np.sqrt(fan_in)
        kernel, bias = np.asarray(params[layer]["kernel"]), np.asarray(params[layer]["bias"])
        assert 0.99 * bound < np.abs(kernel).max() <= bound, layer  # uniform up to the bound (lecun normal passes it)
        assert 0 < np.abs(bias).max() <= bound, layer  # flax's default bias would be zeros


def test_transplant_copies_all_but_the_head_and_names_a_wrong_shape(small_transfer_model):
    _, fresh = small_transfer_model
    pretrained = jax.tree_util.tree_map(lambda x: np.full(np.shape(x), 7.0, np.float32), fresh)
    pretrained["classifier_6"] = {"kernel": np.zeros((64, 1000)), "bias": np.zeros(1000)}  # torchvision's head
    for layer in [k for k in pretrained if k.startswith("classifier_6_")]:
        del pretrained[layer]
    merged = jaxvgg.transplant(pretrained, fresh, keep=(models.TRANSFER_PREFIX,))
    assert set(merged) == set(fresh)
    assert float(merged["features_0"]["kernel"][0, 0, 0, 0]) == 7.0
    assert merged["classifier_6_3"]["kernel"] is fresh["classifier_6_3"]["kernel"]  # the head keeps its init
    pretrained["features_0"] = {"kernel": np.zeros((3, 3, 3, 32)), "bias": np.zeros(64)}
    with pytest.raises(ValueError, match=r"features_0/kernel: expected shape \(3, 3, 3, 64\), found \(3, 3, 3, 32\)"):
        jaxvgg.transplant(pretrained, fresh, keep=(models.TRANSFER_PREFIX,))
    del pretrained["features_0"]
    with pytest.raises(ValueError, match="missing layer 'features_0'"):
        jaxvgg.transplant(pretrained, fresh, keep=(models.TRANSFER_PREFIX,))


def test_missing_weights_offline_tells_the_user_to_pass_weights(monkeypatch):
    pytest.importorskip("torchvision")
    from torchvision.models import VGG16_Weights

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(VGG16_Weights, "get_state_dict", offline)
    with pytest.raises(FileNotFoundError, match="pass --weights"):
        vgg16_transfer.pretrained_state_dict(None, quiet=True)


def test_tta_averages_probabilities_over_augmented_views():
    model = jaxvgg.create_model("cifar_cnn")
    params = jaxvgg.init_params("cifar_cnn", jax.random.PRNGKey(0))["params"]
    rng = np.random.default_rng(0)
    dataset = data.Dataset(rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), np.arange(5) % 2, ("a",) * 10)

    def shift(key, images):  # a random brightness per batch: views differ, the mean is of real probabilities
        return images / 255.0 + jax.random.uniform(key)

    probs = vgg16_transfer.tta_probabilities(model, params, dataset, shift, views=3, seed=0, batch_size=2, quiet=True)
    assert probs.shape == (5, 10) and np.allclose(probs.sum(axis=1), 1.0)
    one = vgg16_transfer.tta_probabilities(model, params, dataset, shift, views=1, seed=0, batch_size=2, quiet=True)
    assert not np.allclose(one, probs)  # more views change the average
    again = vgg16_transfer.tta_probabilities(model, params, dataset, shift, views=3, seed=0, batch_size=2, quiet=True)
    np.testing.assert_array_equal(again, probs)  # seeded
