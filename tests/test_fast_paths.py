"""The CPU fast forms (im2col, direct and Toeplitz convs, reshape max-pool) compute what the lax forms compute."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvgg import layers, models, runtime
from jaxvgg.policy import NATIVE, YNN_FUSION_OPTION, Policy, make_policy


def _lax_conv(x, k, p):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _assert_conv_matches_lax(conv, x, k, padding):
    """``conv(x, k, padding)`` and its gradients with respect to input and kernel equal lax.conv's."""
    ref, out = _lax_conv(x, k, padding), conv(x, k, padding)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    g_ref = jax.grad(lambda x, k: jnp.sum(jnp.sin(_lax_conv(x, k, padding))), argnums=(0, 1))(x, k)
    g_out = jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, padding))), argnums=(0, 1))(x, k)
    for a, b in zip(g_out, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw,cin,cout,kernel,padding", [
    ((32, 32), 3, 8, 3, 1), ((7, 5), 4, 6, 3, 0), ((2, 2), 16, 8, 3, 1), ((28, 28), 1, 6, 5, 2), ((9, 9), 3, 4, 1, 0),
    ((6, 7), 1, 3, 3, 0),
])
def test_im2col_matches_lax_conv(hw, cin, cout, kernel, padding):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *hw, cin)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)).astype(np.float32))
    _assert_conv_matches_lax(layers.conv_im2col, x, k, padding)


@pytest.mark.parametrize("hw,cout,kernel,padding", [((28, 28), 6, 5, 2), ((6, 7), 3, 3, 0), ((5, 4), 2, 1, 1)])
def test_direct_matches_lax_conv_for_single_channel_inputs(hw, cout, kernel, padding):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, *hw, 1)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 1, cout)).astype(np.float32))
    _assert_conv_matches_lax(layers.conv_direct, x, k, padding)


def test_direct_refuses_several_input_channels():
    with pytest.raises(ValueError, match=r"single-channel inputs only; the kernel is \(3, 3, 2, 4\)"):
        layers.conv_direct(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), 1)


@pytest.mark.parametrize("hw,cin,cout,kernel,padding", [
    ((2, 2), 16, 8, 3, 1),  # VGG's last block at 32x32: every pixel pair joined by a tap
    ((1, 1), 4, 6, 3, 1),  # only the centre tap
    ((3, 3), 5, 4, 3, 1),  # corner pixels joined by no tap: zero blocks
    ((2, 3), 3, 4, 3, 1), ((3, 3), 2, 4, 3, 0), ((4, 4), 3, 2, 5, 2),
])
def test_toeplitz_matches_lax_conv(hw, cin, cout, kernel, padding):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, *hw, cin)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(kernel, kernel, cin, cout)).astype(np.float32))
    _assert_conv_matches_lax(layers.conv_toeplitz, x, k, padding)


def test_toeplitz_taps_of_a_2x2_map():
    # input pixel (r, s) reaches output pixel (p, q) through tap (r - p + 1, s - q + 1) of a 3x3 kernel
    taps = layers.toeplitz_taps(2, 2, 3, 3, 1)
    assert taps.shape == (4, 4)
    assert taps[0].tolist() == [4, 3, 1, 0]  # input (0, 0) to outputs (0, 0), (0, 1), (1, 0), (1, 1)
    assert taps[3].tolist() == [8, 7, 5, 4]
    assert layers.toeplitz_taps(3, 3, 3, 3, 1)[0, 8] == 9  # (0, 0) and (2, 2) are joined by no tap


def _conv_primitives(hw, forms):
    layer = layers.Conv2d(8, 3, 1, policy=Policy(forms=forms))
    x = jnp.ones((2, *hw, 4))
    variables = layer.init(jax.random.PRNGKey(0), x)
    return {str(e.primitive) for e in jax.make_jaxpr(lambda v: layer.apply(v, x, True))(variables).eqns}


def test_conv2d_layer_picks_toeplitz_on_maps_smaller_than_its_window():
    assert "gather" in _conv_primitives((2, 2), "cpu")  # the Toeplitz matrix, gathered from taps
    assert "conv_general_dilated" not in _conv_primitives((2, 2), "cpu")
    assert "gather" not in _conv_primitives((4, 4), "cpu")  # im2col in training
    assert "conv_general_dilated" in _conv_primitives((2, 2), "native")


@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (2, 2), (5, 5)])
def test_reshape_max_pool_matches_reduce_window(hw):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, *hw, 4)).astype(np.float32))
    ref = layers.max_pool_2x2(x, "reduce_window")
    out = layers.max_pool_2x2(x, "reshape")
    assert out.shape == ref.shape == (3, hw[0] // 2, hw[1] // 2, 4)  # floor mode: odd edges dropped
    np.testing.assert_array_equal(out, ref)
    # without ties both gradients route to the same argmax
    g_ref = jax.grad(lambda v: jnp.sum(layers.max_pool_2x2(v, "reduce_window") ** 2))(x)
    g_out = jax.grad(lambda v: jnp.sum(layers.max_pool_2x2(v, "reshape") ** 2))(x)
    np.testing.assert_array_equal(g_out, g_ref)


def test_compiler_options_reach_xla_and_keep_the_step_s_result():
    """LeNet's training step compiled with YNNPACK off has no YNNPACK fusion and computes the same step."""
    from jaxvgg import optim, parallel
    from jaxvgg.train import TrainState, train_step

    variables = models.init_params("mnist_lenet", jax.random.PRNGKey(0))
    rng = np.random.default_rng(4)
    batch = {"image": jnp.asarray(rng.random((16, 28, 28, 1), np.float32)),
             "label": jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))}
    tuned = make_policy("mnist_lenet", forms="cpu", backend="cpu")
    assert tuned.compiler_options("train") == {YNN_FUSION_OPTION: ""}
    mesh = parallel.make_mesh(1)
    results, texts = [], []
    for policy in (dataclasses.replace(tuned, train_options=()), tuned):
        model = models.create_model("mnist_lenet", policy=policy)
        state = TrainState.for_model("mnist_lenet", model, variables, optim.sgd(0.1, momentum=0.9),
                                     jax.random.PRNGKey(1))
        step = parallel.compile_step(train_step, state.policy, "train", mesh)
        texts.append(step.lower(state, batch).compile().as_text())
        results.append(step(state, batch))
    assert "__ynn_fusion" in texts[0] and "__ynn_fusion" not in texts[1]
    (a, metrics_a), (b, metrics_b) = results
    np.testing.assert_allclose(metrics_a["loss"], metrics_b["loss"], rtol=1e-6)
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_fit_compiles_with_the_state_s_policy(monkeypatch):
    """`fit` compiles its steps through `compile_step` with the state's policy, for training and inference."""
    from jaxvgg import data, optim, parallel
    from jaxvgg.train import FitConfig, TrainState, fit

    seen = []
    real = parallel.compile_step

    def spy(fn, policy, mode, mesh=None, **kwargs):
        seen.append((policy, mode))
        return real(fn, policy, mode, mesh, **kwargs)

    monkeypatch.setattr(parallel, "compile_step", spy)
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    dataset = data.Dataset(images, rng.integers(0, 10, 8).astype(np.int32), tuple(str(i) for i in range(10)))
    variables = models.init_params("mnist_lenet", jax.random.PRNGKey(0))
    to_float = lambda x: x.astype(jnp.float32) / 255.0  # noqa: E731
    for policy in (make_policy("mnist_lenet", forms="cpu", backend="cpu"), NATIVE):
        model = models.create_model("mnist_lenet", policy=policy)
        state = TrainState.for_model("mnist_lenet", model, variables, optim.sgd(0.01), jax.random.PRNGKey(1))
        assert state.policy == policy
        seen.clear()
        fit(state, dataset, dataset, FitConfig(epochs=1, batch_size=4, quiet=True, num_devices=1),
            train_transform=lambda key, x: to_float(x), eval_transform=to_float)
        assert seen == [(policy, "train"), (policy, "infer")]


@pytest.mark.parametrize("name", ["cifar_cnn", "mnist_lenet", pytest.param("vgg11", marks=pytest.mark.slow)])
def test_models_agree_across_forms(name):
    """Whole networks, forward and gradient, with every layer forced to each form."""
    shape = (32, 32, 3) if name != "mnist_lenet" else (28, 28, 1)
    variables = models.init_params(name, jax.random.PRNGKey(0), num_classes=10, input_shape=shape)
    x = jnp.asarray(np.random.default_rng(2).random((2, *shape), np.float32))
    results = []
    for policy in (NATIVE, Policy(forms="fast")):
        model = models.create_model(name, num_classes=10, policy=policy)
        out = model.apply(variables, x)
        grad = jax.grad(lambda v: jnp.sum(model.apply(v, x) ** 2))(variables)
        results.append((out, grad))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(results[0][1]), jax.tree_util.tree_leaves(results[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_allocator_environment(monkeypatch, tmp_path):
    env = runtime.environ_with_allocator("system", {"LD_PRELOAD": "/x/libtcmalloc_minimal.so.4:/y/libfoo.so"})
    assert env["LD_PRELOAD"] == "/y/libfoo.so" and env[runtime.ALLOCATOR_ENV] == "system"
    assert "LD_PRELOAD" not in runtime.environ_with_allocator("system", {"LD_PRELOAD": "/x/libtcmalloc.so.4"})
    fake = tmp_path / "libtcmalloc_minimal.so.4"
    fake.write_bytes(b"")
    monkeypatch.setattr(runtime, "LIBRARY_DIRS", (str(tmp_path),))
    env = runtime.environ_with_allocator("tcmalloc", {"LD_PRELOAD": "/y/libfoo.so"})
    assert env["LD_PRELOAD"] == f"{fake}:/y/libfoo.so"
    monkeypatch.setattr(runtime, "LIBRARY_DIRS", (str(tmp_path / "none"),))
    with pytest.raises(FileNotFoundError, match="libtcmalloc-minimal4"):
        runtime.environ_with_allocator("tcmalloc", {})
    with pytest.raises(ValueError, match="jemalloc"):
        runtime.environ_with_allocator("jemalloc", {})
    monkeypatch.setenv(runtime.ALLOCATOR_ENV, "hoard")
    with pytest.raises(ValueError, match="hoard"):
        runtime.requested_allocator()


def test_fast_environment(monkeypatch, tmp_path):
    fake = tmp_path / "libtcmalloc_minimal.so.4"
    fake.write_bytes(b"")
    monkeypatch.setattr(runtime, "LIBRARY_DIRS", (str(tmp_path),))
    monkeypatch.delenv(runtime.ALLOCATOR_ENV, raising=False)
    env = runtime.fast_environ({"XLA_FLAGS": "--xla_dump_to=/tmp/d"})
    assert env["LD_PRELOAD"] == str(fake)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d"  # no device count: the experiments keep one CPU device
    assert runtime.fast_environ(env) == env  # a second pass changes nothing (the re-exec happens at most once)
    monkeypatch.setenv(runtime.ALLOCATOR_ENV, "system")
    env = runtime.fast_environ({})
    assert "LD_PRELOAD" not in env and "XLA_FLAGS" not in env


def test_auto_num_devices_keeps_big_networks_on_one_cpu_device(monkeypatch):
    from jaxvgg import parallel

    monkeypatch.setattr(jax, "devices", lambda *a: [jax.local_devices()[0]] * 4)
    small = {"w": np.zeros(1000)}
    big = {"w": np.zeros(parallel.CPU_DATA_PARALLEL_MAX_PARAMS + 1)}
    assert parallel.auto_num_devices(small) == 4
    assert parallel.auto_num_devices(small, batch_size=6) == 3  # the largest count the batch divides over
    assert parallel.auto_num_devices(big, batch_size=128) == 1
