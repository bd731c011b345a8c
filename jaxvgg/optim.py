"""Optimizers with torch.optim semantics, built from optax parts.

torch.optim.SGD(lr, momentum, weight_decay), dampening 0:
    g <- g + wd * p;  buf <- momentum * buf + g  (buf = g on the first step);  p <- p - lr * buf
which is optax's ``add_decayed_weights`` (coupled L2) followed by ``sgd`` (its trace starts at zero,
so the first step is the same). torch.optim.Adam(weight_decay=wd) likewise adds ``wd * p`` to the
gradient before the moments (coupled L2, unlike AdamW).

``learning_rate`` may be a float or an optax schedule; the factories wrap it in
``optax.inject_hyperparams`` so the current lr is readable (``opt_state.hyperparams["learning_rate"]``)
and a plateau rule can change it between steps without recompiling.

Also here: ``make_schedule`` (per-step lr schedules: constant, step, cosine, onecycle), ``set_lr``
(write a new lr into such a state), and two per-epoch rules kept as NamedTuple states with pure
init/update functions: the VGG plateau rule (``plateau_*``, torch ReduceLROnPlateau semantics on top of
``optax.contrib.reduce_on_plateau``) and early stopping on validation loss (``early_stopping_*``).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.0, weight_decay: float = 0.0,
        nesterov: bool = False) -> optax.GradientTransformation:
    """torch.optim.SGD(lr, momentum, weight_decay, nesterov) as an optax transformation."""

    def make(learning_rate):
        return optax.chain(
            optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
            optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
        )

    return optax.inject_hyperparams(make)(learning_rate=learning_rate)


def adam(learning_rate: optax.ScalarOrSchedule = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, betas=(b1, b2), eps, weight_decay) as an optax transformation."""

    def make(learning_rate):
        return optax.chain(
            optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
            optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
        )

    return optax.inject_hyperparams(make)(learning_rate=learning_rate)


def create_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *, trainable: Any = None,
                     **kwargs: Any) -> optax.GradientTransformation:
    """``sgd`` or ``adam`` by name; with a ``trainable`` mask pytree, frozen params get zero updates."""
    factories = {"sgd": sgd, "adam": adam}
    if name not in factories:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(factories)}")
    tx = factories[name](learning_rate, **kwargs)
    if trainable is not None:
        frozen = optax.set_to_zero()
        labels = _labels(trainable)
        tx = optax.multi_transform({"train": tx, "freeze": frozen}, labels)
    return tx


def _labels(mask: Any) -> Any:
    return jax.tree_util.tree_map(lambda trains: "train" if trains else "freeze", mask)


def current_lr(opt_state: Any) -> Any:
    """The learning rate an optimizer from this module will apply next (first found in the state)."""
    for node in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: hasattr(x, "hyperparams")):
        if hasattr(node, "hyperparams"):
            return node.hyperparams["learning_rate"]
    raise ValueError("optimizer state has no injected learning_rate; build it with jaxvgg.optim")


def set_lr(opt_state: Any, lr: Any) -> Any:
    """A copy of ``opt_state`` whose injected ``learning_rate`` is ``lr``, wherever it sits.

    Finds every ``inject_hyperparams`` node (one for a plain optimizer, one inside the ``"train"``
    branch of ``create_optimizer(..., trainable=mask)``'s ``multi_transform`` state) and replaces its
    learning rate, keeping dtype and shape so a jitted step does not recompile. Pure: the input is untouched.

    Args:
      opt_state: state of an optimizer built by this module with a constant (float) learning rate.
      lr: the new learning rate (Python number or scalar array).

    Returns:
      The new optimizer state.

    Raises:
      ValueError: no injected learning rate was found, or it is driven by a schedule (the schedule
        would overwrite it at the next step).
    """
    found = []

    def replace(node):
        if not _is_injected(node):
            return node
        if "learning_rate" in getattr(node, "hyperparams_states", {}):
            raise ValueError("learning_rate is set by a schedule and would be overwritten at the next step; "
                             "build the optimizer with a float learning rate to use set_lr")
        old = node.hyperparams["learning_rate"]
        found.append(node)
        return node._replace(hyperparams={**node.hyperparams,
                                          "learning_rate": jnp.asarray(lr, dtype=old.dtype).reshape(old.shape)})

    new_state = jax.tree_util.tree_map(replace, opt_state, is_leaf=_is_injected)
    if not found:
        raise ValueError("optimizer state has no injected learning_rate; build it with jaxvgg.optim")
    return new_state


def _is_injected(node: Any) -> bool:
    """Whether ``node`` is an ``inject_hyperparams`` state holding a learning rate."""
    return hasattr(node, "hyperparams") and "learning_rate" in node.hyperparams


# --------------------------------------------------------------------------------------------------
# Per-step learning-rate schedules
# --------------------------------------------------------------------------------------------------

SCHEDULES = ("constant", "step", "cosine", "onecycle")


def make_schedule(name: str, base_lr: float, *, steps_per_epoch: int, epochs: int,
                  **kw: Any) -> optax.Schedule | float:
    """A per-step learning-rate schedule by name, to pass as ``learning_rate`` to ``create_optimizer``.

    Args:
      name: one of
        ``"constant"``: ``base_lr`` throughout (the only one ``set_lr`` and the plateau rule can change);
        ``"step"`` (``step_epochs``, ``gamma=0.1``): torch ``StepLR(step_size=step_epochs, gamma)``
        stepped once per epoch, i.e. ``base_lr * gamma ** (epoch // step_epochs)``;
        ``"cosine"`` (``warmup_epochs=0`` or ``warmup_fraction=0.0``): linear 0 -> ``base_lr`` over the
        warmup (whole epochs, or that share of all steps, rounded), then cosine decay to 0 at step
        ``steps_per_epoch * epochs`` (torch ``CosineAnnealingLR(T_max=that)`` stepped per batch when
        there is no warmup): with W warmup steps of T, ``lr(t) = base_lr * t / W`` for ``t < W``, then
        ``base_lr * (1 + cos(pi * (t - W) / (T - W))) / 2``;
        ``"onecycle"`` (``pct_start=0.3``, ``div_factor=25.0``, ``final_div_factor=1e4``): torch
        ``OneCycleLR(max_lr=base_lr, total_steps=steps_per_epoch * epochs, anneal_strategy="cos")``,
        lr only (as torch's ``cycle_momentum=False``; torch cycles SGD momentum by default).
      base_lr: starting lr; the peak for warmup-cosine and onecycle (torch's ``max_lr``).
      steps_per_epoch: optimizer steps per epoch.
      epochs: epochs in the run.
      **kw: the schedule's own options, listed with its name.

    Returns:
      ``base_lr`` itself for ``"constant"``, otherwise an optax schedule ``step -> lr`` (steps count from 0;
      past the last step the final value is held).

    Raises:
      ValueError: an unknown name or an out-of-range option; TypeError for an option the schedule lacks.
    """
    factories = {"constant": _constant, "step": _step, "cosine": _cosine, "onecycle": _onecycle}
    if name not in factories:
        raise ValueError(f"unknown schedule {name!r}; expected one of {list(SCHEDULES)}")
    if steps_per_epoch < 1 or epochs < 1:
        raise ValueError(f"steps_per_epoch and epochs must be >= 1, got {steps_per_epoch} and {epochs}")
    return factories[name](base_lr, steps_per_epoch, epochs, **kw)


def _constant(base_lr: float, steps_per_epoch: int, epochs: int) -> float:
    """The base lr as a plain float, so it stays settable by ``set_lr``."""
    return base_lr


def _step(base_lr: float, steps_per_epoch: int, epochs: int, *, step_epochs: int,
          gamma: float = 0.1) -> optax.Schedule:
    """torch StepLR per epoch: the lr is multiplied by ``gamma`` every ``step_epochs`` epochs."""
    if step_epochs < 1:
        raise ValueError(f"step_epochs must be >= 1, got {step_epochs}")
    return optax.exponential_decay(base_lr, transition_steps=step_epochs * steps_per_epoch, decay_rate=gamma,
                                   staircase=True)


def _cosine(base_lr: float, steps_per_epoch: int, epochs: int, *, warmup_epochs: int = 0,
            warmup_fraction: float = 0.0) -> optax.Schedule:
    """Cosine decay to 0 over the run, after an optional linear warmup from 0 (in epochs or a share of steps)."""
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}), got {warmup_epochs}")
    if not 0.0 <= warmup_fraction < 1.0 or (warmup_fraction and warmup_epochs):
        raise ValueError(f"warmup_fraction must be in [0, 1) and not beside warmup_epochs, got {warmup_fraction}")
    total_steps = steps_per_epoch * epochs
    warmup_steps = warmup_epochs * steps_per_epoch or round(warmup_fraction * total_steps)
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(base_lr, decay_steps=total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps=warmup_steps, decay_steps=total_steps)


def _onecycle(base_lr: float, steps_per_epoch: int, epochs: int, *, pct_start: float = 0.3,
              div_factor: float = 25.0, final_div_factor: float = 1e4) -> optax.Schedule:
    """torch OneCycleLR (two phases, cosine annealing) as a per-step schedule."""
    # Not optax.cosine_onecycle_schedule: it peaks at step int(pct_start * T) and reaches its floor at
    # step T, torch at step pct_start * T - 1 (a float, so the boundary can fall between steps) and T - 1,
    # i.e. optax's sequence is torch's one step late.
    total_steps = steps_per_epoch * epochs
    if not 0.0 < pct_start < 1.0:
        raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
    # torch's end of the warm-up phase; below 0 in short runs (pct_start * T < 1), where torch, and this,
    # skip the warm-up and anneal from the peak from the first step on
    peak_step = float(pct_start * total_steps) - 1
    last_step = total_steps - 1
    initial_lr = base_lr / div_factor
    min_lr = initial_lr / final_div_factor

    def schedule(count):
        step = jnp.clip(jnp.asarray(count, jnp.float32), 0.0, last_step)
        warming = step <= peak_step
        start, end = jnp.where(warming, 0.0, peak_step), jnp.where(warming, peak_step, last_step)
        # torch's pct, and 1 - pct without the cancellation; a phase of length 0 (torch divides by zero
        # there) is at its start
        span = jnp.where(end > start, end - start, 1.0)
        done = jnp.where(end > start, (step - start) / span, 0.0)
        left = jnp.where(end > start, (end - step) / span, 1.0)
        # torch: lr_to + (lr_from - lr_to) * (cos(pi * pct) + 1) / 2, rewritten with
        # (cos(pi p) + 1) / 2 = sin^2(pi (1 - p) / 2) and 1 - that = sin^2(pi p / 2): two positive terms,
        # so float32 keeps full relative precision at the ends, where cos(pi p) + 1 cancels.
        lr_from = jnp.where(warming, initial_lr, base_lr)
        lr_to = jnp.where(warming, base_lr, min_lr)
        return lr_from * jnp.sin(jnp.pi / 2 * left) ** 2 + lr_to * jnp.sin(jnp.pi / 2 * done) ** 2

    return schedule


# --------------------------------------------------------------------------------------------------
# Per-epoch rules: the VGG plateau rule and early stopping
# --------------------------------------------------------------------------------------------------

class PlateauState(NamedTuple):
    """The plateau rule's counters (optax's ``ReduceLROnPlateauState``) and its torch-named settings."""

    rule: Any  # optax.contrib.ReduceLROnPlateauState; rule.scale multiplies the base lr
    patience: jax.Array  # int32, torch's meaning: bad epochs tolerated before a reduction
    threshold: jax.Array  # float32, torch threshold_mode="abs": a rise must exceed best + threshold
    cooldown: jax.Array  # int32, epochs after a reduction in which bad epochs are not counted
    factor: jax.Array  # float32, scale multiplier per reduction
    min_scale: jax.Array  # float32, floor of the scale (1e-3 with factor 0.1: at most 3 reductions)


def plateau_init(*, patience: int = 10, threshold: float = 1e-4, cooldown: int = 0, factor: float = 0.1,
                 min_scale: float = 1e-3) -> PlateauState:
    """Start the VGG paper's rule: divide the lr by 10 when validation accuracy stops improving.

    Matches torch ``ReduceLROnPlateau(mode="max", factor, patience, threshold, threshold_mode="abs",
    cooldown, min_lr=base_lr * min_scale)`` stepped once per epoch with the validation accuracy. Use::

        plateau = plateau_update(plateau, val_accuracy)               # once per epoch
        opt_state = set_lr(opt_state, base_lr * plateau_scale(plateau))

    The state is a pytree of arrays (checkpointable); its settings travel with it.

    Args:
      patience: epochs without improvement tolerated; the lr drops on the ``patience + 1``-th.
      threshold: absolute improvement over the best accuracy needed to count as better (> 0).
      cooldown: epochs after a reduction during which bad epochs are not counted.
      factor: multiplier per reduction, in (0, 1).
      min_scale: lowest scale; the default 1e-3 with ``factor=0.1`` allows at most 3 reductions.

    Returns:
      The initial ``PlateauState`` (scale 1).
    """
    if patience < 0 or cooldown < 0:
        raise ValueError(f"patience and cooldown must be >= 0, got {patience} and {cooldown}")
    if threshold <= 0:
        # optax's rule needs a positive tolerance (it rejects atol == rtol == 0); torch accepts 0.
        raise ValueError(f"threshold must be > 0, got {threshold}")
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must be in (0, 1), got {factor}")
    if not 0.0 <= min_scale <= 1.0:
        raise ValueError(f"min_scale must be in [0, 1], got {min_scale}")
    settings = dict(patience=jnp.asarray(patience, jnp.int32), threshold=jnp.asarray(threshold, jnp.float32),
                    cooldown=jnp.asarray(cooldown, jnp.int32), factor=jnp.asarray(factor, jnp.float32),
                    min_scale=jnp.asarray(min_scale, jnp.float32))
    rule = _plateau_rule(patience, threshold, cooldown, factor, min_scale).init(jnp.zeros((), jnp.float32))
    return PlateauState(rule=rule, **settings)


def _plateau_rule(patience, threshold, cooldown, factor, min_scale) -> optax.GradientTransformationExtraArgs:
    """optax.contrib.reduce_on_plateau configured to count like torch's ReduceLROnPlateau."""
    # Same state machine as torch (best is updated even in cooldown, cooldown zeroes the bad-epoch count,
    # a reduction restarts the cooldown), with one difference in counting: torch reduces when
    # num_bad_epochs > patience, optax when plateau_count == patience, hence patience + 1.
    # Differences that remain, both immaterial for accuracies and lrs >= 1e-6: optax holds the best value
    # and the scale in float32 (torch: Python floats), and torch skips a reduction that changes the lr
    # by less than eps=1e-8 (optax only clamps at min_scale).
    return optax.contrib.reduce_on_plateau(factor=factor, patience=patience + 1, rtol=0.0, atol=threshold,
                                           cooldown=cooldown, min_scale=min_scale)


@functools.partial(jax.jit, static_argnames=("threshold", "factor"))
def _plateau_step(rule_state, value, patience, cooldown, min_scale, *, threshold: float, factor: float):
    """One optax reduce_on_plateau update; compiled once per (threshold, factor)."""
    # threshold and factor are static because optax checks their ranges in Python.
    rule = _plateau_rule(patience, threshold, cooldown, factor, min_scale)
    _, new_rule_state = rule.update(jnp.zeros((), jnp.float32), rule_state, value=value)
    return new_rule_state


def plateau_update(state: PlateauState, accuracy: Any) -> PlateauState:
    """Feed one epoch's validation accuracy (higher is better; pass ``-loss`` to watch a loss).

    Call it eagerly, once per epoch, not under ``jit``: it reads ``threshold`` and ``factor`` as Python
    floats (optax validates them in Python); the update itself is compiled.

    Args:
      state: the rule's state.
      accuracy: this epoch's validation metric, a Python number or scalar array.

    Returns:
      The new state; ``plateau_scale`` of it gives the lr multiplier for the next epoch.
    """
    # optax minimises its monitored value: -accuracy < -best - threshold  <=>  accuracy > best + threshold.
    value = -jnp.asarray(accuracy, jnp.float32)
    rule = _plateau_step(state.rule, value, state.patience, state.cooldown, state.min_scale,
                         threshold=float(state.threshold), factor=float(state.factor))
    return state._replace(rule=rule)


def plateau_scale(state: PlateauState) -> jax.Array:
    """The factor to multiply the base lr by: ``factor ** reductions``, floored at ``min_scale``."""
    return state.rule.scale


class EarlyStoppingState(NamedTuple):
    """Best validation loss so far, the epoch it came from, and the bad epochs since."""

    best_loss: jax.Array  # float32, +inf before the first epoch
    best_epoch: jax.Array  # int32, -1 before the first epoch
    bad_epochs: jax.Array  # int32, epochs since the last improvement
    should_stop: jax.Array  # bool, stays True once set


def early_stopping_init() -> EarlyStoppingState:
    """Start early stopping with no best loss yet."""
    return EarlyStoppingState(best_loss=jnp.asarray(jnp.inf, jnp.float32), best_epoch=jnp.asarray(-1, jnp.int32),
                              bad_epochs=jnp.asarray(0, jnp.int32), should_stop=jnp.asarray(False))


def early_stopping_update(state: EarlyStoppingState, val_loss: Any, epoch: Any, *, patience: int,
                          min_delta: float = 0.0) -> tuple[EarlyStoppingState, jax.Array]:
    """Record one epoch's validation loss; stop after ``patience`` epochs in a row without improvement.

    An epoch improves when ``val_loss < best_loss - min_delta`` (a NaN loss never does). Contract with
    the fit loop: when ``improved``, keep a copy of the params (they are the best so far); stop training
    once ``state.should_stop``; then restore the kept params, which come from ``state.best_epoch``.
    Pure and jittable.

    Args:
      state: the early-stopping state.
      val_loss: this epoch's validation loss.
      epoch: this epoch's index, stored as ``best_epoch`` when it improves.
      patience: epochs without improvement before ``should_stop`` (>= 1).
      min_delta: how much lower than the best a loss must be to count (>= 0).

    Returns:
      ``(new_state, improved)``, ``improved`` a scalar bool array (truthy in ``if``).
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if min_delta < 0:
        raise ValueError(f"min_delta must be >= 0, got {min_delta}")
    val_loss = jnp.asarray(val_loss, jnp.float32)
    improved = val_loss < state.best_loss - min_delta
    bad_epochs = jnp.where(improved, 0, state.bad_epochs + 1).astype(jnp.int32)
    new_state = EarlyStoppingState(
        best_loss=jnp.where(improved, val_loss, state.best_loss),
        best_epoch=jnp.where(improved, jnp.asarray(epoch, jnp.int32), state.best_epoch),
        bad_epochs=bad_epochs,
        should_stop=state.should_stop | (bad_epochs >= patience),
    )
    return new_state, improved


# --------------------------------------------------------------------------------------------------
# An exponential moving average of the weights
# --------------------------------------------------------------------------------------------------

def ema_decay_at(decay: float, step: Any) -> jax.Array:
    """The decay used after optimizer step ``step`` (1, 2, ...): ``min(decay, (1 + step) / (10 + step))``,
    TensorFlow's ``ExponentialMovingAverage(num_updates=step)``, so the first averages follow the weights."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(average: Any, values: Any, decay: float, step: Any) -> Any:
    """``average`` moved toward ``values`` (same pytree): ``d * average + (1 - d) * values`` with
    ``d = ema_decay_at(decay, step)``; integer leaves (BatchNorm's ``num_batches_tracked``) take the value."""
    d = ema_decay_at(decay, step)

    def one(a, v):
        if not jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating):
            return v
        return (d * a + (1.0 - d) * v).astype(jnp.asarray(a).dtype)

    return jax.tree_util.tree_map(one, average, values)

