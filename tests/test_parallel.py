"""Data parallelism: a 2-device mesh trains exactly like one device; padding and batch-size checks.

A CPU host exposes several devices only if ``XLA_FLAGS`` is set before jax is imported, so the
multi-device checks run in one subprocess that prints a JSON report the tests below read.
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

from jaxvgg import data, parallel

REPO_ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5  # float32: the 2-device all-reduce adds per-device partial sums in another order

TWO_DEVICE_SCRIPT = r"""
import json
import jax
import jax.numpy as jnp
import numpy as np
import jaxvgg
from jaxvgg import data, optim, parallel
from jaxvgg.train import TrainState, eval_step, train_step

NAME, STEPS, BATCH = "mnist_lenet", 5, 8
model = jaxvgg.create_model(NAME)
params = jaxvgg.init_params(NAME, jax.random.key(0))
rng = np.random.default_rng(0)
batches = [{"image": rng.standard_normal((BATCH, 28, 28, 1)).astype(np.float32),
            "label": rng.integers(0, 10, BATCH).astype(np.int32)} for _ in range(STEPS)]


def fresh_state():
    # a new state per run: the step donates its input buffers
    tx = optim.sgd(0.05, momentum=0.9, weight_decay=5e-4)
    return TrainState.for_model(NAME, model, params, tx, rng=jax.random.key(0))


def run(num_devices):
    mesh = parallel.make_mesh(num_devices)
    state = parallel.replicate(fresh_state(), mesh)
    step = parallel.compile_step(train_step, state.policy, "train", mesh, donate_state=True)
    metrics, devices_used = [], set()
    for batch in batches:
        sharded = parallel.shard_batch(batch, mesh)
        devices_used |= {len(sharded["image"].sharding.device_set),
                         len(sharded["image"].addressable_shards)}
        state, m = step(state, sharded)
        metrics.append({k: float(v) for k, v in m.items()})
    param_devices = {len(x.sharding.device_set) for x in jax.tree_util.tree_leaves(state.params)}
    hlo = step.lower(state, sharded).compile().as_text()
    return (jax.device_get(state.params), metrics, sorted(devices_used), sorted(param_devices), int(state.step),
            "all-reduce" in hlo)


def max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


params_1, metrics_1, _, _, steps_1, _ = run(1)
params_2, metrics_2, batch_devices_2, param_devices_2, steps_2, all_reduce_2 = run(2)
metric_diff = max(abs(m1[k] - m2[k]) for m1, m2 in zip(metrics_1, metrics_2) for k in m1)

mesh = parallel.make_mesh(2)
try:
    parallel.shard_batch({"image": np.zeros((7, 28, 28, 1), np.float32), "label": np.zeros(7, np.int32)}, mesh)
    bad_batch_error = None
except ValueError as e:
    bad_batch_error = str(e)

# eval over a partial batch of 7, padded to 8 and split over 2 devices, against 7 on one device
partial = {k: v[:7].copy() for k, v in batches[0].items()}
state = fresh_state()
predicted = np.asarray(jnp.argmax(state.apply_fn({"params": state.params}, partial["image"]), -1))
partial["label"][::2] = predicted[::2]  # examples 0, 2, 4, 6 correct, so a counted pad copy of 6 would show
unpadded = {k: float(v) for k, v in jax.jit(eval_step)(state, partial).items()}
evaluate = parallel.compile_step(eval_step, state.policy, "infer", mesh)
padded_batch = parallel.shard_batch(data.pad_batch(partial, mesh.size), mesh)
padded = {k: float(v) for k, v in evaluate(parallel.replicate(state, mesh), padded_batch).items()}

print(json.dumps({
    "device_count": jax.device_count(),
    "param_diff": max_diff(params_1, params_2),
    "metric_diff": metric_diff,
    "first_loss": metrics_1[0]["loss"], "last_loss": metrics_1[-1]["loss"],
    "steps": [steps_1, steps_2],
    "batch_devices_2": batch_devices_2, "param_devices_2": param_devices_2, "all_reduce_2": all_reduce_2,
    "bad_batch_error": bad_batch_error,
    "eval_unpadded": unpadded, "eval_padded": padded,
}))
"""


@pytest.fixture(scope="module")
def two_device_report() -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-c", TWO_DEVICE_SCRIPT], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_device_training_matches_one_device_within_float32_tolerance(two_device_report):
    report = two_device_report
    print(f"max |param diff| {report['param_diff']:.3g}, max |metric diff| {report['metric_diff']:.3g}")
    assert report["steps"] == [5, 5]
    assert report["param_diff"] <= TOLERANCE
    assert report["metric_diff"] <= TOLERANCE
    assert report["last_loss"] < report["first_loss"]  # the steps did train


def test_two_device_run_really_split_the_batch_over_two_devices(two_device_report):
    assert two_device_report["device_count"] == 2
    assert two_device_report["batch_devices_2"] == [2]
    assert two_device_report["param_devices_2"] == [2]  # params replicated on both
    assert two_device_report["all_reduce_2"]  # XLA sums the per-device gradients


def test_batch_size_that_does_not_divide_over_devices_is_named(two_device_report):
    assert two_device_report["bad_batch_error"] == "batch_size must divide across 2 devices, got 7"


def test_eval_sums_over_a_padded_partial_batch_equal_the_unpadded_ones(two_device_report):
    unpadded, padded = two_device_report["eval_unpadded"], two_device_report["eval_padded"]
    assert padded["count"] == unpadded["count"] == 7.0
    assert padded["correct"] == unpadded["correct"] >= 4.0
    np.testing.assert_allclose(padded["loss_sum"], unpadded["loss_sum"], rtol=1e-6)


def test_pad_batch_repeats_the_last_example_with_mask_zero():
    batch = {"image": np.arange(5 * 2, dtype=np.float32).reshape(5, 2), "label": np.arange(5, dtype=np.int32)}
    padded = data.pad_batch(batch, 4)
    assert padded["image"].shape == (8, 2) and isinstance(padded["image"], np.ndarray)
    np.testing.assert_array_equal(padded["image"][:5], batch["image"])
    np.testing.assert_array_equal(padded["image"][5:], np.repeat(batch["image"][-1:], 3, axis=0))
    np.testing.assert_array_equal(padded["label"], [0, 1, 2, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(padded["mask"], [1, 1, 1, 1, 1, 0, 0, 0])


def test_pad_batch_extends_an_existing_mask_and_keeps_full_batches():
    batch = {"image": jnp.ones((3, 2)), "label": jnp.arange(3), "mask": jnp.asarray([1.0, 0.0, 1.0])}
    np.testing.assert_array_equal(data.pad_batch(batch, 2)["mask"], [1, 0, 1, 0])
    full = data.pad_batch({"image": np.ones((4, 2)), "label": np.arange(4)}, 2)
    assert full["image"].shape == (4, 2)
    np.testing.assert_array_equal(full["mask"], np.ones(4))  # same pytree as a padded batch


def test_make_mesh_names_the_device_count_when_asked_for_too_many():
    available = jax.device_count()
    with pytest.raises(ValueError, match=f"only {available} exist.*xla_force_host_platform_device_count"):
        parallel.make_mesh(available + 1)


def test_one_device_mesh_is_the_same_code_path():
    mesh = parallel.make_mesh(1)
    assert dict(mesh.shape) == {"data": 1}
    parallel.check_batch_size(7, mesh)  # any batch size divides over one device
    sharded = parallel.shard_batch({"image": np.ones((3, 2), np.float32), "label": np.zeros(3, np.int32)}, mesh)
    assert sharded["image"].shape == (3, 2)
