"""Float32 matrix products through MKL's sgemm, called from XLA:CPU as an FFI custom call.

On the CPU, PyTorch multiplies matrices with MKL, and on the shapes these networks use (im2col
patches times kernels, Dense layers, their gradients) MKL ran 1.05-1.55x faster than XLA:CPU's own
dot kernels here. `matmul` and `dot_general` (for ``flax.linen.Dense(dot_general=...)``) send 2-d float32
products to ``cblas_sgemm`` when the handler is built (``scripts/build_gemm.sh``, run by
``scripts/setup.sh``), and to XLA's dot otherwise. The call is a pure function of its operands, so it
composes with jit and grad like any primitive: its gradient is two more products (`_mkl_matmul`'s VJP).

``JAXVGG_GEMM=auto|xla|mkl`` picks the backend ("auto": MKL where built, on a single CPU device, and
not under ``JAXVGG_IMPL=native``, which stands for plain JAX). Several devices keep XLA's dots: the
custom call has no partitioning rule, so a sharded batch would be gathered onto each device.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax

GEMM_ENV = "JAXVGG_GEMM"
GEMM_BACKENDS = ("auto", "xla", "mkl")
LIBRARY = Path(__file__).parent / "native" / "libjaxvgg_gemm.so"
FFI_TARGET = "jaxvgg_mkl_sgemm"


@functools.cache
def _load() -> str | None:
    """Loads and registers the handler once; None when it is usable, else why it is not."""
    if not LIBRARY.exists():
        return f"{LIBRARY} is not built (bash scripts/build_gemm.sh)"
    # MKL's OpenMP threads: Intel's runtime, which must be global before MKL loads its threading layer,
    # and which must not spin after a product (it would take the core from XLA's own threads).
    os.environ.setdefault("MKL_THREADING_LAYER", "INTEL")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    try:
        if iomp.exists():
            ctypes.CDLL(str(iomp), mode=ctypes.RTLD_GLOBAL)
        library = ctypes.CDLL(str(LIBRARY))
        jax.ffi.register_ffi_target(FFI_TARGET, jax.ffi.pycapsule(library.JaxvggSgemm), platform="cpu")
    except (OSError, AttributeError) as e:
        return f"{LIBRARY} did not load: {e}"
    return None


def backend() -> str:
    """The backend ("xla" or "mkl") that products traced now will use."""
    choice = os.environ.get(GEMM_ENV, "auto")
    if choice not in GEMM_BACKENDS:
        raise ValueError(f"{GEMM_ENV}={choice!r}; expected one of {GEMM_BACKENDS}")
    if choice == "xla" or jax.default_backend() != "cpu":
        return "xla"
    from jaxvgg import models  # at trace time; models imports this module

    if choice == "auto" and (models._impl_mode() == "native" or jax.device_count() > 1):
        return "xla"
    problem = _load()
    if problem is None:
        return "mkl"
    if choice == "mkl":
        raise RuntimeError(f"{GEMM_ENV}=mkl, but {problem}")
    return "xla"


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


def _mkl_eligible(a: jax.Array, b: jax.Array) -> bool:
    return a.ndim == 2 and b.ndim == 2 and a.dtype == jnp.float32 and b.dtype == jnp.float32


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ b``; 2-d float32 operands go through MKL when `backend` says so."""
    if _mkl_eligible(a, b) and backend() == "mkl":
        return _mkl_matmul(a, b)
    return a @ b


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`jax.lax.dot_general`, with plain 2-d float32 products ((1,) x (0,), no batch) through MKL."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if (tuple(lhs_contract) == (1,) and tuple(rhs_contract) == (0,) and not lhs_batch and not rhs_batch
            and preferred_element_type in (None, jnp.float32) and _mkl_eligible(lhs, rhs)
            and backend() == "mkl"):
        return _mkl_matmul(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)
