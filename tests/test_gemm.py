"""MKL's sgemm as an XLA custom call (jaxvgg.gemm) computes XLA's products, gradients included."""

import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from functools import partial

from jaxvgg import gemm, models
from jaxvgg.policy import Policy

ON_X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"


@pytest.fixture
def mkl():
    """Skips where MKL's handler cannot be built; the tests pass backend="mkl" explicitly."""
    if gemm.problem() is not None and not ON_X86_LINUX:
        pytest.skip(gemm.problem())


def _rand(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def test_the_handler_is_built_where_setup_builds_it():
    # scripts/setup.sh builds it on x86-64 Linux (CI included), so every other test here runs there
    if not ON_X86_LINUX:
        pytest.skip("MKL wheels and the build script are for x86-64 Linux")
    assert gemm.problem() is None, gemm.problem()


@pytest.mark.parametrize("m,k,n", [(300, 200, 100), (1, 4096, 256), (2048, 27, 64), (7, 1, 5), (0, 3, 4), (2, 0, 4)])
def test_matmul_and_its_gradients_match_float64_products(mkl, m, k, n):
    a, b = _rand(m, k, seed=1), _rand(k, n, seed=2)
    f = jax.jit(partial(gemm.matmul, backend="mkl"))
    assert "jaxvgg_mkl_sgemm" in f.lower(a, b).as_text()
    want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
    np.testing.assert_allclose(f(a, b), want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max(initial=0)))
    c = _rand(m, n, seed=3)  # the cotangent: then the gradients are c @ b^T and a^T @ c, pure products
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(gemm.matmul(a, b, "mkl") * c), argnums=(0, 1)))(a, b)
    a64, b64, c64 = (np.asarray(v, np.float64) for v in (a, b, c))
    for got, want in zip(g, (c64 @ b64.T, a64.T @ c64)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(want).max(initial=0)))


def test_vmap_of_matmul_runs_one_product_per_element(mkl):
    a, b = _rand(3, 4, 6), _rand(3, 6, 2)
    np.testing.assert_allclose(jax.vmap(partial(gemm.matmul, backend="mkl"))(a, b), a @ b, rtol=1e-5, atol=1e-5)


def test_bad_backend_and_missing_handler_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="'cublas'"):
        gemm.matmul(_rand(2, 2), _rand(2, 2), "cublas")
    monkeypatch.setattr(gemm, "problem", lambda: f"{gemm.LIBRARY} is not built (bash scripts/build_gemm.sh)")
    with pytest.raises(RuntimeError, match="libjaxvgg_gemm.so is not built"):
        gemm.matmul(_rand(2, 2), _rand(2, 2), "mkl")
    np.testing.assert_array_equal(gemm.matmul(_rand(2, 2), _rand(2, 3), "xla"), _rand(2, 2) @ _rand(2, 3))


@pytest.mark.parametrize("name,hw", [("cifar_cnn", 32), ("mnist_lenet", 28)])
def test_models_train_the_same_with_either_backend(mkl, name, hw):
    """The loss and gradient of a whole model: MKL's products against XLA's, same parameters."""
    x = _rand(4, hw, hw, 3 if name == "cifar_cnn" else 1, seed=3)
    variables = models.init_params(name, jax.random.PRNGKey(0), input_shape=x.shape[1:])

    def grads(backend):
        model = models.create_model(name, policy=Policy(forms="cpu", gemm=backend))
        loss = lambda v: -jnp.mean(model.apply(v, x, train=True)[:, 0])  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(variables)

    ref_loss, ref = grads("xla")
    out_loss, out = grads("mkl")
    np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(out), jax.tree_util.tree_leaves(ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_every_dense_layer_of_the_models_and_the_transfer_head_goes_through_mkl(mkl):
    policy = Policy(forms="cpu", gemm="mkl")

    def sgemm_calls(name, x):
        module = models.create_model(name, policy=policy)
        variables = jax.jit(module.init)(jax.random.PRNGKey(0), x)
        return jax.jit(module.apply).lower(variables, x).as_text().count(f"@{gemm.FFI_TARGET}(")

    assert sgemm_calls("transfer_head", jnp.zeros((2, 4096))) == 2
    assert sgemm_calls("mnist_linear", jnp.zeros((2, 28, 28, 1))) == 1
    # LeNet in inference: conv1 direct (no product), conv2 by lax.conv above 64 output pixels, 3 Dense
    assert sgemm_calls("mnist_lenet", jnp.zeros((2, 28, 28, 1))) == 3


def test_mkl_products_are_right_beside_torch_loaded_first(mkl):
    """torch ships its own MKL and OpenMP; loaded first, they must not change what this library's sgemm computes."""
    pytest.importorskip("torch")
    code = ("import torch; import numpy as np, jax.numpy as jnp; from jaxvgg import gemm; "
            "a = np.random.default_rng(0).random((300, 200), np.float32); "
            "b = np.random.default_rng(1).random((200, 100), np.float32); "
            "diff = float(np.abs(np.asarray(gemm.matmul(jnp.asarray(a), jnp.asarray(b), 'mkl')) - a @ b).max()); "
            "assert diff < 1e-3, diff")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
