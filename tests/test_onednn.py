"""oneDNN's convolutions as XLA custom calls (jaxvgg.onednn): the same function as lax.conv, gradients included."""

import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxvgg
from jaxvgg import layers, onednn
from jaxvgg.policy import NATIVE, Policy, make_policy

ON_X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"


def _rand(*shape, seed=0, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale)


@pytest.fixture
def built():
    """Skips where the handler is not built (setup.sh builds it on x86-64 Linux with root and apt)."""
    if onednn.problem("float32") is not None:
        pytest.skip(onednn.problem("float32"))


def test_the_handler_is_built_where_setup_builds_it():
    # setup.sh builds it on x86-64 Linux wherever oneDNN's headers are (it installs them as root with apt)
    if not ON_X86_LINUX or not Path("/usr/include/oneapi/dnnl/dnnl.hpp").exists():
        pytest.skip("no libdnnl-dev here (setup.sh installs it on x86-64 Linux with root and apt)")
    assert onednn.problem("float32") is None, onednn.problem("float32")


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


# (x shape NHWC, kernel shape HWIO, padding): VGG's 3x3 same convs, the CIFAR CNN's unpadded 3x3 on odd
# maps, LeNet's 5x5, a 2x2 map under a 3x3 window
CASES = [((4, 16, 16, 64), (3, 3, 64, 32), 1), ((3, 15, 13, 16), (3, 3, 16, 24), 0),
         ((2, 14, 14, 6), (5, 5, 6, 16), 0), ((5, 2, 2, 32), (3, 3, 32, 16), 1)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("x_shape,k_shape,padding", CASES)
def test_conv_and_its_gradients_equal_autodiff_of_lax_conv(built, dtype, x_shape, k_shape, padding):
    if onednn.problem(dtype) is not None:
        pytest.skip(onednn.problem(dtype))  # bfloat16: oneDNN's kernels need AVX-512
    if not onednn.supports(x_shape, k_shape, padding, dtype):
        pytest.skip(f"oneDNN has only reference code for {x_shape} * {k_shape} here")
    x, k = _rand(*x_shape, seed=1), _rand(*k_shape, seed=2, scale=0.1)
    out = layers.conv_lax(x, k, padding, dtype)
    ct = _rand(*out.shape, seed=3)

    def loss(conv):
        return lambda x, k: jnp.vdot(conv(x, k).astype(jnp.float32), ct)

    ours = onednn.conv(x, k, padding, dtype)
    assert ours.shape == out.shape and ours.dtype == jnp.float32
    grads = jax.grad(loss(lambda x, k: onednn.conv(x, k, padding, dtype)), (0, 1))(x, k)
    reference = jax.grad(loss(lambda x, k: layers.conv_lax(x, k, padding, dtype)), (0, 1))(x, k)
    deltas = [_max_rel(ours, out)] + [_max_rel(g, r) for g, r in zip(grads, reference)]
    # float32: summation order only; bfloat16: lax's autodiff multiplies a float32 cotangent, ours a bfloat16 one
    bound = 1e-5 if dtype == "float32" else 1e-2
    print(f"{dtype} {x_shape} * {k_shape}: max |delta| / max |value| of y, dx, dk: {deltas}")
    assert max(deltas) < bound, deltas
    assert grads[0].dtype == x.dtype and grads[1].dtype == k.dtype


def test_shapes_without_optimised_kernels_are_refused_not_run_slowly(built):
    # oneDNN's reference code is orders of magnitude slower than XLA's forms: the layer keeps its form
    shape, kernel = (2, 8, 8, 3), (3, 3, 3, 8)
    names = {p: onednn.implementation(p, "float32", (*shape, 8, 3, 3, 1)) if onednn.supports(shape, kernel, 1,
                                                                                                "float32") else None
             for p in onednn.PASSES}
    if onednn.supports(shape, kernel, 1, "float32"):
        assert not any(n.startswith("ref") for n in names.values()), names
    else:
        with pytest.raises(RuntimeError, match="only reference code"):
            onednn.conv(_rand(*shape), _rand(*kernel), 1)
    with pytest.raises(ValueError, match="matching channels"):
        onednn.conv(_rand(2, 8, 8, 4), _rand(3, 3, 3, 8), 1)
    with pytest.raises(ValueError, match="expected one of float32, bfloat16"):
        onednn.conv(_rand(2, 8, 8, 4), _rand(3, 3, 4, 8), 1, "float16")


@pytest.mark.parametrize("name", ["cifar_cnn", "mnist_lenet"])
def test_a_model_under_the_onednn_backend_computes_the_native_loss_and_gradients(built, name):
    spec = jaxvgg.models.get_spec(name)
    variables = jaxvgg.init_params(name, jax.random.PRNGKey(0))
    x = _rand(4, *spec.input_shape, seed=4)
    labels = jnp.arange(4) % 10

    def loss_and_grads(policy):
        model = jaxvgg.create_model(name, policy=policy)

        def loss(params):
            logits = model.apply({"params": params}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        step = jax.jit(jax.value_and_grad(loss))
        return step.lower(variables["params"]).as_text(), step(variables["params"])

    (text, (ours, grads)), (_, (native, reference)) = (loss_and_grads(Policy(forms="cpu", conv="onednn")),
                                                      loss_and_grads(NATIVE))
    assert "jaxvgg_onednn_conv_forward" in text and "jaxvgg_onednn_conv_backward_weights" in text
    delta = max(_max_rel(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))
    print(f"{name}: loss {float(ours)} vs {float(native)}; gradients max |delta| / max |value| {delta:.2e}")
    assert abs(float(ours) - float(native)) < 1e-5 and delta < 1e-4


def test_the_policy_resolves_and_checks_the_conv_backend(monkeypatch):
    assert make_policy("vgg11", backend="cpu").conv == "xla"  # "auto": measured (jaxvgg.policy)
    fast = make_policy("vgg11", forms="fast", backend="cpu", num_devices=1).conv
    assert fast == ("onednn" if onednn.problem("float32") is None else "xla")  # "fast" forces it where it runs
    assert make_policy("vgg11", forms="fast", backend="cpu", num_devices=2).conv == "xla"
    with pytest.raises(ValueError, match="Policy.conv='cudnn'"):
        Policy(conv="cudnn")
    with pytest.raises(ValueError, match="conv='cudnn'; expected auto or one of xla, onednn"):
        make_policy("vgg11", backend="cpu", conv_backend="cudnn")
    with pytest.raises(ValueError, match="runs on the CPU only"):
        make_policy("vgg11", backend="gpu", conv_backend="onednn")
    monkeypatch.setattr(onednn, "problem", lambda dtype="float32": "libjaxvgg_conv.so is not built")
    with pytest.raises(RuntimeError, match="conv=onednn, but libjaxvgg_conv.so is not built"):
        make_policy("vgg11", backend="cpu", conv_backend="onednn")
    monkeypatch.undo()
    if onednn.problem("float32") is None:
        policy = make_policy("vgg11", backend="cpu", conv_backend="onednn")
        assert policy.conv == "onednn" and "oneDNN convs" in policy.describe()
        assert not policy.onednn_conv((2, 8, 8, 16), (3, 3, 16, 16), 1, jnp.float64)  # float64 keeps XLA's forms
        assert not NATIVE.onednn_conv((2, 8, 8, 16), (3, 3, 16, 16), 1, jnp.float32)


def test_the_per_layer_table_times_every_form_of_every_layer_and_names_the_fastest(tmp_path, capsys):
    from experiments import conv_layers

    out = tmp_path / "layers.json"
    assert conv_layers.conv_layers("vgg11", 32) == [(32, 3, 64), (16, 64, 128), (8, 128, 256), (8, 256, 256),
                                                    (4, 256, 512), (4, 512, 512), (2, 512, 512), (2, 512, 512)]
    assert set(conv_layers.forms_for(2, 512, 512, 1, "float32")) >= {"lax", "im2col", "toeplitz"}
    rows = conv_layers.main(["--batch-size", "1", "--layers", "2", "--steps", "1", "--rounds", "1", "--json", str(out)])
    assert {(r["side"], r["c_in"], r["c_out"]) for r in rows} == {(32, 3, 64), (16, 64, 128)}
    forms = {r["form"] for r in rows if r["side"] == 16}
    assert forms >= {"lax", "im2col"} and ("onednn" in forms) == (onednn.problem("float32") is None)
    assert all(r["ms"] > 0 for r in rows) and {r["mode"] for r in rows} == {"infer", "train"}
    table = capsys.readouterr().out
    assert "| 16x16 64->128 | train |" in table and "fastest" in table
    assert len(__import__("json").loads(out.read_text())["rows"]) == len(rows)
