"""Per-step lr schedules, the plateau rule, early stopping and set_lr."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvgg import optim


def _lrs(schedule, steps):
    return np.array([float(schedule(i)) for i in range(steps)])


def test_constant_schedule_is_the_base_lr_as_a_float():
    assert optim.make_schedule("constant", 0.01, steps_per_epoch=5, epochs=3) == 0.01


def test_unknown_schedule_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'linear'.*constant.*step.*cosine.*onecycle"):
        optim.make_schedule("linear", 0.1, steps_per_epoch=5, epochs=3)


def test_schedule_rejects_an_option_it_does_not_have():
    with pytest.raises(TypeError):
        optim.make_schedule("cosine", 0.1, steps_per_epoch=5, epochs=3, gamma=0.5)


def test_step_schedule_multiplies_by_gamma_every_step_epochs_epochs():
    lrs = _lrs(optim.make_schedule("step", 0.1, steps_per_epoch=4, epochs=9, step_epochs=3, gamma=0.5), 36)
    per_epoch = lrs.reshape(9, 4)
    assert np.all(per_epoch == per_epoch[:, :1])  # constant within an epoch
    np.testing.assert_allclose(per_epoch[:, 0], 0.1 * 0.5 ** (np.arange(9) // 3), rtol=1e-6)


def test_cosine_schedule_decays_monotonically_from_base_lr_to_zero():
    schedule = optim.make_schedule("cosine", 0.1, steps_per_epoch=10, epochs=5)
    lrs = _lrs(schedule, 51)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)
    assert np.all(np.diff(lrs) < 0)
    assert lrs[25] == pytest.approx(0.05, rel=1e-6)


def test_cosine_warmup_rises_linearly_from_zero_then_decays():
    schedule = optim.make_schedule("cosine", 0.1, steps_per_epoch=10, epochs=5, warmup_epochs=1)
    lrs = _lrs(schedule, 51)
    np.testing.assert_allclose(lrs[:11], 0.1 * np.arange(11) / 10, atol=1e-8)
    assert np.all(np.diff(lrs[10:]) < 0)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="warmup_epochs.*got 5"):
        optim.make_schedule("cosine", 0.1, steps_per_epoch=10, epochs=5, warmup_epochs=5)


def test_cosine_warmup_fraction_is_the_closed_form_of_a_linear_rise_then_a_half_cosine():
    schedule = optim.make_schedule("cosine", 0.2, steps_per_epoch=10, epochs=4, warmup_fraction=0.3)  # W=12, T=40
    t = np.arange(41)
    expected = np.where(t < 12, 0.2 * t / 12, 0.2 * (1 + np.cos(np.pi * (t - 12) / 28)) / 2)
    np.testing.assert_allclose(_lrs(schedule, 41), expected, atol=1e-7)
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        optim.make_schedule("cosine", 0.1, steps_per_epoch=10, epochs=5, warmup_fraction=1.0)
    with pytest.raises(ValueError, match="not beside warmup_epochs"):
        optim.make_schedule("cosine", 0.1, steps_per_epoch=10, epochs=5, warmup_fraction=0.1, warmup_epochs=1)


def test_onecycle_rises_to_base_lr_then_falls_to_its_floor():
    lrs = _lrs(optim.make_schedule("onecycle", 0.1, steps_per_epoch=10, epochs=10), 100)
    assert lrs[0] == pytest.approx(0.1 / 25, rel=1e-6)
    assert int(np.argmax(lrs)) == 29  # torch: peak at pct_start * total_steps - 1
    assert lrs[29] == pytest.approx(0.1, rel=1e-6)
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-6)
    assert np.all(np.diff(lrs[:30]) > 0) and np.all(np.diff(lrs[29:]) < 0)


def test_onecycle_runs_too_short_to_warm_up_anneal_from_the_peak():
    # 0.3 * 3 steps < 1: torch's OneCycleLR skips the warm-up (parity_tests/test_schedules.py compares them)
    schedule = optim.make_schedule("onecycle", 0.1, steps_per_epoch=1, epochs=3)
    lrs = [float(schedule(i)) for i in range(3)]
    assert 0.09 < lrs[0] < 0.1 and lrs[0] > lrs[1] > lrs[2] > 0
    with pytest.raises(ValueError, match="must be >= 1, got 0 and 3"):
        optim.make_schedule("onecycle", 0.1, steps_per_epoch=0, epochs=3)


def _scales(state, accuracies):
    scales = []
    for acc in accuracies:
        state = optim.plateau_update(state, acc)
        scales.append(float(optim.plateau_scale(state)))
    return np.array(scales)


def test_plateau_reduces_after_patience_plus_one_bad_epochs():
    # patience=2: the 3rd epoch in a row without a rise above best + threshold divides the lr by 10
    scales = _scales(optim.plateau_init(patience=2, threshold=0.01), [0.5, 0.6, 0.605, 0.6, 0.59, 0.62])
    np.testing.assert_allclose(scales, [1, 1, 1, 1, 0.1, 0.1], rtol=1e-6)


def test_plateau_reduces_at_most_three_times():
    scales = _scales(optim.plateau_init(patience=0, threshold=1e-3), [0.5] * 20)
    assert len(np.unique(scales)) == 4  # 1, 0.1, 0.01, 0.001
    assert scales.min() == pytest.approx(1e-3, rel=1e-6)
    assert scales[3] == pytest.approx(1e-3, rel=1e-6)


def test_plateau_cooldown_ignores_bad_epochs_after_a_reduction():
    scales = _scales(optim.plateau_init(patience=0, threshold=1e-3, cooldown=2), [0.5] * 8)
    np.testing.assert_allclose(scales, [1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 1e-3], rtol=1e-6)


def test_plateau_state_is_a_pytree_of_arrays():
    leaves = jax.tree_util.tree_leaves(optim.plateau_init(patience=3))
    assert leaves and all(isinstance(leaf, jax.Array) for leaf in leaves)


def test_plateau_rejects_a_zero_threshold():
    with pytest.raises(ValueError, match="threshold must be > 0, got 0"):
        optim.plateau_init(threshold=0.0)


def _early_stop(losses, patience, min_delta=0.0):
    state = optim.early_stopping_init()
    improved_epochs = []
    for epoch, loss in enumerate(losses):
        state, improved = optim.early_stopping_update(state, loss, epoch, patience=patience, min_delta=min_delta)
        if improved:
            improved_epochs.append(epoch)
        if state.should_stop:
            return epoch, int(state.best_epoch), improved_epochs
    return None, int(state.best_epoch), improved_epochs


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    stop, best, improved = _early_stop([1.0, 0.8, 0.7, 0.75, 0.71, 0.9, 0.6], patience=3)
    assert (stop, best, improved) == (5, 2, [0, 1, 2])


def test_early_stopping_counter_resets_on_improvement():
    stop, best, improved = _early_stop([1.0, 1.1, 1.2, 0.9, 1.0, 1.0, 0.95, 0.99], patience=3)
    assert (stop, best, improved) == (6, 3, [0, 3])


def test_early_stopping_min_delta_ignores_tiny_improvements():
    losses = [1.0, 0.97, 0.93, 0.96, 0.90]
    assert _early_stop(losses, patience=2, min_delta=0.05) == (4, 2, [0, 2])
    assert _early_stop(losses, patience=2) == (None, 4, [0, 1, 2, 4])


def test_early_stopping_counts_a_nan_loss_as_a_bad_epoch():
    assert _early_stop([1.0, float("nan"), float("nan")], patience=2) == (2, 0, [0])


def test_early_stopping_update_is_jittable_and_stop_is_sticky():
    update = jax.jit(optim.early_stopping_update, static_argnames=("patience", "min_delta"))
    state = optim.early_stopping_init()
    for epoch, loss in enumerate([1.0, 2.0, 0.5]):
        state, _ = update(state, loss, epoch, patience=1)
    assert bool(state.should_stop) and int(state.best_epoch) == 2


def _params_and_mask():
    params = {"features": {"kernel": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2,)), "bias": jnp.zeros(())}}
    mask = {"features": {"kernel": False}, "head": {"kernel": True, "bias": True}}
    return params, mask


def test_set_lr_on_a_plain_state_is_read_back_and_leaves_the_input_alone():
    params, _ = _params_and_mask()
    opt_state = optim.sgd(0.1, momentum=0.9).init(params)
    new_state = optim.set_lr(opt_state, 0.01)
    assert float(optim.current_lr(new_state)) == pytest.approx(0.01)
    assert float(optim.current_lr(opt_state)) == pytest.approx(0.1)
    assert optim.current_lr(new_state).dtype == optim.current_lr(opt_state).dtype


def test_set_lr_on_a_multi_transform_state_drives_a_jitted_update():
    params, mask = _params_and_mask()
    tx = optim.create_optimizer("sgd", 0.1, momentum=0.9, trainable=mask)
    opt_state = optim.set_lr(tx.init(params), 0.01)
    assert float(optim.current_lr(opt_state)) == pytest.approx(0.01)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    update = jax.jit(tx.update)
    updates, opt_state = update(grads, opt_state, params)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.01)  # first SGD step: -lr * grad
    np.testing.assert_allclose(updates["features"]["kernel"], 0.0)  # frozen
    opt_state = optim.set_lr(opt_state, 0.001)  # same dtype and shape: no recompile
    updates, _ = update(grads, opt_state, params)
    np.testing.assert_allclose(updates["head"]["kernel"], -0.001 * (1 + 0.9), rtol=1e-6)  # buf = 0.9 * 1 + 1
    assert update._cache_size() == 1


def test_set_lr_refuses_a_scheduled_learning_rate():
    params, _ = _params_and_mask()
    opt_state = optim.sgd(optim.make_schedule("cosine", 0.1, steps_per_epoch=2, epochs=2)).init(params)
    with pytest.raises(ValueError, match="schedule"):
        optim.set_lr(opt_state, 0.01)


def test_plateau_scale_drives_set_lr():
    params, _ = _params_and_mask()
    opt_state = optim.sgd(0.1).init(params)
    plateau = optim.plateau_init(patience=0)
    for acc in [0.5, 0.5]:
        plateau = optim.plateau_update(plateau, acc)
        opt_state = optim.set_lr(opt_state, 0.1 * optim.plateau_scale(plateau))
    assert float(optim.current_lr(opt_state)) == pytest.approx(0.01, rel=1e-6)
