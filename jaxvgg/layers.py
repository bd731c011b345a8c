"""The layers the networks are built from, and the forms their convolutions and pools can take.

Every form of a layer computes the same function (`tests/test_fast_paths.py`, the parity suite); which
one runs is the model's `jaxvgg.policy.Policy`. On the CPU, XLA's convolution is slow for small
spatial maps and for weight gradients, and max-pool's gradient (select-and-scatter) dominates small
networks, so patches + one matmul ("im2col"), a block-Toeplitz matmul for maps smaller than the
kernel's window, kh*kw shifted multiply-adds for single-channel inputs ("direct") and a reshape
max-pool run near the matmul peak there; on GPU/TPU lax.conv and reduce_window are what the
compilers are tuned for.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvgg import gemm
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

def conv_lax(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """The native form: ``lax.conv_general_dilated``."""
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((padding, padding), (padding, padding)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_im2col(x: jax.Array, kernel: jax.Array, padding: int, gemm_backend: str = "xla") -> jax.Array:
    """Stride-1 NHWC convolution as patches @ kernel: the same sums as lax.conv, one matmul.

    The patch vector of each output pixel is ordered (kh, kw, C_in), matching the HWIO kernel
    reshaped to (kh*kw*C_in, C_out).
    """
    kh, kw, cin, cout = kernel.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    b, h, w, _ = x.shape
    oh, ow = h - kh + 1, w - kw + 1
    if cin == 1:
        # one input channel (LeNet's first layer): the patch vectors are short (kh*kw) and the outputs
        # few, so put the long axis (every output pixel) last: kernel^T (C_out, kh*kw) @ patches.
        patches = jnp.stack([x[:, i:i + oh, j:j + ow, 0] for i in range(kh) for j in range(kw)])
        y = gemm.matmul(kernel.reshape(kh * kw, cout).T, patches.reshape(kh * kw, b * oh * ow), gemm_backend)
        return jnp.transpose(y.reshape(cout, b, oh, ow), (1, 2, 3, 0))
    if (kh, kw) == (1, 1):
        patches = x
    else:
        patches = jnp.concatenate([x[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
    y = gemm.matmul(patches.reshape(b * oh * ow, kh * kw * cin), kernel.reshape(kh * kw * cin, cout), gemm_backend)
    return y.reshape(b, oh, ow, cout)


def conv_direct(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Stride-1 NHWC convolution of a single-channel input as kh*kw shifted multiply-adds.

    Computed channels-first, (C_out, B, H, W), so that XLA fuses the sum into one loop whose inner axis
    is the image width rather than C_out (6 for LeNet), then transposed to NHWC.
    """
    kh, kw, cin, cout = kernel.shape
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


def conv_toeplitz(x: jax.Array, kernel: jax.Array, padding: int, gemm_backend: str = "xla") -> jax.Array:
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
    k = kernel.reshape(kh * kw, cin, cout)
    if (taps == kh * kw).any():  # some pixel pairs are joined by no tap: a zero block
        k = jnp.concatenate([k, jnp.zeros((1, cin, cout), k.dtype)])
    matrix = jnp.transpose(k[taps], (0, 2, 1, 3)).reshape(h * w * cin, oh * ow * cout)
    return gemm.matmul(x.reshape(b, h * w * cin), matrix, gemm_backend).reshape(b, oh, ow, cout)


def conv(x: jax.Array, kernel: jax.Array, padding: int, form: str, gemm_backend: str = "xla") -> jax.Array:
    """Stride-1 NHWC convolution in the named form (one of `jaxvgg.policy.CONV_FORMS`)."""
    if form == "im2col":
        return conv_im2col(x, kernel, padding, gemm_backend)
    if form == "toeplitz":
        return conv_toeplitz(x, kernel, padding, gemm_backend)
    if form == "direct":
        return conv_direct(x, kernel, padding)
    if form == "lax":
        return conv_lax(x, kernel, padding)
    raise ValueError(f"conv form {form!r}; expected one of {', '.join(CONV_FORMS)}")


class Conv2d(nn.Module):
    """torch.nn.Conv2d (stride 1, symmetric zero padding) with flax.linen.Conv's parameters.

    ``kernel`` is (kh, kw, C_in, C_out) and ``bias`` (C_out,), exactly as ``nn.Conv`` names and shapes
    them, so checkpoints and conversion do not depend on the form. The form is ``policy``'s choice for
    this layer's shapes, or ``form`` when given.
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
        form = self.form or self.policy.conv_form(out_pixels, train, x.shape[-1], x.shape[1] * x.shape[2], k * k)
        return conv(x, kernel, p, form, self.policy.gemm) + bias


def torch_conv(name: str, features: int, in_features: int, kernel: int, padding: int = 0,
               policy: Policy = NATIVE) -> Conv2d:
    """A Conv2d with torch's default initialisation."""
    fan_in = in_features * kernel * kernel
    return Conv2d(features, kernel, padding, kernel_init=torch_default_kernel_init,
                  bias_init=torch_default_bias_init(fan_in), policy=policy, name=name)


def torch_dense(name: str, features: int, in_features: int, policy: Policy = NATIVE) -> nn.Dense:
    """torch.nn.Linear: a Dense layer with torch's default initialisation and the policy's GEMM."""
    return nn.Dense(features, kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(in_features),
                    dot_general=gemm.dot_general_for(policy.gemm), name=name)


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
