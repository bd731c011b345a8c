"""Stride-1 convolutions through oneDNN's primitives (XLA:CPU FFI custom calls), forward and backward.

PyTorch computes every CPU convolution, forward and both backward passes, with oneDNN's kernels, which
read NHWC activations directly; XLA:CPU's im2col forms (`jaxvgg.layers`) first copy kh*kw patches of
every pixel. `conv` sends a stride-1 NHWC/HWIO convolution to three handlers of
``native/libjaxvgg_conv.so`` (built by ``scripts/build_conv.sh`` against Debian's ``libdnnl-dev``):
forward, backward-data (the input's gradient) and backward-weights (the kernel's), tied together by a
``custom_vjp``. Each is a pure function of its operands; oneDNN creates each primitive once per shape.

Precision: float32 operands, or bfloat16 operands (cast here, the cotangent too) with float32 sums and a
float32 result, the contract of `jaxvgg.layers.conv_im2col`'s bfloat16 form. Where oneDNN has only its
reference code for a dtype on this CPU (bfloat16 without AVX-512), `problem` says so and callers keep
XLA's forms. This module imports nothing from the rest of jaxvgg and reads no environment variable.
"""

from __future__ import annotations

import ctypes
import functools
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp

LIBRARY = Path(__file__).parent / "native" / "libjaxvgg_conv.so"
TARGETS = {"forward": "JaxvggConvForward", "backward_data": "JaxvggConvBackwardData",
           "backward_weights": "JaxvggConvBackwardWeights"}
PASSES = tuple(TARGETS)
DTYPES = ("float32", "bfloat16")
# the shape `problem` asks oneDNN about: one of VGG's 3x3 layers at CIFAR size
PROBE_SHAPE = (8, 16, 16, 64, 64, 3, 3, 1)  # N, H, W, C_in, C_out, KH, KW, padding


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded handler library with its targets registered, or why it cannot be."""
    if not LIBRARY.exists():
        return f"{LIBRARY} is not built (bash scripts/build_conv.sh)"
    try:
        library = ctypes.CDLL(str(LIBRARY))
        for name, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(f"jaxvgg_onednn_conv_{name}", jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
    except (OSError, AttributeError) as e:
        return f"{LIBRARY} did not load: {e}"
    library.JaxvggConvImpl.restype = ctypes.c_int
    library.JaxvggConvImpl.argtypes = [ctypes.c_int] * 2 + [ctypes.c_int64] * 8 + [ctypes.c_char_p, ctypes.c_int64]
    return library


def implementation(pass_: str, dtype: str, shape: tuple[int, ...] = PROBE_SHAPE) -> str:
    """The oneDNN implementation (e.g. "brg:avx512_core", "jit:avx2") of ``pass_`` for ``shape``
    ((N, H, W, C_in, C_out, KH, KW, padding)) in ``dtype``; raises RuntimeError where there is none."""
    library = _library()
    if isinstance(library, str):
        raise RuntimeError(library)
    out = ctypes.create_string_buffer(512)
    rc = library.JaxvggConvImpl(PASSES.index(pass_), dtype == "bfloat16", *shape, out, len(out))
    if rc != 0:
        raise RuntimeError(f"oneDNN has no {dtype} {pass_} convolution here: {out.value.decode()}")
    return out.value.decode()


def _why_not(dtype: str, shape: tuple[int, ...]) -> str | None:
    """None where oneDNN runs every pass of ``shape`` on optimised kernels in ``dtype``; else why not."""
    try:
        for pass_ in PASSES:
            implementation(pass_, dtype, shape)
    except RuntimeError as e:
        return str(e)
    return None


@functools.cache
def problem(dtype: str = "float32") -> str | None:
    """None where every pass runs on oneDNN's optimised kernels in ``dtype`` on this CPU; else why not."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return _why_not(dtype, PROBE_SHAPE)


@functools.cache
def supports(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], padding: int, dtype: str) -> bool:
    """Whether every pass of this convolution (NHWC ``x_shape``, HWIO ``kernel_shape``) runs on oneDNN's
    optimised kernels in ``dtype`` here (some small shapes have only reference code)."""
    shape = (*x_shape, kernel_shape[3], kernel_shape[0], kernel_shape[1], padding)
    return problem(dtype) is None and _why_not(dtype, shape) is None


def _call(pass_: str, a: jax.Array, b: jax.Array, shape: tuple[int, ...], padding: int) -> jax.Array:
    call = jax.ffi.ffi_call(f"jaxvgg_onednn_conv_{pass_}", jax.ShapeDtypeStruct(shape, jnp.float32),
                            vmap_method="sequential")
    return call(a, b, padding=padding)


def _out_shape(x_shape, k_shape, padding: int) -> tuple[int, int, int, int]:
    (b, h, w, _), (kh, kw, _, cout) = x_shape, k_shape
    return b, h + 2 * padding - kh + 1, w + 2 * padding - kw + 1, cout


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x: jax.Array, kernel: jax.Array, padding: int, dtypes: tuple) -> jax.Array:
    """``dtypes``: (the operands' compute dtype, x's dtype, kernel's dtype)."""
    return _conv_fwd(x, kernel, padding, dtypes)[0]


def _conv_fwd(x, kernel, padding, dtypes):
    x, kernel = x.astype(dtypes[0]), kernel.astype(dtypes[0])
    y = _call("forward", x, kernel, _out_shape(x.shape, kernel.shape, padding), padding)
    return y, (x, kernel)


def _conv_bwd(padding, dtypes, residuals, g):
    x, kernel = residuals
    g = g.astype(dtypes[0])  # the cotangent in the compute dtype: bfloat16 products run in bfloat16
    dx = _call("backward_data", g, kernel, x.shape, padding)
    dk = _call("backward_weights", x, g, kernel.shape, padding)
    return dx.astype(dtypes[1]), dk.astype(dtypes[2])  # cotangents in the caller's dtypes


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, padding: int, dtype: str = "float32") -> jax.Array:
    """Stride-1 NHWC ``x`` convolved with HWIO ``kernel`` (``padding`` zeros on every side) by oneDNN.

    ``dtype="bfloat16"``: bfloat16 operands (cast here), float32 sums; the result is float32 either way.
    Raises RuntimeError where `problem` says oneDNN cannot run ``dtype`` here.
    """
    if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
        raise ValueError(f"conv takes NHWC x and HWIO kernel with matching channels; got {x.shape}, {kernel.shape}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    if problem(dtype) is not None:
        raise RuntimeError(f"onednn conv in {dtype}: {problem(dtype)}")
    if not supports(tuple(x.shape), tuple(kernel.shape), padding, dtype):
        raise RuntimeError(f"onednn conv: only reference code for {x.shape} * {kernel.shape} in {dtype} here")
    return _conv(x, kernel, padding, (jnp.dtype(dtype), jnp.dtype(x.dtype), jnp.dtype(kernel.dtype)))
