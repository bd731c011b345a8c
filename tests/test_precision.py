"""bfloat16 mixed precision: the policy's dtype, every conv form and product in bf16, and training state in float32."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvgg import gemm, layers, models, optim, parallel
from jaxvgg.policy import (CPU_COMPILER_OPTIONS, NATIVE, YNN_FUSION_OPTION, Policy, bf16_units, make_policy,
                           precision_name, resolve_precision)
from jaxvgg.train import TrainState, train_step

BF16 = jnp.bfloat16


def _dots(fn, *args) -> list:
    """(lhs dtype, rhs dtype, out dtype) of every dot_general / conv in ``fn``'s jaxpr, sub-jaxprs included."""
    from jaxvgg.benchmark import _all_eqns

    found = []
    for eqn in _all_eqns(jax.make_jaxpr(fn)(*args)):
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            found.append((eqn.invars[0].aval.dtype, eqn.invars[1].aval.dtype, eqn.outvars[0].aval.dtype))
    return found


# --- resolving the precision ------------------------------------------------------------------------

def test_auto_is_bf16_only_on_hardware_with_bf16_matrix_units():
    assert resolve_precision("auto", "cpu", flags=frozenset({"avx2", "fma"})) == "float32"  # AVX2 only
    assert resolve_precision("auto", "cpu", flags=frozenset({"avx512f", "avx512_bf16"})) == "bfloat16"
    assert resolve_precision("auto", "cpu", flags=frozenset({"amx_tile", "amx_bf16"})) == "bfloat16"
    assert not bf16_units("gpu", compute_capability="7.5")  # T4 / V100: no bf16 tensor cores
    assert bf16_units("gpu", compute_capability="8.0") and bf16_units("cuda", compute_capability="9.0")
    assert bf16_units("tpu")
    assert resolve_precision("fp32", "tpu") == "float32" and resolve_precision("bf16", "cpu") == "bfloat16"
    assert precision_name("bfloat16") == "bf16" and precision_name("float32") == "fp32"


def test_a_machine_without_bf16_units_runs_float32_by_auto(monkeypatch):
    from jaxvgg import policy as policy_module

    monkeypatch.setattr(policy_module, "cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    assert make_policy("cifar_cnn", backend="cpu", precision="auto").dtype == "float32"
    monkeypatch.setattr(policy_module, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    assert make_policy("cifar_cnn", backend="cpu", precision="auto").dtype == "bfloat16"


def test_bad_precisions_are_errors_that_name_the_value():
    with pytest.raises(ValueError, match="precision='fp16'"):
        resolve_precision("fp16")
    with pytest.raises(ValueError, match="Policy.dtype='float16'"):
        Policy(dtype="float16")
    with pytest.raises(ValueError, match="computes float32 products only"):
        Policy(gemm="mkl", dtype="bfloat16")


def test_bf16_policies_multiply_with_xla_and_drop_the_float32_compile_options():
    tuned = make_policy("vgg11", forms="cpu", gemm_backend="xla", backend="cpu", num_devices=1)
    assert tuned.infer_options == CPU_COMPILER_OPTIONS[("vgg11", "infer")]
    mixed = tuned.with_dtype(BF16)
    assert (mixed.dtype, mixed.gemm, mixed.infer_options, mixed.forms) == ("bfloat16", "xla", (), "cpu")
    assert make_policy("vgg11", forms="cpu", backend="cpu", num_devices=1, precision="bf16") == mixed
    assert mixed.with_dtype("float32").dtype == "float32" and tuned.with_dtype(jnp.float32) is tuned
    assert "bfloat16" in mixed.describe()
    assert YNN_FUSION_OPTION not in (mixed.compiler_options("infer") or {})


# --- every form in bf16 -----------------------------------------------------------------------------

def _lax_conv(x, k, p):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


CONVS = [("im2col", (8, 8), 16, 32, 3, 1), ("im2col", (28, 28), 1, 6, 5, 2), ("toeplitz", (2, 2), 32, 16, 3, 1),
         ("direct", (12, 12), 1, 6, 5, 2), ("lax", (8, 8), 16, 8, 3, 1), ("im2col", (5, 5), 4, 6, 1, 0)]


@pytest.mark.parametrize("form,hw,cin,cout,kernel,padding", CONVS, ids=[f"{c[0]}-{c[1][0]}x{c[1][1]}x{c[2]}"
                                                                          for c in CONVS])
def test_each_conv_form_in_bf16_is_the_float32_conv_to_bf16_rounding(form, hw, cin, cout, kernel, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *hw, cin)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)).astype(np.float32) / np.sqrt(kernel * kernel * cin))
    # the reference: float32 arithmetic on the bf16-rounded operands, as a bf16 product with f32 sums computes
    xr, kr = x.astype(BF16).astype(jnp.float32), k.astype(BF16).astype(jnp.float32)
    out = layers.conv(x, k, padding, form, dtype="bfloat16")
    assert out.dtype == jnp.float32  # sums and result in float32; Conv2d rounds the layer's output
    np.testing.assert_allclose(out, _lax_conv(xr, kr, padding), rtol=1e-4, atol=1e-4)

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

    grads = jax.grad(loss(lambda x, k: layers.conv(x, k, padding, form, dtype="bfloat16")), argnums=(0, 1))(x, k)
    ref = jax.grad(loss(lambda x, k: _lax_conv(x, k, padding)), argnums=(0, 1))(x, k)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.float32]  # cotangents in the operands' dtypes
    for g, r in zip(grads, ref):  # the cotangent is rounded to bf16 too: a bf16-sized error, relative
        assert float(jnp.abs(g - r).max() / jnp.abs(r).max()) < 3e-2


@pytest.mark.parametrize("form", ["im2col", "toeplitz"])
def test_bf16_convs_and_their_gradients_multiply_bf16_operands(form):
    # the point of the custom VJPs: the backward products run on the bf16 units as well
    hw, cin = ((2, 2), 16) if form == "toeplitz" else ((8, 8), 16)
    x, k = jnp.ones((2, *hw, cin)), jnp.ones((3, 3, cin, 8))
    fn = jax.grad(lambda x, k: jnp.sum(layers.conv(x, k, 1, form, dtype="bfloat16") ** 2), argnums=(0, 1))
    dots = _dots(fn, x, k)
    assert len(dots) == 3  # forward, input gradient, kernel gradient
    assert all(lhs == rhs == BF16 and out == jnp.float32 for lhs, rhs, out in dots), dots


def test_bf16_matmul_and_its_gradient_multiply_bf16_operands_and_return_float32():
    a, b = jnp.ones((4, 3)), jnp.ones((3, 5))
    assert gemm.matmul(a, b, dtype="bfloat16").dtype == jnp.float32
    dots = _dots(jax.grad(lambda a, b: jnp.sum(gemm.matmul(a, b, dtype="bfloat16") ** 2), argnums=(0, 1)), a, b)
    assert len(dots) == 3 and all(d == (BF16, BF16, jnp.float32) for d in dots), dots
    with pytest.raises(ValueError, match="2-d operands"):
        gemm.matmul(jnp.ones((2, 4, 3)), b, dtype="bfloat16")


# --- models and training ----------------------------------------------------------------------------

INPUTS = {"cifar_cnn": (32, 32, 3), "mnist_linear": (28, 28, 1), "mnist_lenet": (28, 28, 1), "transfer_head": (4096,),
          "vgg16_transfer": (32, 32, 3),
          **{name: (32, 32, 3) for name in models.list_models() if name.startswith("vgg") and "transfer" not in name}}
SMALL = ("cifar_cnn", "vgg11", "vgg11_bn", "mnist_linear", "mnist_lenet", "transfer_head")


def test_every_registry_model_is_covered():
    assert set(INPUTS) == set(models.list_models())


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_every_model_computes_in_bf16_with_float32_parameters_and_outputs(name):
    shape = INPUTS[name]
    model = models.create_model(name, num_classes=10, dtype=jnp.bfloat16)
    assert model.policy.dtype == "bfloat16"
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32))
    if name not in SMALL:  # 130 M parameters: shapes and dtypes only
        variables = jax.eval_shape(lambda: models.init_params(name, jax.random.key(0), 10, shape))
        out = jax.eval_shape(model.apply, variables, x)
        assert out.dtype == jnp.float32 and out.shape == (2, 10)
        return
    variables = models.init_params(name, jax.random.key(0), 10, shape)
    assert {p.dtype for p in jax.tree_util.tree_leaves(variables["params"])} == {jnp.dtype(jnp.float32)}  # param_dtype
    out = model.apply(variables, x)
    ref = models.create_model(name, num_classes=10, policy=NATIVE).apply(variables, x)
    assert out.dtype == jnp.float32
    assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 3e-2  # bf16 rounding, relative
    # layer outputs are bf16 in between, as under torch.autocast
    _, acts = models.layer_outputs(model, variables, x)
    assert any(a.dtype == BF16 for a in acts.values())


def _train(name: str, policy: Policy, steps: int = 8) -> tuple[TrainState, list[float]]:
    model = models.create_model(name, policy=policy)
    state = TrainState.for_model(name, model, models.init_params(name, jax.random.key(0)),
                                 optim.sgd(0.05, momentum=0.9), rng=jax.random.key(1))
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(32, 32, 32, 3)).astype(np.float32)),
             "label": jnp.asarray(rng.integers(0, 10, 32).astype(np.int32))}
    step = parallel.compile_step(train_step, state.policy, "train")
    losses = []
    for _ in range(steps):
        state, metrics = step(state, batch)
        assert metrics["loss"].dtype == jnp.float32
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.mark.parametrize("forms", ["native", "fast"])
def test_bf16_training_keeps_params_optimizer_and_loss_in_float32_and_follows_float32(forms):
    state, losses = _train("cifar_cnn", Policy(forms=forms, dtype="bfloat16"))
    assert state.policy.dtype == "bfloat16"
    floats = [a for a in jax.tree_util.tree_leaves((state.params, state.opt_state))
              if jnp.issubdtype(a.dtype, jnp.floating)]
    assert {a.dtype for a in floats} == {jnp.dtype(jnp.float32)}
    _, reference = _train("cifar_cnn", Policy(forms=forms))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # it learns the batch, step after step
    np.testing.assert_allclose(losses, reference, atol=1e-2)  # along float32's path, to bf16 rounding


def test_float64_runs_stay_float64_under_the_float32_policy():
    # the parity suite's float64 steps: "float32" must cast nothing
    variables = models.init_params("mnist_lenet", jax.random.key(0))
    jax.config.update("jax_enable_x64", True)
    try:
        variables = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), variables)
        for policy in (NATIVE, Policy(forms="fast")):
            out = models.create_model("mnist_lenet", policy=policy).apply(variables, jnp.ones((2, 28, 28, 1)))
            assert out.dtype == jnp.float64
    finally:
        jax.config.update("jax_enable_x64", False)


def test_a_bf16_and_a_float32_model_are_two_programs():
    variables = models.init_params("mnist_linear", jax.random.key(0))
    fn = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
    x = jnp.ones((2, 28, 28, 1))
    fp32, bf16 = (models.create_model("mnist_linear", policy=NATIVE, dtype=d) for d in (jnp.float32, jnp.bfloat16))
    assert fp32 != bf16 and dataclasses.replace(fp32.policy, dtype="bfloat16") == bf16.policy
    assert _dots(lambda v: fp32.apply(v, x), variables)[0][:2] == (jnp.float32, jnp.float32)
    assert _dots(lambda v: bf16.apply(v, x), variables)[0][:2] == (BF16, BF16)
    assert not np.array_equal(fn(fp32, variables, x), fn(bf16, variables, x))
