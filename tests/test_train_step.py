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


def test_ema_of_the_weights_follows_the_closed_form_recursion_and_is_what_evaluation_applies():
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.standard_normal((8, 28, 28, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
    model = jaxvgg.create_model("mnist_linear")
    params = jaxvgg.init_params("mnist_linear", jax.random.key(0))
    plain = TrainState.for_model("mnist_linear", model, params, optim.sgd(0.05), rng=jax.random.key(1))
    state = TrainState.for_model("mnist_linear", model, params, optim.sgd(0.05), rng=jax.random.key(1), ema_decay=0.9)
    expected = np.asarray(params["params"]["fc"]["kernel"], np.float64)
    step = jax.jit(train_step)
    for t in range(1, 5):
        state, _ = step(state, batch)
        plain, _ = step(plain, batch)
        d = min(0.9, (1 + t) / (10 + t))  # TensorFlow's num_updates warm-up: 2/11, 3/12, 4/13, 5/14 < 0.9
        expected = d * expected + (1 - d) * np.asarray(state.params["fc"]["kernel"], np.float64)
        np.testing.assert_allclose(state.ema[0]["fc"]["kernel"], expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(state.params["fc"]["kernel"], plain.params["fc"]["kernel"])  # training unchanged
    averaged = eval_step(state, batch)
    by_hand = eval_step(plain.replace(params=state.ema[0]), batch)
    assert float(averaged["loss_sum"]) == float(by_hand["loss_sum"])
    assert float(averaged["loss_sum"]) != float(eval_step(plain, batch)["loss_sum"])
    assert optim.ema_decay_at(0.9, 1000) == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\), got 1.0"):
        TrainState.for_model("mnist_linear", model, params, optim.sgd(0.05), rng=jax.random.key(1), ema_decay=1.0)


def test_ema_takes_batchnorm_statistics_along_and_copies_their_step_count():
    average = {"mean": jnp.asarray([0.0, 2.0]), "num_batches_tracked": jnp.asarray(3, jnp.int32)}
    values = {"mean": jnp.asarray([1.0, 0.0]), "num_batches_tracked": jnp.asarray(4, jnp.int32)}
    new = optim.ema_update(average, values, 0.5, step=100)
    np.testing.assert_allclose(new["mean"], [0.5, 1.0])
    assert int(new["num_batches_tracked"]) == 4 and new["num_batches_tracked"].dtype == jnp.int32
