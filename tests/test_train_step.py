"""The minimal pure train step and the torch-semantics optimizers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvgg
from jaxvgg import optim
from jaxvgg.train import TrainState, eval_step, per_example_loss, train_step


def _state(tx):
    model = jaxvgg.create_model("mnist_linear")
    params = jaxvgg.init_params("mnist_linear", jax.random.key(0))
    return TrainState.for_model("mnist_linear", model, params, tx, rng=jax.random.key(1))


def test_train_step_lowers_the_loss_on_a_fixed_batch():
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((16, 28, 28, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32)}
    state = _state(optim.sgd(0.1, momentum=0.9))
    step = jax.jit(train_step)
    losses = []
    for _ in range(20):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 20
    assert losses[-1] < 0.5 * losses[0]


def test_eval_step_sums_ignore_masked_padding():
    state = _state(optim.sgd(0.1))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 28, 28, 1)), jnp.float32)
    y = jnp.asarray([1, 2, 3, 4], jnp.int32)
    full = eval_step(state, {"image": x[:3], "label": y[:3]})
    padded = eval_step(state, {"image": x, "label": y, "mask": jnp.asarray([1, 1, 1, 0])})
    assert float(padded["count"]) == 3.0
    np.testing.assert_allclose(float(padded["loss_sum"]), float(full["loss_sum"]), rtol=1e-6)


def test_label_smoothing_matches_torch_formula():
    logits = jnp.asarray([[2.0, 0.5, -1.0]])
    labels = jnp.asarray([0])
    logp = jax.nn.log_softmax(logits)
    expected = 0.9 * -logp[0, 0] + 0.1 * -logp[0].mean()
    got = per_example_loss(logits, labels, log_probs=False, label_smoothing=0.1)
    np.testing.assert_allclose(float(got[0]), float(expected), rtol=1e-6)


def test_current_lr_reads_the_injected_learning_rate():
    state = _state(optim.create_optimizer("adam", 3e-4))
    assert float(optim.current_lr(state.opt_state)) == pytest.approx(3e-4)


def test_unknown_optimizer_is_named():
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'"):
        optim.create_optimizer("rmsprop", 0.1)
