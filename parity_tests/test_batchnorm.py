"""BatchNorm parity in training mode: the VGG-BN family against real torchvision models and torch_ref.

From the same weights and batch, dropout off: evaluation outputs and every layer's output (BN layers
included), training-mode outputs and the running statistics after one forward pass, the gradients of
the training-mode loss, ten SGD steps (momentum, weight decay) with the parameters and running
statistics compared after every step, in float64 and float32, and the bit-exact state_dict round trip.

torchvision initialises BatchNorm as the identity (weight 1, bias 0, running mean 0, variance 1), under
which evaluation mode cannot tell a wrong normalisation from none; every test here first draws the BN
weights and buffers at random (seeded) in the torch model, then converts.
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import jaxvgg
from jaxvgg import optim, parallel
from jaxvgg.train import TrainState, train_step
from parity_tests.common import (Case, build_torch, convert, flax_activations, inputs, labels, max_abs, policy,
                                 to_nchw, torch_activations)

torchvision = pytest.importorskip("torchvision")

# (case, torchvision constructor or None for the torch_ref original)
CASES = [
    (Case("vgg11_bn_torchvision", 32, 32, 10, batch=4, tol=1e-4), torchvision.models.vgg11_bn),
    (Case("vgg16_bn_torchvision", 32, 32, 10, batch=2, tol=1e-4), torchvision.models.vgg16_bn),
    (Case("vgg11_bn", 32, 32, 10, batch=4, tol=1e-5), None),  # the CIFAR-native head on the 512-d flatten
]
IDS = [c.id for c, _ in CASES]
STATS = ("running_mean", "running_var", "num_batches_tracked")
STEPS = 10
F64_ATOL = 1e-9
F32_ATOL = 1e-5
# the 138 M-parameter torchvision models' 10-step runs take minutes on the 2-core CI machine
HEAVY = {"vgg11_bn_torchvision", "vgg16_bn_torchvision"}
# their 25,088-wide first Linear (a 1x1 map pooled up to 7x7) over BatchNorm of 8-16 values a channel makes
# lr 0.01 diverge within 10 steps (loss ~15), where float32 rounding grows without bound in both frameworks
LR = {"vgg11_bn_torchvision": 1e-3, "vgg16_bn_torchvision": 1e-3}


def build(case: Case, factory, seed: int = 0) -> torch.nn.Module:
    """The torch model (dropout 0), its BatchNorm weights and buffers drawn at random, in eval mode."""
    torch.manual_seed(seed)
    model = (build_torch(case, seed, dropout=0.0) if factory is None
             else factory(weights=None, num_classes=case.num_classes, dropout=0.0))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)  # U(0.5, 1.5)
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(3)
    return model.eval()


def flax_model(case: Case, form: str):
    return jaxvgg.create_model(case.name, num_classes=case.num_classes, policy=policy(case, form), dropout_rate=0.0)


def stats_of(state_dict: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.detach().numpy() if hasattr(v, "detach") else v)
            for k, v in state_dict.items() if k.endswith(STATS)}


def worst(a: dict, b: dict, keys=None) -> float:
    keys = set(a) if keys is None else keys
    assert keys <= set(a) and keys <= set(b), sorted(keys ^ (set(a) & set(b)))
    return max(max_abs(a[k], b[k]) for k in keys)


@pytest.mark.parametrize("case,factory", CASES, ids=IDS)
def test_bn_eval_outputs_and_every_layer_match_torch(case, factory, impl, record):
    torch_model = build(case, factory)
    x = inputs(case)
    torch_out, torch_acts = torch_activations(torch_model, x)
    flax_out, flax_acts = flax_activations(case, convert(case, torch_model), x, impl)
    record(case.id, "outputs (eval)", max_abs(flax_out, torch_out), f"rtol=atol={case.tol:g}")
    np.testing.assert_allclose(flax_out, torch_out, rtol=case.tol, atol=case.tol)

    bn_layers = {k.rsplit(".", 1)[0].replace(".", "_") for k in torch_model.state_dict() if k.endswith("running_mean")}
    assert bn_layers and bn_layers <= set(flax_acts), sorted(bn_layers - set(flax_acts))
    assert set(flax_acts) <= set(torch_acts), sorted(set(flax_acts) - set(torch_acts))
    worst_rel = 0.0
    for name, act in flax_acts.items():
        scale = max(1.0, float(np.abs(torch_acts[name]).max()))
        np.testing.assert_allclose(act, torch_acts[name], rtol=case.tol, atol=case.tol * scale, err_msg=name)
        worst_rel = max(worst_rel, max_abs(act, torch_acts[name]) / scale)
    record(case.id, f"{len(flax_acts)} layer outputs ({len(bn_layers)} BN), max |Δ| / max(1, max|act|)", worst_rel,
           f"rtol={case.tol:g}, atol={case.tol:g}*max(1, max|act|)")


@pytest.mark.parametrize("case,factory", CASES, ids=IDS)
def test_bn_training_forward_outputs_and_running_statistics_match_torch(case, factory, impl, record):
    torch_model = build(case, factory)
    variables = convert(case, torch_model)
    x = inputs(case)
    torch_out = torch_model.train()(to_nchw(x)).detach().numpy()
    torch_stats = stats_of(torch_model.state_dict())

    model = flax_model(case, impl)
    forward = parallel.compile_step(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                                    model.policy, "train")
    out, updates = forward(variables, jnp.asarray(x))
    flax_stats = stats_of(jaxvgg.to_torch(case.name, {"params": variables["params"], **updates}))

    scale = max(1.0, float(np.abs(torch_out).max()))
    record(case.id, "outputs (training mode, batch statistics)", max_abs(out, torch_out),
           f"rtol={case.tol:g}, atol={case.tol:g}*max(1, max|out|)")
    np.testing.assert_allclose(out, torch_out, rtol=case.tol, atol=case.tol * scale)
    assert set(flax_stats) == set(torch_stats)
    for k, v in torch_stats.items():
        if k.endswith("num_batches_tracked"):
            assert int(flax_stats[k]) == int(v) == 4, k  # 3 drawn above, plus this forward pass
        else:
            np.testing.assert_allclose(flax_stats[k], v, rtol=1e-5, atol=1e-5, err_msg=k)
    record(case.id, "running mean/var after one training forward", worst(flax_stats, torch_stats),
           "rtol=atol=1e-5; num_batches_tracked exact")
    # and the unchanged values really changed: a momentum of 0 (or 1) would not pass the line above
    before = stats_of(jaxvgg.to_torch(case.name, variables))
    assert worst(flax_stats, before, {k for k in before if k.endswith("running_var")}) > 1e-3


# vgg16_bn's gradients (11 s a form) run with the slow tests; vgg11_bn_torchvision's and vgg11_bn's stay in CI
GRAD_CASES = [pytest.param(c, f, id=c.id, marks=[pytest.mark.slow] if c.name == "vgg16_bn_torchvision" else [])
              for c, f in CASES]


@pytest.mark.parametrize("case,factory", GRAD_CASES)
def test_bn_training_mode_gradients_match_torch(case, factory, impl, record):
    torch_model = build(case, factory).train()
    variables = convert(case, torch_model)
    x, y = inputs(case), labels(case)
    loss_t, grads_t = torch_loss_and_gradients(torch_model, x, y)

    model = flax_model(case, impl)

    def loss_fn(params):
        out, _ = model.apply({**variables, "params": params}, jnp.asarray(x), train=True, mutable=["batch_stats"])
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(out), jnp.asarray(y)[:, None], axis=-1))

    loss_f, grads = parallel.compile_step(jax.value_and_grad(loss_fn), model.policy, "train")(variables["params"])
    grads_f = jaxvgg.to_torch(case.name, grads)
    record(case.id, "loss (training mode)", abs(float(loss_f) - loss_t), "rtol=atol=1e-5")
    np.testing.assert_allclose(float(loss_f), loss_t, rtol=1e-5, atol=1e-5)
    assert set(grads_f) == set(grads_t)
    grads_64 = None  # torch's float64 gradients, the judge where the two float32 results disagree
    for k, g in grads_t.items():
        # gradients through batch statistics of a few examples are large and cancel: scale atol by the tensor's
        atol = 1e-5 * max(1.0, float(np.abs(g).max()))
        if np.allclose(grads_f[k], g, rtol=1e-4, atol=atol):
            continue
        # Deep in VGG16-BN (13 BatchNorms over 2 images) float32 rounding alone moves a few gradient entries
        # past that tolerance, by an amount that depends on the machine's summation order. Then jaxvgg must be
        # as close to the float64 gradient as torch's float32 one is (within 2x): an error of jaxvgg fails.
        if grads_64 is None:
            grads_64 = torch_loss_and_gradients(torch_model, x, y, torch.float64)[1]
        ours, theirs = max_abs(grads_f[k], grads_64[k]), max_abs(g, grads_64[k])
        record(case.id, f"{k} gradient vs torch float64 (torch float32's error {theirs:.1e})", ours,
               "<= 2x torch float32's error")
        assert ours <= 2.0 * theirs + atol * 1e-3, (k, ours, theirs)
    record(case.id, f"gradients of {len(grads_t)} tensors (training mode)", worst(grads_f, grads_t),
           "rtol=1e-4, atol=1e-5*max(1, max|grad|), else vs float64")


def torch_loss_and_gradients(torch_model: torch.nn.Module, x: np.ndarray, y: np.ndarray,
                             dtype: torch.dtype = torch.float32) -> tuple[float, dict]:
    """The training-mode cross-entropy of ``torch_model`` on (x, y) and its gradients, in ``dtype``
    (another dtype than float32: computed by a copy of the model in it, from the same weights)."""
    model = (torch_model if dtype == torch.float32 else copy.deepcopy(torch_model).to(dtype)).train()
    model.zero_grad()
    loss = F.cross_entropy(model(to_nchw(x).to(dtype)), torch.from_numpy(y).long())
    loss.backward()
    return loss.item(), {k: p.grad.numpy().copy() for k, p in model.named_parameters()}


def _lockstep(case: Case, torch_model: torch.nn.Module, variables: dict, form: str, dtype,
              batches: list) -> tuple[float, float, np.ndarray, np.ndarray, dict, dict]:
    """Torch and jaxvgg SGD steps side by side in ``dtype``, from a copy of ``torch_model`` and ``variables``.

    Returns (worst params |Δ| over the steps, worst running-statistics |Δ|, torch's losses, jaxvgg's,
    torch's final state_dict and jaxvgg's, as float64 numpy).
    """
    lr = LR.get(case.name, 0.01)
    torch_model = copy.deepcopy(torch_model)
    torch_dtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    torch_model = torch_model.to(torch_dtype).train()
    opt = torch.optim.SGD(torch_model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    cast = {"params": jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), variables["params"]),
            "batch_stats": jax.tree_util.tree_map(  # the step counter stays an integer
                lambda a: np.asarray(a, dtype) if np.issubdtype(a.dtype, np.floating) else a, variables["batch_stats"])}
    tx = optim.create_optimizer("sgd", lr, momentum=0.9, weight_decay=5e-4)
    state = TrainState.for_model(case.name, flax_model(case, form), cast, tx, rng=jax.random.key(0))
    step = parallel.compile_step(train_step, state.policy, "train")

    params_worst = stats_worst = 0.0
    losses_t, losses_f = [], []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(torch_model(to_nchw(x).to(torch_dtype)), torch.from_numpy(y).long())
        loss.backward()
        opt.step()
        state, metrics = step(state, {"image": jnp.asarray(x.astype(dtype)), "label": jnp.asarray(y)})
        theirs = {k: v.detach().double().numpy() for k, v in torch_model.state_dict().items()}
        ours = {k: np.asarray(v, np.float64) for k, v in jaxvgg.to_torch(case.name, state.variables).items()}
        assert set(theirs) == set(ours), sorted(set(theirs) ^ set(ours))
        stat_keys = {k for k in theirs if k.endswith(STATS)}
        params_worst = max(params_worst, worst(ours, theirs, set(theirs) - stat_keys))
        stats_worst = max(stats_worst, worst(ours, theirs, stat_keys))
        losses_t.append(loss.item()), losses_f.append(float(metrics["loss"]))
    return params_worst, stats_worst, np.array(losses_t), np.array(losses_f), theirs, ours


STEP_CASES = [pytest.param(c, f, id=c.id, marks=[pytest.mark.slow] if c.name in HEAVY else []) for c, f in CASES]


@pytest.mark.parametrize("case,factory", STEP_CASES)
def test_bn_ten_sgd_steps_give_the_same_parameters_and_statistics(case, factory, impl, record):
    """Ten SGD steps (lr 0.01, or `LR`'s) in training mode; parameters and running statistics compared after
    every step.

    float64 shows the arithmetic is the same; in float32 the runs must agree to 1e-5 or within twice the
    distance either framework's own float32 run has from its float64 run at the end (BatchNorm over a few
    examples amplifies rounding, as Adam does in the other 10-step tests).
    """
    batches = [(inputs(case, seed=100 + i), labels(case, seed=200 + i)) for i in range(STEPS)]
    torch_model = build(case, factory)
    variables = convert(case, torch_model)  # before float64 is on: flax would initialise its template in float64
    p32, s32, tl32, fl32, torch32, flax32 = _lockstep(case, torch_model, variables, impl, np.float32, batches)
    jax.config.update("jax_enable_x64", True)
    try:
        p64, s64, tl64, fl64, torch64, flax64 = _lockstep(case, torch_model, variables, impl, np.float64, batches)
    finally:
        jax.config.update("jax_enable_x64", False)

    record(case.id, f"sgd: params after each of {STEPS} steps, float64", p64, f"atol={F64_ATOL:g}")
    record(case.id, f"sgd: running mean/var after each of {STEPS} steps, float64", s64, f"atol={F64_ATOL:g}")
    assert p64 <= F64_ATOL and s64 <= F64_ATOL and max_abs(fl64, tl64) <= F64_ATOL

    noise = max(worst(flax32, flax64), worst(torch32, torch64))
    tol = max(F32_ATOL, 2 * noise)
    record(case.id, f"sgd: params after each of {STEPS} steps, float32", p32,
           f"max({F32_ATOL:g}, 2 x f32 rounding = {2 * noise:.1e})")
    record(case.id, f"sgd: running mean/var after each of {STEPS} steps, float32", s32,
           f"max({F32_ATOL:g}, 2 x f32 rounding = {2 * noise:.1e})")
    assert p32 <= tol and s32 <= tol
    loss_noise = max(max_abs(fl32, fl64), max_abs(tl32, tl64))
    record(case.id, f"sgd: losses of {STEPS} steps, float32", max_abs(fl32, tl32),
           f"max(1e-5, 2 x f32 rounding = {2 * loss_noise:.1e})")
    assert max_abs(fl32, tl32) <= max(1e-5, 2 * loss_noise)


@pytest.mark.parametrize("factory", [torchvision.models.vgg11_bn, torchvision.models.vgg16_bn],
                         ids=["vgg11_bn", "vgg16_bn"])
def test_torchvision_bn_round_trip_is_bit_exact(factory, record):
    name = f"{factory.__name__}_torchvision"
    model = build(Case(name, 224, 224, 1000), factory)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    back = jaxvgg.to_torch(name, jaxvgg.from_torch(name, state))
    assert set(back) == set(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape, k
        assert np.array_equal(back[k], state[k]), k
    record(name, "torch -> flax -> torch round trip (BN buffers included)", worst(back, state), "bit-exact")
