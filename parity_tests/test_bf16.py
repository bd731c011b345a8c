"""bfloat16 mixed precision against ``torch.autocast("cpu", dtype=torch.bfloat16)``.

bfloat16 keeps 8 bits of mantissa, so neither framework's bf16 numbers can match float32 to 1e-5, nor
each other's bit for bit (they round different intermediate sums). What is true, and tested: from the
same weights and inputs, jaxvgg's bf16 outputs, gradients and 10-step trajectories are as close to a
float64 run of the same model as torch.autocast's are. Each check measures both errors against the
float64 reference and allows jaxvgg's to be at most `RATIO` times torch's (and prints both); and jaxvgg
and torch.autocast must differ from each other by at most `AGREE_RATIO` times torch's own error: the two
frameworks disagree no more than bfloat16 rounding moves either of them.

Errors are relative: max |x - x64| / max |x64| over each tensor, the worst tensor reported, so a
gradient of 1e-4 and one of 1 count alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxvgg
from jaxvgg import models, parallel
from jaxvgg.train import TrainState, per_example_loss, train_step
from parity_tests.common import Case, build_torch, convert, inputs, labels, policy, to_nchw
from parity_tests.test_training import _flax_optimizer, _torch_optimizer, torch_grads, torch_loss

RATIO = 2.0  # jaxvgg's bf16 error from float64 may be at most this many times torch.autocast's
AGREE_RATIO = 1.5  # |jaxvgg bf16 - torch.autocast| may be at most this many times torch.autocast's error
STEPS = 10

CASES = [
    Case("mnist_linear", 28, 28, 10, batch=16),
    Case("mnist_lenet", 28, 28, 10, batch=16),
    Case("cifar_cnn", 32, 32, 10, batch=16),
    Case("vgg11", 32, 32, 10, batch=8),
]
# VGG-A's 10-step runs take a minute or more on 2 cores; its forward and gradient checks stay in CI
STEP_CASES = [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.name == "vgg11" else []) for c in CASES]
IDS = [c.id for c in CASES]


def rel_err(a, ref) -> float:
    """max |a - ref| / max |ref| (ref's scale; 1 where ref is all zeros)."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / (np.abs(ref).max() or 1.0))


def worst_rel(a: dict, ref: dict) -> float:
    assert set(a) == set(ref), set(a) ^ set(ref)
    return max(rel_err(a[k], ref[k]) for k in ref)


def bf16_model(case: Case, form: str):
    """The flax twin in ``form``, computing in bfloat16, dropout off."""
    kw = {"dropout_rate": 0.0} if case.name.startswith("vgg") else {}
    model = jaxvgg.create_model(case.name, num_classes=case.num_classes, policy=policy(case, form),
                                dtype=jnp.bfloat16, **kw)
    assert model.policy.dtype == "bfloat16"
    return model


def torch_forward_backward(case: Case, model: torch.nn.Module, x: np.ndarray, y: np.ndarray, dtype=None,
                           autocast: bool = False) -> tuple[np.ndarray, dict]:
    """Training-mode outputs and gradients of the loss: float64 (``dtype``) or float32 under autocast bf16."""
    model.zero_grad()
    images = to_nchw(x) if dtype is None else to_nchw(x).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = model(images)
        loss = torch_loss(case, out, torch.from_numpy(y).long())
    loss.backward()
    return out.detach().float().numpy(), torch_grads(model)


def record_pair(record, case: Case, what: str, jax_err: float, torch_err: float, agree: float) -> None:
    """Two rows: jaxvgg's error from float64 (bounded by torch's), and jaxvgg vs torch.autocast."""
    record(case.id, f"bf16 {what}: rel. error vs float64", jax_err,
           f"<= {RATIO:g} x torch.autocast's {torch_err:.2e}")
    record(case.id, f"bf16 {what}: vs torch.autocast (rel.)", agree, f"<= {AGREE_RATIO:g} x {torch_err:.2e}")
    assert jax_err <= RATIO * torch_err, (what, jax_err, torch_err)
    assert agree <= AGREE_RATIO * torch_err, (what, agree, torch_err)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bf16_outputs_and_gradients_are_as_close_to_float64_as_torch_autocast(case, impl, record):
    torch_model = build_torch(case, dropout=0.0).train()
    variables = convert(case, torch_model)
    x, y = inputs(case), labels(case)

    out_ac, grads_ac = torch_forward_backward(case, torch_model, x, y, autocast=True)
    torch64 = build_torch(case, dropout=0.0).train().double()
    out64, grads64 = torch_forward_backward(case, torch64, x, y, dtype=torch.float64)

    model, log_probs = bf16_model(case, impl), models.get_spec(case.name).log_probs

    def loss_fn(params):
        out = model.apply({"params": params}, jnp.asarray(x), train=True)
        return per_example_loss(out, jnp.asarray(y), log_probs).mean(), out

    (_, out), grads = parallel.compile_step(jax.value_and_grad(loss_fn, has_aux=True), model.policy, "train")(
        variables["params"])
    assert out.dtype == jnp.float32  # logits / log-probs leave the model in float32
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))  # master weights' dtype
    grads = {k: v for k, v in jaxvgg.to_torch(case.name, grads).items() if k in grads64}

    out = np.asarray(out, np.float64)
    record_pair(record, case, "outputs", rel_err(out, out64), rel_err(out_ac, out64),
                float(np.abs(out - out_ac).max() / np.abs(out64).max()))
    agree = max(float(np.abs(grads[k] - grads_ac[k]).max() / (np.abs(grads64[k]).max() or 1.0)) for k in grads64)
    record_pair(record, case, f"gradients of {len(grads64)} tensors", worst_rel(grads, grads64),
                worst_rel(grads_ac, grads64), agree)


def _torch_steps(case: Case, init_state: dict, batches: list, autocast: bool) -> dict:
    """10 SGD steps, float64 or float32 under autocast bf16; the final parameters as float64."""
    model = build_torch(case, dropout=0.0)
    model.load_state_dict(init_state)
    model = (model if autocast else model.double()).train()
    opt = _torch_optimizer("sgd", [p for p in model.parameters() if p.requires_grad])
    for x, y in batches:
        opt.zero_grad()
        images = to_nchw(x) if autocast else to_nchw(x).double()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch_loss(case, model(images), torch.from_numpy(y).long())
        loss.backward()
        opt.step()
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", STEP_CASES)
def test_ten_bf16_sgd_steps_stay_as_close_to_float64_as_torch_autocast(case, impl, record):
    torch_model = build_torch(case, dropout=0.0)
    init_state = {k: v.clone() for k, v in torch_model.state_dict().items()}
    variables = convert(case, torch_model)
    batches = [(inputs(case, seed=100 + i), labels(case, seed=200 + i)) for i in range(STEPS)]
    torch64 = _torch_steps(case, init_state, batches, autocast=False)
    torch_ac = _torch_steps(case, init_state, batches, autocast=True)

    model = bf16_model(case, impl)
    params = variables["params"]
    state = TrainState.for_model(case.name, model, {"params": params}, _flax_optimizer("sgd", case, params),
                                 rng=jax.random.key(0))
    step = parallel.compile_step(train_step, state.policy, "train")
    for x, y in batches:
        state, _ = step(state, {"image": jnp.asarray(x), "label": jnp.asarray(y)})
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves((state.params, state.opt_state))
               if jnp.issubdtype(p.dtype, jnp.floating))
    final = jaxvgg.to_torch(case.name, state.params)

    # the distance travelled from the initial weights is what rounding perturbs: measure errors against it
    moved = {k: torch64[k] - init_state[k].double().numpy() for k in torch64}

    def drift(p: dict) -> float:
        return max(float(np.abs(p[k] - torch64[k]).max() / (np.abs(moved[k]).max() or 1.0)) for k in torch64)

    agree = max(float(np.abs(final[k] - torch_ac[k]).max() / (np.abs(moved[k]).max() or 1.0)) for k in torch64)
    record_pair(record, case, f"params after {STEPS} SGD steps (rel. to the update)", drift(final), drift(torch_ac),
                agree)
