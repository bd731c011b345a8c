"""LR rules against torch.optim.lr_scheduler: ReduceLROnPlateau, OneCycleLR, StepLR, CosineAnnealingLR.

Each drives torch's scheduler on a dummy SGD optimizer and ours with the same inputs, and compares
the lr sequences. Ours are float32 (the lr lives in a float32 optimizer state), torch's are Python
floats, so values agree to float32 rounding; the epochs at which the plateau rule reduces the lr
must agree exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxvgg import optim  # noqa: E402

BASE_LR = 0.01

# 40 epochs of validation accuracy: rises, plateaus, rises smaller than the threshold (1e-3),
# dips, and long flat stretches that run through cooldowns and past the 3-reduction floor.
ACCURACIES = [
    0.30, 0.45, 0.52, 0.55, 0.5505, 0.5508, 0.549, 0.5509, 0.56, 0.58,
    0.58, 0.5805, 0.57, 0.5809, 0.5795, 0.60, 0.6004, 0.61, 0.6108, 0.6095,
    0.6109, 0.6107, 0.6050, 0.6120, 0.6125, 0.6129, 0.6128, 0.6127, 0.6200, 0.6203,
    0.6205, 0.6190, 0.6208, 0.6206, 0.6300, 0.6302, 0.6301, 0.6299, 0.6303, 0.6304,
]


def _torch_lrs(make_scheduler, steps: int, step_arg=None) -> np.ndarray:
    """The lr each of ``steps`` steps would use, stepping the scheduler after each (with ``step_arg[i]``)."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE_LR)
    scheduler = make_scheduler(opt)
    lrs = []
    for i in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step() if step_arg is None else scheduler.step(step_arg[i])
    return np.array(lrs)


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref) / np.abs(ref)))


@pytest.mark.parametrize("patience,cooldown", [(0, 0), (1, 0), (2, 1), (1, 3), (3, 2)])
def test_plateau_rule_matches_torch_reduce_on_plateau(record, patience, cooldown):
    threshold = 1e-3
    torch_lrs = _torch_lrs(lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=0.1, patience=patience, threshold=threshold, threshold_mode="abs",
        cooldown=cooldown, min_lr=BASE_LR * 1e-3), len(ACCURACIES) + 1, [*ACCURACIES, 0.0])[1:]
    # torch_lrs[e]: the lr after stepping on epoch e's accuracy, i.e. the lr for epoch e + 1
    plateau = optim.plateau_init(patience=patience, threshold=threshold, cooldown=cooldown)
    ours = []
    for acc in ACCURACIES:
        plateau = optim.plateau_update(plateau, acc)
        ours.append(BASE_LR * float(optim.plateau_scale(plateau)))
    ours = np.array(ours)

    def reductions(lrs):
        return np.flatnonzero(np.diff(lrs, prepend=BASE_LR) < -1e-12 * BASE_LR).tolist()

    assert reductions(ours) == reductions(torch_lrs)
    assert 1 <= len(reductions(torch_lrs)) <= 3
    diff = _rel(ours, torch_lrs)
    record("ReduceLROnPlateau", f"lr sequence, patience={patience} cooldown={cooldown}", diff,
           "same reduction epochs; rel 1e-7 (float32 scale)")
    assert diff <= 1e-7


# 95 steps: torch's peak step 0.3 * 95 - 1 = 27.5 is fractional; 3, 2 and 1 steps (a quick look at a
# few hundred images): 0.3 * T < 1, so the peak step is negative and both skip the warm-up
@pytest.mark.parametrize("steps_per_epoch,epochs", [(20, 5), (19, 5), (3, 1), (1, 2), (1, 1)])
def test_onecycle_schedule_matches_torch_onecycle_lr(record, steps_per_epoch, epochs):
    total_steps = steps_per_epoch * epochs
    schedule = optim.make_schedule("onecycle", BASE_LR, steps_per_epoch=steps_per_epoch, epochs=epochs)
    ours = np.array([float(schedule(i)) for i in range(total_steps)])
    torch_lrs = _torch_lrs(lambda opt: torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=BASE_LR, total_steps=total_steps, cycle_momentum=False), total_steps)
    diff = _rel(ours, torch_lrs)
    record("OneCycleLR", f"lr sequence over {total_steps} steps", diff, "rel 1e-6 (float32)")
    assert diff <= 1e-6


def test_step_schedule_matches_torch_step_lr(record):
    steps_per_epoch, epochs = 7, 12
    schedule = optim.make_schedule("step", BASE_LR, steps_per_epoch=steps_per_epoch, epochs=epochs,
                                   step_epochs=4, gamma=0.1)
    ours = np.array([float(schedule(i)) for i in range(steps_per_epoch * epochs)])
    per_epoch = _torch_lrs(lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.1), epochs)
    diff = _rel(ours, np.repeat(per_epoch, steps_per_epoch))
    record("StepLR", "lr sequence, stepped per epoch", diff, "rel 1e-6 (float32)")
    assert diff <= 1e-6


def test_cosine_schedule_matches_torch_cosine_annealing_lr(record):
    total_steps = 100
    schedule = optim.make_schedule("cosine", BASE_LR, steps_per_epoch=20, epochs=5)
    ours = np.array([float(schedule(i)) for i in range(total_steps)])
    torch_lrs = _torch_lrs(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps),
                           total_steps)
    diff = float(np.max(np.abs(ours - torch_lrs))) / BASE_LR
    record("CosineAnnealingLR", "lr sequence over 100 steps (|Δ| / base_lr)", diff, "1e-6 of base_lr (float32)")
    assert diff <= 1e-6
