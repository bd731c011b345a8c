"""The lr range test: its lr sequence, the caller's state, early stopping, the suggestions."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvgg
from jaxvgg import augment, data, lr_finder, optim
from jaxvgg.train import TrainState, evaluate, train_step

# --- a tiny quadratic with a known good lr ---------------------------------------------------------
# The "network" outputs -0.5 * H * |w - target_i|^2 as the log-probability of the only class, so the
# NLL train_step minimises is that quadratic (target_i: a fixed point plus per-example noise read from
# the image). Plain SGD contracts the error by |1 - lr * H| per step: it converges for lr < 2 / H,
# fastest at lr = 1 / H, and diverges above 2 / H.
CURVATURE = 10.0
TARGET = jnp.arange(1.0, 5.0)
GOOD_LRS = (0.1 / CURVATURE, 2.0 / CURVATURE)  # at least a tenth of the optimal step, below divergence


def _quadratic_apply(variables, images, train=False, rngs=None):
    del train, rngs
    noisy_target = TARGET + 0.5 * (images.reshape(images.shape[0], -1) - 0.5)  # (B, 1, 1, 4) -> (B, 4)
    loss = 0.5 * CURVATURE * jnp.sum((variables["params"]["w"] - noisy_target) ** 2, axis=1)
    return -loss[:, None]  # (B, 1) log-probs of the single class


def _quadratic_problem(n: int = 256):
    images = np.random.default_rng(0).integers(0, 256, (n, 1, 1, 4), dtype=np.uint8)
    dataset = data.Dataset(images, np.zeros(n, np.int32), ("only",))
    state = TrainState.create(apply_fn=_quadratic_apply, params={"w": jnp.zeros(4)}, tx=optim.sgd(1e-5),
                              rng=jax.random.PRNGKey(0), log_probs=True)
    return state, dataset


def _to_unit(key, images):
    del key
    return images.astype(jnp.float32) / 255.0


# --- a small classifier: mnist_linear on random images with a learnable mark ----------------------

def _marked_digits(n: int) -> data.Dataset:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 60, (n, 28, 28, 1), dtype=np.uint8)
    images[np.arange(n), labels * 2, 3:20, 0] = 255  # a bright row per class
    return data.Dataset(images, labels, data.MNIST_CLASSES)


@functools.cache
def _linear_params():
    return jaxvgg.init_params("mnist_linear", jax.random.PRNGKey(0))  # compiled once for the module


def _linear_state(tx=None) -> TrainState:
    model = jaxvgg.create_model("mnist_linear")
    params = _linear_params()
    return TrainState.for_model("mnist_linear", model, params, tx or optim.sgd(1e-5, momentum=0.9),
                                rng=jax.random.PRNGKey(1))


def _normalize(key, images):
    del key
    return augment.normalize(images, augment.MNIST_MEAN, augment.MNIST_STD)


# --- the lr sequence -------------------------------------------------------------------------------

def test_lrs_rise_exponentially_from_min_lr_to_max_lr_one_step_per_batch():
    result = lr_finder.lr_range_test(_linear_state(), _marked_digits(200), transform=_normalize, batch_size=16,
                                     min_lr=1e-5, max_lr=1e-2, quiet=True)
    assert not result.stopped_early
    assert result.num_steps == 200 // 16 == len(result.lrs)  # one epoch, drop_last
    assert result.lrs[0] == 1e-5 and result.lrs[-1] == 1e-2
    assert np.all(np.diff(result.lrs) > 0)
    i = np.arange(result.num_steps)
    np.testing.assert_allclose(result.lrs, 1e-5 * (1e-2 / 1e-5) ** (i / (result.num_steps - 1)), rtol=1e-12)
    assert result.losses.shape == result.smoothed.shape == result.lrs.shape
    # bias correction: the first smoothed value is the first loss itself
    assert result.smoothed[0] == pytest.approx(result.losses[0], rel=1e-12)


def test_num_steps_longer_than_an_epoch_keeps_drawing_batches():
    result = lr_finder.lr_range_test(_linear_state(), _marked_digits(64), transform=_normalize, batch_size=16,
                                     min_lr=1e-5, max_lr=1e-3, num_steps=10, quiet=True)
    assert len(result.lrs) == 10 and result.lrs[-1] == 1e-3


def test_the_callers_state_is_left_untouched():
    state = _linear_state()
    params_before = jax.tree_util.tree_map(np.array, state.params)
    opt_before = jax.tree_util.tree_map(np.array, state.opt_state)
    result = lr_finder.lr_range_test(state, _marked_digits(128), transform=_normalize, batch_size=16,
                                     min_lr=1e-4, max_lr=1.0, quiet=True)
    assert len(result.lrs) > 1
    # every array is still alive (not donated) and holds its old value
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, params_before)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state.opt_state, opt_before)
    assert int(state.step) == 0 and float(optim.current_lr(state.opt_state)) == pytest.approx(1e-5)
    assert not any(isinstance(x, jax.Array) for x in result)  # nothing returned can alias a device array


def test_a_huge_max_lr_stops_early_on_divergence_with_finite_curves():
    state, dataset = _quadratic_problem()
    result = lr_finder.lr_range_test(state, dataset, transform=_to_unit, batch_size=4, min_lr=1e-5, max_lr=1e6,
                                     num_steps=64, quiet=True)
    assert result.stopped_early and len(result.lrs) < 64
    assert np.all(np.isfinite(result.losses)) and np.all(np.isfinite(result.smoothed))


def test_a_nan_loss_ends_the_test_without_being_recorded():
    stats, _ = lr_finder.range_test_update(lr_finder.range_test_init(), 2.0)
    stats, smoothed = lr_finder.range_test_update(stats, float("nan"))
    assert stats.diverged and math.isnan(smoothed)


def test_divergence_is_smoothed_loss_above_factor_times_best():
    stats = lr_finder.range_test_init()
    for loss in (1.0, 1.0, 1.0):
        stats, _ = lr_finder.range_test_update(stats, loss, smoothing=1.0, diverge_factor=4.0)
    stats, _ = lr_finder.range_test_update(stats, 3.9, smoothing=1.0, diverge_factor=4.0)
    assert not stats.diverged
    stats, _ = lr_finder.range_test_update(stats, 4.1, smoothing=1.0, diverge_factor=4.0)
    assert stats.diverged


def test_smoothing_is_the_bias_corrected_ewa_of_fastai():
    losses, beta = [3.0, 1.0, 2.0, 0.5], 0.9
    stats, got = lr_finder.range_test_init(), []
    for loss in losses:
        stats, smoothed = lr_finder.range_test_update(stats, loss, smoothing=1 - beta)
        got.append(smoothed)
    avg, expected = 0.0, []
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        expected.append(avg / (1 - beta**i))
    np.testing.assert_allclose(got, expected, rtol=1e-12)


# --- the suggestions -------------------------------------------------------------------------------

def test_suggestions_on_a_quadratic_land_within_an_order_of_magnitude_of_the_good_lrs():
    state, dataset = _quadratic_problem()
    result = lr_finder.lr_range_test(state, dataset, transform=_to_unit, batch_size=4, min_lr=1e-5, max_lr=10.0,
                                     num_steps=64, quiet=True)
    assert result.stopped_early  # the quadratic diverges once lr > 2 / CURVATURE = 0.2
    assert result.lrs[-1] < 10 * GOOD_LRS[1]
    low, high = GOOD_LRS[0] / 10, GOOD_LRS[1] * 10
    for name, lr in result.suggestions.items():
        assert low <= lr <= high, f"{name} suggests {lr:.3g}, outside [{low:.3g}, {high:.3g}]"
    assert result.suggested_lr == result.suggestions["min_loss_half"]


def test_suggestion_on_noisy_marked_digits_trains_better_than_a_much_smaller_or_larger_lr():
    # 20% random labels: not separable, so a too-large lr blows the loss up (it would not on clean marks)
    clean = _marked_digits(512)
    rng = np.random.default_rng(5)
    labels, noisy = clean.labels.copy(), rng.random(512) < 0.2
    labels[noisy] = rng.integers(0, 10, int(noisy.sum()))
    dataset = data.Dataset(clean.images, labels, clean.class_names)
    result = lr_finder.lr_range_test(_linear_state(), dataset, transform=_normalize, batch_size=16, min_lr=1e-5,
                                     max_lr=10.0, quiet=True)
    assert result.stopped_early
    step = jax.jit(lambda s, b: train_step(s, {**b, "image": _normalize(None, b["image"])}))
    loss_after_one_epoch = {}
    for lr in (result.suggested_lr / 100, result.suggested_lr, result.suggested_lr * 100):
        state = _linear_state(optim.sgd(lr, momentum=0.9))
        for batch in dataset.batches(16, seed=1, epoch=0, drop_last=True):
            state, _ = step(state, batch)
        loss_after_one_epoch[lr] = evaluate(state, dataset, lambda x: _normalize(None, x))["loss"]
    too_small, suggested, too_large = loss_after_one_epoch.values()
    assert suggested < min(too_small, too_large) and suggested < 2.0, loss_after_one_epoch


def test_suggestions_skip_the_burn_in():
    lrs = np.geomspace(1e-4, 1.0, 50)
    smoothed = np.linspace(2.0, 1.0, 50)
    smoothed[:5] = [0.1, 5.0, 4.0, 3.0, 2.5]  # the lowest loss and the steepest drop lie in the first 10%
    suggestions, burn_in = lr_finder.suggest_lrs(lrs, smoothed)
    assert burn_in == 5 == lr_finder.default_burn_in(50)
    assert suggestions["min_loss_half"] == pytest.approx(lrs[-1] / 2)
    assert suggestions["steepest"] >= lrs[burn_in]
    no_burn_in, _ = lr_finder.suggest_lrs(lrs, smoothed, burn_in=0)
    assert no_burn_in["min_loss_half"] == pytest.approx(lrs[0] / 2)
    assert no_burn_in["steepest"] < lrs[5]


def test_steepest_is_the_most_negative_slope_against_log_lr():
    lrs = np.geomspace(1e-4, 1.0, 41)
    # a smooth step down centred on lr = 1e-2, rising again at the end
    smoothed = 2.0 - np.tanh(3 * (np.log10(lrs) + 2)) + 5 * np.maximum(np.log10(lrs) + 0.5, 0) ** 2
    suggestions, _ = lr_finder.suggest_lrs(lrs, smoothed, burn_in=1)
    assert suggestions["steepest"] == pytest.approx(1e-2)
    assert suggestions["min_loss_half"] == pytest.approx(lrs[np.argmin(smoothed)] / 2)


def test_steepest_ignores_the_fall_after_a_divergence_spike():
    lrs = np.geomspace(1e-4, 1.0, 40)
    smoothed = np.full(40, 2.3)
    smoothed[10:20] = np.linspace(2.3, 1.5, 10)  # the useful descent: 0.09 per step
    smoothed[20:30] = 1.5 + np.arange(10) * 0.2  # divergence ...
    smoothed[30:] = np.linspace(3.5, 2.0, 10)  # ... and a steeper fall back (0.17 per step) past the minimum
    suggestions, _ = lr_finder.suggest_lrs(lrs, smoothed)
    assert lrs[10] <= suggestions["steepest"] <= lrs[19]
    assert suggestions["min_loss_half"] == pytest.approx(lrs[19] / 2)


def test_burn_in_is_at_least_one_step_and_leaves_two_points():
    assert lr_finder.default_burn_in(5) == 1 and lr_finder.default_burn_in(100) == 10
    _, burn_in = lr_finder.suggest_lrs([1e-3, 1e-2, 1e-1], [1.0, 0.5, 0.7], burn_in=10)
    assert burn_in == 1


# --- errors name the bad value ---------------------------------------------------------------------

def test_bad_lr_range_is_rejected_with_the_values():
    with pytest.raises(ValueError, match="min_lr=0.1 max_lr=0.01"):
        lr_finder.range_test_lrs(0.1, 0.01, 10)
    with pytest.raises(ValueError, match="got 1"):
        lr_finder.range_test_lrs(1e-5, 1.0, 1)


def test_a_scheduled_optimizer_is_refused_before_any_step():
    tx = optim.sgd(optim.make_schedule("cosine", 0.1, steps_per_epoch=4, epochs=1))
    with pytest.raises(ValueError, match="schedule"):
        lr_finder.lr_range_test(_linear_state(tx), _marked_digits(64), transform=_normalize, batch_size=16,
                                quiet=True)


def test_a_batch_larger_than_the_data_is_rejected():
    with pytest.raises(ValueError, match="batch_size 128 is larger than the 64"):
        lr_finder.lr_range_test(_linear_state(), _marked_digits(64), transform=_normalize, batch_size=128,
                                quiet=True)


def test_result_serialises_and_plots(tmp_path):
    result = lr_finder.lr_range_test(_linear_state(), _marked_digits(96), transform=_normalize, batch_size=16,
                                     min_lr=1e-4, max_lr=1e-1, quiet=True)
    record = result.to_json()
    assert record["lrs"] == result.lrs.tolist() and record["suggested_lr"] == result.suggested_lr
    path = lr_finder.plot_lr_range_result(result, tmp_path / "lr_range.png")
    assert path.stat().st_size > 0
