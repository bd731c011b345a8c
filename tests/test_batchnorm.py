"""BatchNorm with PyTorch's semantics, the VGG family's registry and conversion, and batch_stats in every
piece of state: train/eval steps, prediction, the LR range test, data parallelism.

(Parity against torch in training mode is in parity_tests/test_batchnorm.py; resume after SIGKILL with
BatchNorm statistics in tests/test_fit.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvgg
from jaxvgg import convert, data, layers, lr_finder, models, optim, train
from jaxvgg.train import TrainState, eval_step, train_step

REPO_ROOT = Path(__file__).resolve().parents[1]

# torchvision.models docs, each VGG*_Weights.IMAGENET1K_V1 "num_params" (1000 classes)
TORCHVISION_PARAMS = {"vgg11": 132_863_336, "vgg11_bn": 132_868_840, "vgg13": 133_047_848,
                      "vgg13_bn": 133_053_736, "vgg16": 138_357_544, "vgg16_bn": 138_365_992,
                      "vgg19": 143_667_240, "vgg19_bn": 143_678_248}


def small_bn_vgg(dropout_rate: float = 0.0) -> models.VGG:
    """conv8-BN-ReLU-pool, conv16-BN-ReLU-pool, a 32-32-10 head: VGG's code path at a test's size."""
    return models.VGG(cfg=(8, "M", 16, "M"), batch_norm=True, num_classes=10, hidden=32, dropout_rate=dropout_rate)


def _images(n: int = 8, side: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, side, side, 3)).astype(np.float32) * 2 + 0.5


# --- the layer ---------------------------------------------------------------------------------

def test_batchnorm_training_normalises_by_the_biased_variance_and_stores_the_unbiased_one():
    x = _images()
    bn = layers.BatchNorm2d()
    variables = bn.init(jax.random.key(0), x)
    scale, bias = np.linspace(0.5, 1.5, 3, dtype=np.float32), np.array([0.1, -0.2, 0.3], np.float32)
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": np.array([1.0, 2.0, 3.0], np.float32),
                                 "var": np.array([2.0, 1.0, 0.5], np.float32),
                                 "num_batches_tracked": np.array(5, np.int32)}}
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])

    x64 = x.astype(np.float64)
    mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))  # numpy's var: biased
    n = x.size // 3
    expected = (x64 - mean) / np.sqrt(var + 1e-5) * scale + bias
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    stats = updates["batch_stats"]
    np.testing.assert_allclose(stats["mean"], 0.9 * np.array([1.0, 2.0, 3.0]) + 0.1 * mean, rtol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 * np.array([2.0, 1.0, 0.5]) + 0.1 * var * n / (n - 1), rtol=1e-6)
    assert int(stats["num_batches_tracked"]) == 6


def test_batchnorm_evaluation_uses_the_running_statistics_and_changes_nothing():
    x = _images()
    bn = layers.BatchNorm2d()
    variables = {"params": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)},
                 "batch_stats": {"mean": np.array([1.0, 2.0, 3.0], np.float32),
                                 "var": np.array([4.0, 1.0, 0.25], np.float32),
                                 "num_batches_tracked": np.array(0, np.int32)}}
    y = bn.apply(variables, x)  # batch_stats not mutable: evaluation mode reads them only
    np.testing.assert_allclose(y, (x - [1.0, 2.0, 3.0]) / np.sqrt(np.array([4.0, 1.0, 0.25]) + 1e-5), rtol=1e-5,
                               atol=1e-6)


def test_batchnorm_in_bfloat16_keeps_float32_statistics_and_returns_bfloat16():
    x = _images()
    bn = layers.BatchNorm2d(policy=jaxvgg.Policy(dtype="bfloat16"))
    variables = bn.init(jax.random.key(0), x)
    y, updates = bn.apply(variables, x.astype(jnp.bfloat16), train=True, mutable=["batch_stats"])
    assert y.dtype == jnp.bfloat16
    assert updates["batch_stats"]["mean"].dtype == updates["batch_stats"]["var"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32).mean(axis=(0, 1, 2)), 0.0, atol=2e-2)


# --- registry and conversion -------------------------------------------------------------------------

def test_the_family_is_in_the_registry_with_torchvisions_parameter_counts():
    names = set(jaxvgg.list_models())
    for arch, count in TORCHVISION_PARAMS.items():
        assert {arch, f"{arch}_torchvision"} <= names
        shapes = convert.expected_param_shapes(f"{arch}_torchvision")
        assert sum(int(np.prod(s)) for s in shapes.values()) == count, arch
        # the paper's head at 224x224 flattens 7x7x512 too: the same parameters
        assert sum(int(np.prod(s)) for s in convert.expected_param_shapes(arch).values()) == count, arch


def test_dropout_rate_is_a_create_model_keyword_of_every_vgg():
    for name in (n for n in jaxvgg.list_models() if n.startswith("vgg")):
        assert jaxvgg.create_model(name, dropout_rate=0.25).dropout_rate == 0.25


@pytest.mark.parametrize("arch", list(TORCHVISION_PARAMS))
def test_every_torchvision_vgg_state_dict_loads_unchanged_and_round_trips_bit_exactly(arch):
    torchvision = pytest.importorskip("torchvision")
    import torch
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[arch]
    variables = jaxvgg.from_torch(f"{arch}_torchvision", state)
    assert ("batch_stats" in variables) == arch.endswith("_bn")
    back = jaxvgg.to_torch(f"{arch}_torchvision", variables)
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and np.array_equal(back[k], v), k


def test_a_state_dict_without_num_batches_tracked_loads_with_zero_as_torch_does():
    kw = dict(num_classes=10, input_shape=(32, 32, 3))
    state = jaxvgg.to_torch("vgg11_bn", jaxvgg.init_params("vgg11_bn", jax.random.key(0), 10, (32, 32, 3)))
    assert state["features.1.num_batches_tracked"].dtype == np.int64  # torch's dtype for the counter
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    loaded = jaxvgg.from_torch("vgg11_bn", state, **kw)
    assert int(loaded["batch_stats"]["features_1"]["num_batches_tracked"]) == 0
    np.testing.assert_array_equal(loaded["batch_stats"]["features_1"]["var"], np.ones(64))
    del state["features.5.running_var"]  # a missing statistic is an error, named with its shape
    with pytest.raises(ValueError, match=r"missing key 'features.5.running_var' \(expected shape \(128,\)\)"):
        jaxvgg.from_torch("vgg11_bn", state, **kw)


def test_a_bn_state_dict_into_a_plain_vgg_names_the_batchnorm_keys():
    torchvision = pytest.importorskip("torchvision")
    state = torchvision.models.vgg11_bn(weights=None).state_dict()
    with pytest.raises(ValueError, match="BatchNorm buffers") as info:
        jaxvgg.from_torch("vgg11_torchvision", state)
    assert "unexpected key 'features.1.running_mean' (shape (64,))" in str(info.value)


def test_transfer_arch_gives_vgg16_transfer_any_torchvision_backbone():
    assert models.transfer_arch("vgg16") == {"cfg": models.VGG_CFGS["D"], "batch_norm": False}
    assert models.transfer_arch("vgg11_bn") == {"cfg": models.VGG_CFGS["A"], "batch_norm": True}
    shapes = convert.expected_param_shapes("vgg16_transfer", **models.transfer_arch("vgg19_bn"))
    assert ("features_1", "scale") in shapes and ("classifier_6_3", "kernel") in shapes
    with pytest.raises(ValueError, match="unknown VGG architecture 'vgg12'"):
        models.transfer_arch("vgg12")


# --- state: steps, prediction, LR range test ---------------------------------------------------------

def _state(lr: float = 0.05) -> TrainState:
    model = small_bn_vgg()
    variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))
    return TrainState.create(apply_fn=model.apply, params=variables, tx=optim.sgd(lr, 0.9), rng=jax.random.key(1))


def _batch(n: int = 8, seed: int = 0) -> dict:
    return {"image": _images(n, seed=seed), "label": np.arange(n, dtype=np.int32) % 10}


def test_train_step_moves_the_running_statistics_and_eval_step_reads_them():
    state = _state()
    assert set(state.variables) == {"params", "batch_stats"}
    new, _ = jax.jit(train_step)(state, _batch())
    before, after = state.batch_stats["features_1"], new.batch_stats["features_1"]
    assert int(after["num_batches_tracked"]) == 1
    assert np.abs(np.asarray(after["mean"]) - np.asarray(before["mean"])).max() > 1e-3
    # evaluation normalises with the running statistics: other outputs than the training-mode forward
    outputs_eval = new.apply_fn(new.variables, _batch()["image"])
    outputs_train, _ = new.apply_fn(new.variables, _batch()["image"], train=True, mutable=["batch_stats"])
    gap = np.abs(np.asarray(outputs_eval) - np.asarray(outputs_train)).max()
    assert gap > 0.02 * np.abs(np.asarray(outputs_train)).max()  # (VGG's N(0, 0.01) head makes outputs small)
    sums = jax.jit(eval_step)(new, _batch())
    assert float(sums["count"]) == 8
    # and it is what predict returns
    dataset = data.Dataset(np.zeros((8, 8, 8, 3), np.uint8), np.zeros(8, np.int32), tuple("abcdefghij"))
    predicted = train.predict(new, dataset, lambda x: x.astype(jnp.float32), batch_size=4)
    np.testing.assert_allclose(predicted, new.apply_fn(new.variables, jnp.zeros((8, 8, 8, 3))), rtol=1e-5, atol=1e-6)


def test_lr_range_test_leaves_the_callers_batch_stats_as_they_were():
    state = _state()
    before = jax.tree_util.tree_map(np.array, state.batch_stats)
    rng = np.random.default_rng(0)
    dataset = data.Dataset(rng.integers(0, 256, (64, 8, 8, 3), dtype=np.uint8), rng.integers(0, 10, 64),
                           tuple("abcdefghij"))
    state = state.replace(opt_state=optim.sgd(1e-3, 0.9).init(state.params))
    result = lr_finder.lr_range_test(state, dataset, transform=lambda k, x: x.astype(jnp.float32) / 255.0,
                                     batch_size=8, num_steps=6, quiet=True)
    assert len(result.lrs) == 6
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state.batch_stats)):
        np.testing.assert_array_equal(a, np.asarray(b))


# --- several devices: the global batch's statistics ----------------------------------------------------

TWO_DEVICE_SCRIPT = r"""
import json
import jax
import numpy as np
from jaxvgg import optim, parallel
from jaxvgg.train import TrainState, train_step
from tests.test_batchnorm import _batch, _state

def run(n, batch):
    mesh = parallel.make_mesh(n)
    state = parallel.replicate(_state(), mesh)
    step = parallel.compile_step(train_step, state.policy, "train", mesh)
    state, _ = step(state, parallel.shard_batch(batch, mesh))
    return jax.device_get((state.params, state.batch_stats))

def diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))

batch = _batch(16)
one, two = run(1, batch), run(2, batch)
half = run(1, {k: v[:8] for k, v in batch.items()})  # what one device's own statistics would be
print(json.dumps({"devices": jax.device_count(), "params": diff(one[0], two[0]), "stats": diff(one[1], two[1]),
                  "stats_of_half": diff(one[1], half[1])}))
"""


def test_two_device_steps_use_the_global_batch_statistics_like_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCRIPT], env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"1 vs 2 devices: params max |Δ| {report['params']:.3g}, batch_stats {report['stats']:.3g}; "
          f"statistics of half the batch differ by {report['stats_of_half']:.3g}")
    assert report["devices"] == 2
    assert report["params"] <= 1e-5 and report["stats"] <= 1e-5
    assert report["stats_of_half"] > 1e-2  # per-device statistics would have been visibly different
