"""The CPU fast forms (im2col convs, reshape max-pool) compute what the native lax forms compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvgg import models, runtime


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
    _assert_conv_matches_lax(models.conv_im2col, x, k, padding)


@pytest.mark.parametrize("hw,cout,kernel,padding", [((28, 28), 6, 5, 2), ((6, 7), 3, 3, 0), ((5, 4), 2, 1, 1)])
def test_direct_matches_lax_conv_for_single_channel_inputs(hw, cout, kernel, padding):
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, *hw, 1)).astype(np.float32))
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 1, cout)).astype(np.float32))
    _assert_conv_matches_lax(models.conv_direct, x, k, padding)


def test_direct_refuses_several_input_channels():
    with pytest.raises(ValueError, match=r"single-channel inputs only; the kernel is \(3, 3, 2, 4\)"):
        models.conv_direct(jnp.zeros((1, 5, 5, 2)), jnp.zeros((3, 3, 2, 4)), 1)


@pytest.mark.parametrize("hw", [(8, 8), (7, 9), (2, 2), (5, 5)])
def test_reshape_max_pool_matches_reduce_window(hw):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, *hw, 4)).astype(np.float32))
    ref = models.max_pool_2x2(x, "reduce_window")
    out = models.max_pool_2x2(x, "reshape")
    assert out.shape == ref.shape == (3, hw[0] // 2, hw[1] // 2, 4)  # floor mode: odd edges dropped
    np.testing.assert_array_equal(out, ref)
    # without ties both gradients route to the same argmax
    g_ref = jax.grad(lambda v: jnp.sum(models.max_pool_2x2(v, "reduce_window") ** 2))(x)
    g_out = jax.grad(lambda v: jnp.sum(models.max_pool_2x2(v, "reshape") ** 2))(x)
    np.testing.assert_array_equal(g_out, g_ref)


def test_auto_resolution_on_cpu(monkeypatch):
    monkeypatch.delenv(models.IMPL_ENV, raising=False)
    assert jax.default_backend() == "cpu"
    assert models.resolve_conv_impl("auto", 32 * 32, train=True) == "im2col"
    assert models.resolve_conv_impl("auto", 32 * 32, train=False) == "lax"
    assert models.resolve_conv_impl("auto", 2 * 2, train=False) == "im2col"  # VGG's last block
    assert models.resolve_conv_impl("auto", 28 * 28, train=False, in_channels=1) == "direct"  # LeNet's conv1
    assert models.resolve_conv_impl("auto", 28 * 28, train=True, in_channels=1) == "im2col"
    assert models.resolve_pool_impl("auto", train=True) == "reshape"
    assert models.resolve_pool_impl("auto", train=False) == "reduce_window"
    assert models.resolve_conv_impl("lax", 4, train=True) == "lax"  # explicit choices are kept
    monkeypatch.setenv(models.IMPL_ENV, "native")
    assert models.resolve_conv_impl("auto", 4, train=True) == "lax"
    assert models.resolve_pool_impl("auto", train=True) == "reduce_window"
    monkeypatch.setenv(models.IMPL_ENV, "fast")
    assert models.resolve_conv_impl("auto", 4096, train=False) == "im2col"
    assert models.resolve_conv_impl("auto", 4096, train=False, in_channels=1) == "direct"
    assert models.resolve_pool_impl("auto", train=False) == "reshape"
    monkeypatch.setenv(models.IMPL_ENV, "native")
    assert models.resolve_conv_impl("auto", 4096, train=False, in_channels=1) == "lax"


def test_bad_impl_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="conv_impl='winograd'"):
        models.resolve_conv_impl("winograd", 4, train=True)
    with pytest.raises(ValueError, match="pool_impl='avg'"):
        models.resolve_pool_impl("avg", train=True)
    monkeypatch.setenv(models.IMPL_ENV, "fastest")
    with pytest.raises(ValueError, match="JAXVGG_IMPL='fastest'"):
        models.resolve_conv_impl("auto", 4, train=True)


@pytest.mark.parametrize("name", ["cifar_cnn", "mnist_lenet", "vgg11"])
def test_models_agree_across_forms(name):
    """Whole networks, forward and gradient, with every layer forced to each form."""
    shape = (32, 32, 3) if name != "mnist_lenet" else (28, 28, 1)
    variables = models.init_params(name, jax.random.PRNGKey(0), num_classes=10, input_shape=shape)
    x = jnp.asarray(np.random.default_rng(2).random((2, *shape), np.float32))
    results = []
    for conv, pool in (("lax", "reduce_window"), ("im2col", "reshape")):
        model = models.create_model(name, num_classes=10, conv_impl=conv, pool_impl=pool)
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
    monkeypatch.setenv(runtime.CPU_DEVICES_ENV, "4")
    monkeypatch.delenv(runtime.ALLOCATOR_ENV, raising=False)
    env = runtime.fast_environ({"XLA_FLAGS": "--xla_dump_to=/tmp/d"})
    assert env["LD_PRELOAD"] == str(fake)
    assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/d --xla_force_host_platform_device_count=4"
    # a count the user set wins; a second pass changes nothing (so the re-exec happens at most once)
    assert runtime.fast_environ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})["XLA_FLAGS"].endswith("=2")
    assert runtime.fast_environ(env) == env
    monkeypatch.setenv(runtime.ALLOCATOR_ENV, "system")
    monkeypatch.setenv(runtime.CPU_DEVICES_ENV, "1")
    env = runtime.fast_environ({})
    assert "LD_PRELOAD" not in env and "XLA_FLAGS" not in env
    monkeypatch.delenv(runtime.CPU_DEVICES_ENV)
    assert runtime.cpu_device_count() == 1  # off by default
    monkeypatch.setenv(runtime.CPU_DEVICES_ENV, "auto")
    assert 1 <= runtime.cpu_device_count() <= runtime.MAX_CPU_DEVICES
    monkeypatch.setenv(runtime.CPU_DEVICES_ENV, "many")
    with pytest.raises(ValueError, match="JAXVGG_CPU_DEVICES='many'"):
        runtime.cpu_device_count()


def test_auto_num_devices_keeps_big_networks_on_one_cpu_device(monkeypatch):
    from jaxvgg import parallel

    monkeypatch.setattr(jax, "devices", lambda *a: [jax.local_devices()[0]] * 4)
    small = {"w": np.zeros(1000)}
    big = {"w": np.zeros(parallel.CPU_DATA_PARALLEL_MAX_PARAMS + 1)}
    assert parallel.auto_num_devices(small) == 4
    assert parallel.auto_num_devices(small, batch_size=6) == 3  # the largest count the batch divides over
    assert parallel.auto_num_devices(big, batch_size=128) == 1
