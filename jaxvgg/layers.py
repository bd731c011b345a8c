"""The layers the networks are built from, and the forms their convolutions and pools can take.

Every form of a layer computes the same function (`tests/test_fast_paths.py`, the parity suite); which
one runs is the model's `jaxvgg.policy.Policy`. On the CPU, XLA's convolution is slow for small
spatial maps and for weight gradients, and max-pool's gradient (select-and-scatter) dominates small
networks, so patches + one matmul ("im2col"), a block-Toeplitz matmul for maps smaller than the
kernel's window, kh*kw shifted multiply-adds for single-channel inputs ("direct") and a reshape
max-pool run near the matmul peak there; on GPU/TPU lax.conv and reduce_window are what the
compilers are tuned for.

Every form also computes in the policy's precision: in bfloat16 the operands of each product are cast
to bfloat16, the sums accumulate in float32, the bias is added in float32 and the layer's output is
rounded to bfloat16, which is what ``torch.autocast`` does to a Conv2d or Linear.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvgg import gemm, onednn
from jaxvgg.policy import CONV_FORMS, NATIVE, POOL_FORMS, Policy

# --- torch-default initialisers -------------------------------------------------------------
# torch.nn.Conv2d / Linear reset_parameters: kaiming_uniform_(a=sqrt(5)) for weights, i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the same bound for biases.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
    """Bias initialiser U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as torch's Conv2d/Linear."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --- convolution forms (stride 1, symmetric zero padding, NHWC / HWIO) -------------------------

def mixed(dtype: str) -> bool:
    """Whether ``dtype`` asks for mixed precision (bfloat16 operands, float32 sums). "float32" casts
    nothing: the inputs' own dtype computes, so a float64 run (the parity suite's) stays float64."""
    return dtype != "float32"


def conv_lax(x: jax.Array, kernel: jax.Array, padding: int, dtype: str = "float32") -> jax.Array:
    """The native form: ``lax.conv_general_dilated`` (mixed ``dtype``: its operands, float32 result)."""
    if mixed(dtype):
        x, kernel = x.astype(dtype), kernel.astype(dtype)
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        preferred_element_type=jnp.float32 if mixed(dtype) else None)


def conv_im2col(x: jax.Array, kernel: jax.Array, padding: int, gemm_backend: str = "xla",
                dtype: str = "float32") -> jax.Array:
    """Stride-1 NHWC convolution as patches @ kernel: the same sums as lax.conv, one matmul.

    The patch vector of each output pixel is ordered (kh, kw, C_in), matching the HWIO kernel
    reshaped to (kh*kw*C_in, C_out). In bfloat16 it is `_im2col_bf16`'s own forward and backward.
    """
    kh, kw, cin, cout = kernel.shape
    if mixed(dtype) and cin != 1:
        return _im2col_bf16(x, kernel, padding, (jnp.dtype(x.dtype), jnp.dtype(kernel.dtype)))
    if mixed(dtype):
        x = x.astype(dtype)
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    b, h, w, _ = x.shape
    oh, ow = h - kh + 1, w - kw + 1
    if cin == 1:
        # one input channel (LeNet's first layer): the patch vectors are short (kh*kw) and the outputs
        # few, so put the long axis (every output pixel) last: kernel^T (C_out, kh*kw) @ patches.
        patches = jnp.stack([x[:, i:i + oh, j:j + ow, 0] for i in range(kh) for j in range(kw)])
        y = gemm.matmul(kernel.reshape(kh * kw, cout).T, patches.reshape(kh * kw, b * oh * ow), gemm_backend, dtype)
        return jnp.transpose(y.reshape(cout, b, oh, ow), (1, 2, 3, 0))
    y = gemm.matmul(im2col_patches(x, kh, kw, 0), kernel.reshape(kh * kw * cin, cout), gemm_backend)
    return y.reshape(b, oh, ow, cout)


def im2col_patches(x: jax.Array, kh: int, kw: int, padding: int, transposed: bool = False) -> jax.Array:
    """The (B*OH*OW, kh*kw*C) patch matrix of NHWC ``x``, rows ordered (b, oh, ow), columns (kh, kw, C);
    ``transposed``: its transpose (kh*kw*C, B*OH*OW), built as such (from a channels-first copy of x).

    XLA:CPU copies 16-bit integers faster than bfloat16 values (docs/performance.md), so bfloat16
    moves as its bits.
    """
    bits = x.dtype == jnp.bfloat16
    if bits:
        x = jax.lax.bitcast_convert_type(x, jnp.uint16)
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))  # bits 0 are +0.0
    b, h, w, c = x.shape
    oh, ow = h - kh + 1, w - kw + 1
    if transposed:
        x = jnp.transpose(x, (3, 0, 1, 2))  # (C, B, H, W)
        p = jnp.concatenate([x[:, :, i:i + oh, j:j + ow] for i in range(kh) for j in range(kw)], axis=0)
        p = p.reshape(kh * kw * c, b * oh * ow)
    elif (kh, kw) == (1, 1):
        p = x.reshape(b * oh * ow, c)
    else:
        p = jnp.concatenate([x[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
        p = p.reshape(b * oh * ow, kh * kw * c)
    return jax.lax.bitcast_convert_type(p, jnp.bfloat16) if bits else p


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _im2col_bf16(x: jax.Array, kernel: jax.Array, padding: int, dtypes: tuple) -> jax.Array:
    """The im2col convolution with bfloat16 operands and float32 sums and result, forward and backward.

    Its backward is written out because XLA:CPU multiplies bfloat16 (on YNNPACK, at about twice the
    float32 rate) only products whose left operand is contracted over its last axis; autodiff's weight
    gradient, patches^T @ g, is not one, and XLA:CPU ran it at a quarter of the speed of the same
    product built transposed (docs/performance.md, "Mixed precision"). So the
    backward multiplies patches built transposed (kh*kw*C, M) @ g, and g @ kernel^T for the input's
    gradient, which is folded back onto the pixels (col2im) in float32. The residuals are the bfloat16
    input and kernel, not the 9x larger patches, which the backward rebuilds.
    """
    return _im2col_bf16_fwd(x, kernel, padding, dtypes)[0]


def _im2col_bf16_fwd(x, kernel, padding, dtypes):
    kh, kw, cin, cout = kernel.shape
    x, kernel = x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    b, h, w, _ = x.shape
    oh, ow = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    y = jax.lax.dot(im2col_patches(x, kh, kw, padding), kernel.reshape(kh * kw * cin, cout),
                    preferred_element_type=jnp.float32)
    return y.reshape(b, oh, ow, cout), (x, kernel)


def _im2col_bf16_bwd(padding, dtypes, residuals, g):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    g = g.astype(jnp.bfloat16).reshape(-1, cout)  # (M, C_out)
    # d patches = g @ kernel^T, (M, kh*kw*C_in), folded back onto the input pixels in float32
    d_patches = jax.lax.dot_general(g, kernel.reshape(kh * kw * cin, cout), (((1,), (1,)), ((), ())),
                                    preferred_element_type=jnp.float32)
    fold = jax.linear_transpose(lambda v: im2col_patches(v, kh, kw, padding),
                                jax.ShapeDtypeStruct(x.shape, jnp.float32))
    (dx,) = fold(d_patches)
    dk = jax.lax.dot(im2col_patches(x, kh, kw, padding, transposed=True), g, preferred_element_type=jnp.float32)
    return dx.astype(dtypes[0]), dk.reshape(kernel.shape).astype(dtypes[1])


_im2col_bf16.defvjp(_im2col_bf16_fwd, _im2col_bf16_bwd)


def conv_direct(x: jax.Array, kernel: jax.Array, padding: int, dtype: str = "float32") -> jax.Array:
    """Stride-1 NHWC convolution of a single-channel input as kh*kw shifted multiply-adds.

    Computed channels-first, (C_out, B, H, W), so that XLA fuses the sum into one loop whose inner axis
    is the image width rather than C_out (6 for LeNet), then transposed to NHWC. No matrix unit is
    involved, so in bfloat16 the operands are rounded to bfloat16 and the sums run in float32.
    """
    kh, kw, cin, cout = kernel.shape
    if mixed(dtype):
        x, kernel = (v.astype(dtype).astype(jnp.float32) for v in (x, kernel))
    if cin != 1:
        raise ValueError(f"conv_direct computes single-channel inputs only; the kernel is {kernel.shape} (HWIO)")
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    x = x[..., 0]
    oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    y = sum(kernel[i, j, 0][:, None, None, None] * x[None, :, i:i + oh, j:j + ow]
            for i in range(kh) for j in range(kw))
    return jnp.transpose(y, (1, 2, 3, 0))


def toeplitz_taps(h: int, w: int, kh: int, kw: int, padding: int) -> np.ndarray:
    """(h*w, oh*ow) index of the kernel tap that joins input pixel u to output pixel v; kh*kw for none."""
    oh, ow = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    i = np.arange(h)[:, None, None, None] - np.arange(oh)[None, None, :, None] + padding  # (h, 1, oh, 1)
    j = np.arange(w)[None, :, None, None] - np.arange(ow)[None, None, None, :] + padding  # (1, w, 1, ow)
    inside = (i >= 0) & (i < kh) & (j >= 0) & (j < kw)
    return np.where(inside, i * kw + j, kh * kw).reshape(h * w, oh * ow)


def conv_toeplitz(x: jax.Array, kernel: jax.Array, padding: int, gemm_backend: str = "xla",
                  dtype: str = "float32") -> jax.Array:
    """Stride-1 NHWC convolution as one matmul by its (H*W*C_in, OH*OW*C_out) block-Toeplitz matrix.

    Block (u, v) of the matrix is the kernel tap joining input pixel u to output pixel v (zeros where no
    tap does), so it pays off only on maps smaller than the kernel's window: there it skips the padding
    zeros that im2col multiplies (VGG's last block at 32x32 inputs: 16 kernel blocks an image instead of
    36). The matrix is gathered from the kernel, so its gradient flows back to the taps.
    """
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = x.shape
    oh, ow = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    taps = toeplitz_taps(h, w, kh, kw, padding)
    # gathered from the float32 kernel: in bfloat16 the matrix's gradient, summed back onto each tap, stays float32
    k = kernel.reshape(kh * kw, cin, cout)
    if (taps == kh * kw).any():  # some pixel pairs are joined by no tap: a zero block
        k = jnp.concatenate([k, jnp.zeros((1, cin, cout), k.dtype)])
    matrix = jnp.transpose(k[taps], (0, 2, 1, 3)).reshape(h * w * cin, oh * ow * cout)
    return gemm.matmul(x.reshape(b, h * w * cin), matrix, gemm_backend, dtype).reshape(b, oh, ow, cout)


def conv(x: jax.Array, kernel: jax.Array, padding: int, form: str, gemm_backend: str = "xla",
         dtype: str = "float32") -> jax.Array:
    """Stride-1 NHWC convolution in the named form (one of `jaxvgg.policy.CONV_FORMS`).

    ``dtype`` is the operands' precision ("float32" or "bfloat16"); sums and result are float32.
    """
    if form == "im2col":
        return conv_im2col(x, kernel, padding, gemm_backend, dtype)
    if form == "toeplitz":
        return conv_toeplitz(x, kernel, padding, gemm_backend, dtype)
    if form == "direct":
        return conv_direct(x, kernel, padding, dtype)
    if form == "lax":
        return conv_lax(x, kernel, padding, dtype)
    raise ValueError(f"conv form {form!r}; expected one of {', '.join(CONV_FORMS)}")


class Conv2d(nn.Module):
    """torch.nn.Conv2d (stride 1, symmetric zero padding) with flax.linen.Conv's parameters.

    ``kernel`` is (kh, kw, C_in, C_out) and ``bias`` (C_out,), exactly as ``nn.Conv`` names and shapes
    them, so checkpoints and conversion do not depend on the form. The form is ``policy``'s choice for
    this layer's shapes, or ``form`` when given, or oneDNN's primitives under the policy's "onednn" conv
    backend where oneDNN has kernels for the layer; the output is in the policy's compute dtype.
    """

    features: int
    kernel_size: int
    padding: int = 0
    kernel_init: Callable = torch_default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    policy: Policy = NATIVE
    form: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k, p = self.kernel_size, self.padding
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        out_pixels = (x.shape[1] + 2 * p - k + 1) * (x.shape[2] + 2 * p - k + 1)
        if self.form is None and self.policy.onednn_conv(x.shape, kernel.shape, p, x.dtype):
            y = onednn.conv(x, kernel, p, self.policy.dtype) + bias
        else:
            form = self.form or self.policy.conv_form(out_pixels, train, x.shape[-1], x.shape[1] * x.shape[2], k * k)
            y = conv(x, kernel, p, form, self.policy.gemm, self.policy.dtype) + bias
        return y.astype(self.policy.compute_dtype) if mixed(self.policy.dtype) else y


def torch_conv(name: str, features: int, in_features: int, kernel: int, padding: int = 0,
               policy: Policy = NATIVE) -> Conv2d:
    """A Conv2d with torch's default initialisation."""
    fan_in = in_features * kernel * kernel
    return Conv2d(features, kernel, padding, kernel_init=torch_default_kernel_init,
                  bias_init=torch_default_bias_init(fan_in), policy=policy, name=name)


class Dense(nn.Module):
    """torch.nn.Linear with flax.linen.Dense's parameters (``kernel`` (in, out), ``bias`` (out,)) and
    initialisation order, computed by the policy's GEMM in its precision; the output is in the policy's
    compute dtype (float32 sums and bias either way)."""

    features: int
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros
    policy: Policy = NATIVE

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        y = gemm.matmul(x, kernel, self.policy.gemm, self.policy.dtype) + bias
        return y.astype(self.policy.compute_dtype) if mixed(self.policy.dtype) else y


def torch_dense(name: str, features: int, in_features: int, policy: Policy = NATIVE) -> Dense:
    """torch.nn.Linear: a Dense layer with torch's default initialisation."""
    return Dense(features, kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(in_features),
                 policy=policy, name=name)


# --- batch normalisation ---------------------------------------------------------------------

class BatchNorm2d(nn.Module):
    """torch.nn.BatchNorm2d (affine, running statistics) on NHWC inputs, with PyTorch's semantics.

    Parameters ``scale`` / ``bias`` (torch's ``weight`` / ``bias``) and the ``batch_stats`` collection
    ``mean`` / ``var`` / ``num_batches_tracked`` (torch's ``running_mean`` / ``running_var`` /
    ``num_batches_tracked``). Training (``train=True``, ``batch_stats`` mutable) normalises with the
    batch mean and *biased* variance over (B, H, W) and moves the running statistics as torch does:
    ``running = (1 - momentum) * running + momentum * batch``, the variance term being the *unbiased*
    batch variance, n / (n - 1) times the biased one (flax's own ``nn.BatchNorm`` stores the biased one,
    and its ``momentum`` is the weight of the old value, 0.9 for torch's 0.1). Evaluation normalises
    with the running statistics. Statistics and normalisation run in float32 (or the input's wider
    dtype) whatever the compute precision; the output is in the policy's compute dtype.

    Under ``jax.jit`` over a data-parallel mesh the batch is the global one: the means are all-reduced
    by XLA's partitioner, so the statistics are those of torch's SyncBatchNorm, not DDP's per-device ones.
    """

    momentum: float = 0.1  # torch's: the weight of the new batch statistic
    epsilon: float = 1e-5
    policy: Policy = NATIVE

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        wide = jnp.promote_types(x.dtype, jnp.float32)
        mean_v = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        var_v = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        count_v = self.variable("batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32))
        xw = x.astype(wide)
        if train:
            n = x.size // c
            mean = jnp.mean(xw, axis=(0, 1, 2))
            var = jnp.mean(jnp.square(xw - mean), axis=(0, 1, 2))  # biased: what the batch is normalised by
            if not self.is_initializing() and self.is_mutable_collection("batch_stats"):
                m = self.momentum
                unbiased = var * (n / max(n - 1, 1))
                mean_v.value = ((1 - m) * mean_v.value + m * jax.lax.stop_gradient(mean)).astype(mean_v.value.dtype)
                var_v.value = ((1 - m) * var_v.value + m * jax.lax.stop_gradient(unbiased)).astype(var_v.value.dtype)
                count_v.value = count_v.value + 1
        else:
            mean, var = mean_v.value.astype(wide), var_v.value.astype(wide)
        y = (xw - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale.astype(wide)) + bias.astype(wide)
        return y.astype(self.policy.compute_dtype) if mixed(self.policy.dtype) else y.astype(x.dtype)


# --- pools and reshapes ----------------------------------------------------------------------

def max_pool_2x2(x: jax.Array, form: str = "reduce_window") -> jax.Array:
    """2x2 max-pool, stride 2, floor mode (torch.nn.MaxPool2d(2)).

    "reshape" computes the same maxima as "reduce_window"; its gradient differs only where a
    window holds two equal maxima (it splits the gradient, torch gives it to the first). In these
    networks pools follow ReLUs, so such ties are zeros, whose gradient the ReLU zeroes anyway.
    """
    if form == "reduce_window":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    if form != "reshape":
        raise ValueError(f"pool form {form!r}; expected one of {', '.join(POOL_FORMS)}")
    b, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def torch_flatten(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, C*H*W) in torch's NCHW flatten order."""
    return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) averaging matrix with torch's adaptive-pool bins [floor(i*in/out), ceil((i+1)*in/out))."""
    m = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)
        m[i, start:end] = 1.0 / (end - start)
    return m


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
    """torch.nn.AdaptiveAvgPool2d on NHWC input, including up-sampling (a 1x1 map becomes 7x7).

    The bins are separable, so the pool is two small matmuls with constant averaging matrices.
    """
    _, h, w, _ = x.shape
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x  # every bin is one pixel: identity, exactly as torch
    ph = jnp.asarray(_adaptive_pool_matrix(h, oh), x.dtype)
    pw = jnp.asarray(_adaptive_pool_matrix(w, ow), x.dtype)
    x = jnp.einsum("oh,bhwc->bowc", ph, x)
    return jnp.einsum("pw,bowc->bopc", pw, x)
