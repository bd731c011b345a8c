"""Matrix products: float32 through MKL's sgemm (an XLA:CPU FFI custom call), and bfloat16 mixed precision.

On the CPU, PyTorch multiplies matrices with MKL, and on the shapes these networks use (im2col
patches times kernels, Dense layers, their gradients) MKL ran faster than XLA:CPU's own dot kernels
on the Intel Xeon they were tuned on (docs/performance.md). `matmul` sends 2-d float32 products to ``cblas_sgemm`` when asked
for backend "mkl" (a `jaxvgg.policy.Policy` field) and the handler is built (``scripts/build_gemm.sh``,
run by ``scripts/setup.sh``), and to XLA's dot otherwise. The call is a pure function of its operands,
so it composes with jit and grad like any primitive: its gradient is two more products (`_mkl_matmul`'s
VJP). This module imports nothing from the rest of jaxvgg and reads no environment variable.

With ``dtype="bfloat16"``, `matmul` multiplies bfloat16 operands with float32 accumulation and result,
and so do both products of its gradient: the cotangent is cast to bfloat16 first. Plain autodiff of
``lax.dot(..., preferred_element_type=float32)`` would multiply a float32 cotangent, which XLA:CPU
computes on its float32 path (or with a bfloat16 result, slower still). These products are XLA's own
dots: MKL's ``cblas_gemm_bf16bf16f32`` ran at a quarter of their rate (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

BACKENDS = ("xla", "mkl")
LIBRARY = Path(__file__).parent / "native" / "libjaxvgg_gemm.so"
FFI_TARGET = "jaxvgg_mkl_sgemm"


@functools.cache
def problem() -> str | None:
    """Loads and registers the handler once; None when it is usable, else why it is not."""
    if not LIBRARY.exists():
        return f"{LIBRARY} is not built (bash scripts/build_gemm.sh)"
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    try:
        if iomp.exists():
            # Intel's OpenMP runtime, loaded globally before MKL, which then picks its Intel threading
            # layer by default (mkl_set_threading_layer is not called: beside torch's own MKL it made
            # this library's products wrong). Its threads must not spin after a product (they would
            # take the cores from XLA's own threads): block time 0 as the process-wide default, set
            # through the runtime's API before its first parallel region.
            openmp = ctypes.CDLL(str(iomp), mode=ctypes.RTLD_GLOBAL)
            openmp.kmp_set_defaults(b"KMP_BLOCKTIME=0")
        library = ctypes.CDLL(str(LIBRARY))
        jax.ffi.register_ffi_target(FFI_TARGET, jax.ffi.pycapsule(library.JaxvggSgemm), platform="cpu")
    except (OSError, AttributeError) as e:
        return f"{LIBRARY} did not load: {e}"
    return None


def _sgemm(a: jax.Array, b: jax.Array, trans_a: bool, trans_b: bool) -> jax.Array:
    m = a.shape[1] if trans_a else a.shape[0]
    n = b.shape[0] if trans_b else b.shape[1]
    call = jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(a, b, trans_a=trans_a, trans_b=trans_b)


@jax.custom_vjp
def _mkl_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return _sgemm(a, b, False, False)


def _mkl_matmul_fwd(a, b):
    return _sgemm(a, b, False, False), (a, b)


def _mkl_matmul_bwd(res, g):
    a, b = res
    return _sgemm(g, b, False, True), _sgemm(a, g, True, False)  # g @ b^T, a^T @ g


_mkl_matmul.defvjp(_mkl_matmul_fwd, _mkl_matmul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _bf16_matmul(a: jax.Array, b: jax.Array, dtypes: tuple) -> jax.Array:
    return lax.dot(a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(a, b, dtypes):
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    return lax.dot(a, b, preferred_element_type=jnp.float32), (a, b)


def _bf16_matmul_bwd(dtypes, res, g):
    a, b = res
    g = g.astype(jnp.bfloat16)
    da = lax.dot_general(g, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)  # g @ b^T
    db = lax.dot_general(a, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)  # a^T @ g
    return da.astype(dtypes[0]), db.astype(dtypes[1])  # cotangents in the operands' own dtypes


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def _use_mkl(backend: str, a: jax.Array, b: jax.Array) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"gemm backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "mkl" or not (a.ndim == b.ndim == 2 and a.dtype == b.dtype == jnp.float32):
        return False
    if problem() is not None:
        raise RuntimeError(f"gemm backend 'mkl', but {problem()}")
    return True


def matmul(a: jax.Array, b: jax.Array, backend: str = "xla", dtype: str = "float32") -> jax.Array:
    """``a @ b`` of 2-d operands; float32 ones go through MKL under backend "mkl".

    ``dtype="bfloat16"``: bfloat16 operands (cast here), float32 accumulation and result, and the same for
    the gradient's products (module docstring); the backend is then XLA's.
    """
    if dtype == "bfloat16":
        if a.ndim != 2 or b.ndim != 2:
            raise ValueError(f"matmul takes 2-d operands; got {a.shape} @ {b.shape}")
        return _bf16_matmul(a, b, (a.dtype, b.dtype))
    if dtype != "float32":
        raise ValueError(f"matmul dtype {dtype!r}; expected float32 or bfloat16")
    return _mkl_matmul(a, b) if _use_mkl(backend, a, b) else a @ b
