"""The tutorials' networks as flax.linen modules (NHWC inputs).

Every module names its layers after the PyTorch state_dict key of the layer it mirrors, with
``.`` written as ``_`` (``features.0`` -> ``features_0``, ``classifier.6.0`` -> ``classifier_6_0``),
so `jaxvgg.convert` needs no per-model table. The outputs torch forward hooks would see are in the
``intermediates`` collection under the same names: layers that are modules (Conv, Dense, Dropout)
through ``capture_intermediates=INTERMEDIATE_LAYERS``, functional ones (ReLU, max-pool, adaptive
pool, log-softmax) sown by the network; see `layer_outputs`.

Flattening before the first Linear layer goes through NCHW so the flat vector has torch's
(C, H, W) order and converted Linear weights work unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import os
from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvgg import gemm

# VGG configurations: conv widths, "M" = 2x2 max-pool (Simonyan & Zisserman 2015, Table 1;
# the same lists as torchvision.models.vgg.cfgs).
VGG_CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


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


# torchvision.models.VGG._initialize_weights: kaiming_normal_(fan_out, relu) convs, N(0, 0.01) linears,
# zero biases.
vgg_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
vgg_linear_init = nn.initializers.normal(stddev=0.01)


# --- implementation switches ----------------------------------------------------------------
# The same function can be computed in forms that run at very different speeds per backend. On the
# CPU, XLA's convolution is slow for small spatial maps (VGG's last block on 2x2 inputs runs at about
# 1 GFLOP/s) and for weight gradients, and max-pool's gradient (select-and-scatter) dominates small
# networks; patches + one matmul ("im2col") and a reshape-based 2x2 max-pool run near the matmul
# peak there. A single-channel input (LeNet's conv1) is the exception in inference: its 25 patch
# slices cost more than the arithmetic, and kh*kw shifted multiply-adds computed channels-first
# ("direct", one fused loop) ran LeNet's inference 1.5x faster than im2col (its training is faster
# with im2col, whose weight gradient is one matmul). On GPU/TPU the native lax.conv / reduce_window
# forms are what cuDNN/XLA are tuned for. "auto" picks per layer at trace time; the environment
# variable JAXVGG_IMPL=native|fast|auto overrides every "auto" (the parity suite runs with both forms
# forced; "fast" is every CPU fast form: im2col, Toeplitz (below), and direct for single-channel
# inference).
# Where every output pixel's window covers the whole input map (fewer input pixels than kernel taps:
# VGG's last block, 3x3 convs with padding 1 on 2x2 maps, at 32x32 inputs), im2col multiplies mostly
# padding zeros (5 of every 9 taps there); "toeplitz" multiplies the flattened map by the conv's
# (H*W*C_in, OH*OW*C_out) matrix instead, 16 instead of 36 kernel blocks per image, in training and
# inference alike.
CONV_IMPLS = ("auto", "lax", "im2col", "direct", "toeplitz")
POOL_IMPLS = ("auto", "reduce_window", "reshape")
IMPL_ENV = "JAXVGG_IMPL"
# In inference, im2col wins on the CPU below this many output pixels per image (VGG's 8x8 and 4x4 blocks);
# lax.conv elsewhere (up to 2x for the CIFAR CNN), except single-channel inputs (direct, above). In
# training, im2col wins everywhere measured.
IM2COL_MAX_INFER_PIXELS = 64


def _impl_mode() -> str:
    mode = os.environ.get(IMPL_ENV, "auto")
    if mode not in ("auto", "native", "fast"):
        raise ValueError(f"{IMPL_ENV}={mode!r}; expected one of auto, native, fast")
    return mode


def resolve_conv_impl(impl: str, out_pixels: int, train: bool, in_channels: int = 0, in_pixels: int = 0,
                      taps: int = 0) -> str:
    """The concrete conv form ("lax", "im2col", "direct" or "toeplitz") of a layer.

    ``out_pixels`` and ``in_pixels`` are H*W of its output and input maps, ``taps`` is kh*kw (0: unknown).
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r}; expected one of {CONV_IMPLS}")
    if impl != "auto":
        return impl
    mode = _impl_mode()
    if mode == "native" or (mode == "auto" and jax.default_backend() != "cpu"):
        return "lax"
    if 0 < in_pixels < taps:
        return "toeplitz"
    if in_channels == 1 and not train:
        return "direct"
    if mode == "fast":
        return "im2col"
    return "im2col" if train or out_pixels <= IM2COL_MAX_INFER_PIXELS else "lax"


def resolve_pool_impl(impl: str, train: bool) -> str:
    """The concrete 2x2 max-pool form ("reduce_window" or "reshape")."""
    if impl not in POOL_IMPLS:
        raise ValueError(f"pool_impl={impl!r}; expected one of {POOL_IMPLS}")
    if impl != "auto":
        return impl
    mode = _impl_mode()
    if mode != "auto":
        return "reduce_window" if mode == "native" else "reshape"
    return "reshape" if train and jax.default_backend() == "cpu" else "reduce_window"


# XLA:CPU hands dots, convolutions and the element-wise ops around them to YNNPACK by default. For
# some (model, mode) pairs Eigen's kernels and XLA's own loop emitters are faster; the choice is a
# per-compilation option (``jax.jit(..., compiler_options=...)``), so one process can train one model
# with YNNPACK and evaluate another without it. In JAX-only A/B runs (alternating rounds, 2-core Xeon;
# figures in issue 5's notes) YNNPACK off gave LeNet training +20-30 %, VGG-A inference at 32x32 and
# the transfer head's inference +10-18 %; for the other pairs YNNPACK was as fast or faster.
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNNPACK_OFF = {YNN_FUSION_OPTION: ""}
# not a registry model: the name under which the transfer experiments' head (trained alone on cached
# features) and its benchmark case look up their options
TRANSFER_HEAD = "transfer_head"
CPU_COMPILER_OPTIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("mnist_lenet", "train"): _YNNPACK_OFF,
    ("vgg11", "infer"): _YNNPACK_OFF,
    (TRANSFER_HEAD, "infer"): _YNNPACK_OFF,
}
COMPILE_MODES = ("train", "infer")


def resolve_compiler_options(model: str | None, mode: str) -> dict[str, Any] | None:
    """XLA compile options for jitting ``model``'s ``mode`` ("train" or "infer") step, or None.

    ``model`` is a registry name (or `TRANSFER_HEAD`); None, an unlisted model, a GPU/TPU backend (the
    options are XLA:CPU's) and ``JAXVGG_IMPL=native`` give None (XLA's defaults); ``JAXVGG_IMPL=fast``
    keeps them, so the parity suite's fast form runs with them.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode={mode!r}; expected one of {COMPILE_MODES}")
    if model is None or _impl_mode() == "native" or jax.default_backend() != "cpu":
        return None
    options = CPU_COMPILER_OPTIONS.get((model, mode))
    return dict(options) if options is not None else None


def conv_im2col(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
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
        y = gemm.matmul(kernel.reshape(kh * kw, cout).T, patches.reshape(kh * kw, b * oh * ow))
        return jnp.transpose(y.reshape(cout, b, oh, ow), (1, 2, 3, 0))
    if (kh, kw) == (1, 1):
        patches = x
    else:
        patches = jnp.concatenate([x[:, i:i + oh, j:j + ow, :] for i in range(kh) for j in range(kw)], axis=-1)
    y = gemm.matmul(patches.reshape(b * oh * ow, kh * kw * cin), kernel.reshape(kh * kw * cin, cout))
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


def _toeplitz_taps(h: int, w: int, kh: int, kw: int, padding: int) -> np.ndarray:
    """(h*w, oh*ow) index of the kernel tap that joins input pixel u to output pixel v; kh*kw for none."""
    oh, ow = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    i = np.arange(h)[:, None, None, None] - np.arange(oh)[None, None, :, None] + padding  # (h, 1, oh, 1)
    j = np.arange(w)[None, :, None, None] - np.arange(ow)[None, None, None, :] + padding  # (1, w, 1, ow)
    inside = (i >= 0) & (i < kh) & (j >= 0) & (j < kw)
    return np.where(inside, i * kw + j, kh * kw).reshape(h * w, oh * ow)


def conv_toeplitz(x: jax.Array, kernel: jax.Array, padding: int) -> jax.Array:
    """Stride-1 NHWC convolution as one matmul by its (H*W*C_in, OH*OW*C_out) block-Toeplitz matrix.

    Block (u, v) of the matrix is the kernel tap joining input pixel u to output pixel v (zeros where no
    tap does), so it pays off only on maps smaller than the kernel's window: there it skips the padding
    zeros that im2col multiplies. The matrix is gathered from the kernel, so its gradient flows back to
    the taps.
    """
    kh, kw, cin, cout = kernel.shape
    b, h, w, _ = x.shape
    oh, ow = h + 2 * padding - kh + 1, w + 2 * padding - kw + 1
    taps = _toeplitz_taps(h, w, kh, kw, padding)
    k = kernel.reshape(kh * kw, cin, cout)
    if (taps == kh * kw).any():  # some pixel pairs are joined by no tap: a zero block
        k = jnp.concatenate([k, jnp.zeros((1, cin, cout), k.dtype)])
    matrix = jnp.transpose(k[taps], (0, 2, 1, 3)).reshape(h * w * cin, oh * ow * cout)
    return gemm.matmul(x.reshape(b, h * w * cin), matrix).reshape(b, oh, ow, cout)


class Conv2d(nn.Module):
    """torch.nn.Conv2d (stride 1, symmetric zero padding) with flax.linen.Conv's parameters.

    ``kernel`` is (kh, kw, C_in, C_out) and ``bias`` (C_out,), exactly as ``nn.Conv`` names and shapes
    them, so checkpoints and conversion do not depend on ``impl``.
    """

    features: int
    kernel_size: int
    padding: int = 0
    kernel_init: Callable = torch_default_kernel_init
    bias_init: Callable = nn.initializers.zeros
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        k, p = self.kernel_size, self.padding
        kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features))
        bias = self.param("bias", self.bias_init, (self.features,))
        out_pixels = (x.shape[1] + 2 * p - k + 1) * (x.shape[2] + 2 * p - k + 1)
        impl = resolve_conv_impl(self.impl, out_pixels, train, x.shape[-1], x.shape[1] * x.shape[2], k * k)
        if impl == "im2col":
            y = conv_im2col(x, kernel, p)
        elif impl == "direct":
            y = conv_direct(x, kernel, p)
        elif impl == "toeplitz":
            y = conv_toeplitz(x, kernel, p)
        else:
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((p, p), (p, p)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


def _torch_conv(name: str, features: int, in_features: int, kernel: int, padding: int = 0,
                impl: str = "auto") -> Conv2d:
    fan_in = in_features * kernel * kernel
    return Conv2d(features, kernel, padding, kernel_init=torch_default_kernel_init,
                  bias_init=torch_default_bias_init(fan_in), impl=impl, name=name)


def _torch_dense(name: str, features: int, in_features: int) -> nn.Dense:
    return nn.Dense(features, kernel_init=torch_default_kernel_init,
                    bias_init=torch_default_bias_init(in_features), dot_general=gemm.dot_general, name=name)


def max_pool_2x2(x: jax.Array, impl: str = "reduce_window", train: bool = False) -> jax.Array:
    """2x2 max-pool, stride 2, floor mode (torch.nn.MaxPool2d(2)).

    "reshape" computes the same maxima as "reduce_window"; its gradient differs only where a
    window holds two equal maxima (it splits the gradient, torch gives it to the first). In these
    networks pools follow ReLUs, so such ties are zeros, whose gradient the ReLU zeroes anyway.
    """
    if resolve_pool_impl(impl, train) == "reduce_window":
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
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


class VGG(nn.Module):
    """VGG from a cfg list, mirroring torchvision's ``features`` / ``classifier`` indices.

    Attributes:
      cfg: conv widths and "M" for max-pool.
      num_classes: outputs of the last Linear layer.
      avgpool_size: torchvision's AdaptiveAvgPool2d((7, 7)) when set; None for the paper/tutorial
        network that flattens whatever the last pool leaves (512 at 32x32, 25,088 at 224x224).
      hidden: width of the two hidden Linear layers.
      dropout_rate: dropout before the 2nd and 3rd Linear layers (0.5 in the paper).
      transfer_head: replace classifier[6] by Linear(4096, h) -> ReLU -> Dropout(p) -> Linear(h, n)
        -> LogSoftmax, given as (h, p); then the output is log-probabilities.
      freeze_features: stop gradients below the transfer head (the tutorial freezes them).
      conv_impl / pool_impl: how convs and max-pools are computed (see `resolve_conv_impl`);
        every form computes the same function.
    """

    cfg: Sequence[int | str]
    num_classes: int = 1000
    avgpool_size: tuple[int, int] | None = None
    hidden: int = 4096
    dropout_rate: float = 0.5
    transfer_head: tuple[int, float] | None = None
    freeze_features: bool = False
    conv_impl: str = "auto"
    pool_impl: str = "auto"

    def _record(self, name: str, x: jax.Array) -> jax.Array:
        self.sow("intermediates", name, x)
        return x

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        idx = 0
        features_train = train and not self.freeze_features  # frozen features only run forward
        for v in self.cfg:
            if v == "M":
                x = self._record(f"features_{idx}", max_pool_2x2(x, self.pool_impl, features_train))
                idx += 1
            else:
                x = Conv2d(int(v), 3, 1, kernel_init=vgg_conv_init, bias_init=nn.initializers.zeros,
                           impl=self.conv_impl, name=f"features_{idx}")(x, features_train)
                x = self._record(f"features_{idx + 1}", nn.relu(x))
                idx += 2
        if self.avgpool_size is not None:
            x = self._record("avgpool", adaptive_avg_pool(x, self.avgpool_size))
        x = torch_flatten(x)

        dense = partial(nn.Dense, kernel_init=vgg_linear_init, bias_init=nn.initializers.zeros,
                        dot_general=gemm.dot_general)
        for i in (0, 3):
            x = dense(self.hidden, name=f"classifier_{i}")(x)
            x = self._record(f"classifier_{i + 1}", nn.relu(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"classifier_{i + 2}")(x)
        if self.transfer_head is None:
            return dense(self.num_classes, name="classifier_6")(x)

        if self.freeze_features:
            x = jax.lax.stop_gradient(x)  # nothing below the head trains: skip its backward pass
        width, rate = self.transfer_head
        # The tutorial's new head uses torch's default Linear init.
        x = _torch_dense("classifier_6_0", width, self.hidden)(x)
        x = self._record("classifier_6_1", nn.relu(x))
        x = nn.Dropout(rate, deterministic=not train, name="classifier_6_2")(x)
        x = _torch_dense("classifier_6_3", self.num_classes, width)(x)
        return self._record("classifier_6_4", nn.log_softmax(x, axis=-1))


class CifarCNN(nn.Module):
    """The CIFAR-10 tutorial CNN: three conv/ReLU/max-pool blocks and three Linear layers (537,610 params).

    Returns log-probabilities, as the tutorial's ``F.log_softmax``.
    """

    num_classes: int = 10
    conv_impl: str = "auto"
    pool_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # no dropout in this network; ``train`` only picks the fastest conv/pool forms
        in_ch = x.shape[-1]
        for name, width in (("conv1", 64), ("conv2", 128), ("conv3", 256)):
            x = _torch_conv(name, width, in_ch, 3, impl=self.conv_impl)(x, train)
            x = max_pool_2x2(nn.relu(x), self.pool_impl, train)
            in_ch = width
        x = torch_flatten(x)  # (B, 2, 2, 256) -> (B, 1024), torch flatten order
        for name, width in (("fc1", 128), ("fc2", 256)):
            x = _torch_dense(name, width, x.shape[-1])(x)
            x = nn.relu(x)
        x = _torch_dense("fc3", self.num_classes, x.shape[-1])(x)
        return nn.log_softmax(x, axis=-1)


class MnistLinear(nn.Module):
    """The MNIST lab's linear baseline: Flatten + Linear(784, 10), log-probabilities out."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = torch_flatten(x)
        x = _torch_dense("fc", self.num_classes, x.shape[-1])(x)
        return nn.log_softmax(x, axis=-1)


class MnistLeNet(nn.Module):
    """LeNet-5-like net for 1x28x28: conv(1->6, 5x5, pad 2)-pool-conv(6->16, 5x5)-pool-120-84-10."""

    num_classes: int = 10
    conv_impl: str = "auto"
    pool_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = partial(_torch_conv, impl=self.conv_impl)
        pool = partial(max_pool_2x2, impl=self.pool_impl, train=train)
        x = conv("conv1", 6, x.shape[-1], 5, padding=2)(x, train)
        x = pool(nn.relu(x))  # (B, 14, 14, 6)
        x = conv("conv2", 16, 6, 5)(x, train)
        x = torch_flatten(pool(nn.relu(x)))  # (B, 5, 5, 16) -> (B, 400)
        for name, width in (("fc1", 120), ("fc2", 84)):
            x = _torch_dense(name, width, x.shape[-1])(x)
            x = nn.relu(x)
        x = _torch_dense("fc3", self.num_classes, x.shape[-1])(x)
        return nn.log_softmax(x, axis=-1)


def INTERMEDIATE_LAYERS(module: nn.Module, method_name: str) -> bool:
    """capture_intermediates filter: the outputs of the layers that mirror torch modules."""
    return method_name == "__call__" and isinstance(module, (Conv2d, nn.Conv, nn.Dense, nn.Dropout))


def layer_outputs(model: nn.Module, variables: Any, x: jax.Array, **kwargs: Any) -> tuple[jax.Array, dict]:
    """Applies ``model`` and returns (output, {torch-style layer name: that layer's output})."""
    out, state = model.apply(variables, x, capture_intermediates=INTERMEDIATE_LAYERS,
                             mutable=["intermediates"], **kwargs)
    acts = {}
    for name, value in state["intermediates"].items():
        if isinstance(value, dict):  # captured module: {"__call__": (output,)}
            if "__call__" not in value:
                continue
            value = value["__call__"]
        acts[name] = value[0]
    return out, acts


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What the rest of the library needs to know about a named model."""

    build: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # default (H, W, C) for init and conversion
    num_classes: int
    log_probs: bool  # True when the network ends in log_softmax (train with NLL, not cross-entropy)
    frozen_prefixes: tuple[str, ...] = ()  # parameter-name prefixes that do not train


vgg11 = partial(VGG, VGG_CFGS["A"])
vgg11_torchvision = partial(VGG, VGG_CFGS["A"], avgpool_size=(7, 7))
vgg16_torchvision = partial(VGG, VGG_CFGS["D"], avgpool_size=(7, 7))
vgg16_transfer = partial(VGG, VGG_CFGS["D"], avgpool_size=(7, 7), transfer_head=(256, 0.4),
                         freeze_features=True)

MODELS: dict[str, ModelSpec] = {
    "vgg11": ModelSpec(vgg11, (224, 224, 3), 1000, log_probs=False),
    "vgg11_torchvision": ModelSpec(vgg11_torchvision, (224, 224, 3), 1000, log_probs=False),
    "vgg16_torchvision": ModelSpec(vgg16_torchvision, (224, 224, 3), 1000, log_probs=False),
    "vgg16_transfer": ModelSpec(vgg16_transfer, (224, 224, 3), 100, log_probs=True,
                                frozen_prefixes=("features_", "classifier_0", "classifier_3")),
    "cifar_cnn": ModelSpec(CifarCNN, (32, 32, 3), 10, log_probs=True),
    "mnist_linear": ModelSpec(MnistLinear, (28, 28, 1), 10, log_probs=True),
    "mnist_lenet": ModelSpec(MnistLeNet, (28, 28, 1), 10, log_probs=True),
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``, with the known names in the error."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def list_models() -> list[str]:
    """Names accepted by `create_model`."""
    return sorted(MODELS)


def create_model(name: str, num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Builds a named model.

    Args:
      name: one of `list_models()`.
      num_classes: outputs; defaults to the model's tutorial value (1000 for the torchvision VGGs,
        100 for vgg16_transfer, 10 otherwise).
      **kwargs: module attributes to override (e.g. ``dropout_rate``).

    Returns:
      An unbound flax.linen Module; ``model.apply(variables, x)`` is evaluation mode and
      ``model.apply(variables, x, train=True, rngs={"dropout": key})`` training mode.
    """
    spec = get_spec(name)
    return spec.build(num_classes=spec.num_classes if num_classes is None else num_classes, **kwargs)


def init_params(name: str, key: jax.Array, num_classes: int | None = None,
                input_shape: Sequence[int] | None = None, **kwargs: Any) -> dict:
    """Fresh ``{"params": ...}`` variables for a named model at ``input_shape`` (H, W, C)."""
    model = create_model(name, num_classes, **kwargs)
    shape = tuple(input_shape or get_spec(name).input_shape)
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32)))(key)


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def trainable_mask(name: str, params: Any) -> Any:
    """Pytree of bools over ``params``: False for the layers the model's tutorial freezes."""
    frozen = get_spec(name).frozen_prefixes
    if "params" in params:
        return {"params": trainable_mask(name, params["params"])}
    return {layer: jax.tree_util.tree_map(lambda _: not layer.startswith(frozen), sub)
            for layer, sub in params.items()}


def parameter_table(params: Any) -> list[tuple[str, tuple[int, ...], int]]:
    """(layer/leaf name, shape, count) of every parameter array, in flax's (sorted) key order.

    Names join the flax path with ``/`` (``conv1/kernel``); shapes are flax's (kernels HWIO, Dense (in, out)).
    A ``{"params": ...}`` wrapper is looked through.
    """
    params = params.get("params", params)
    rows = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = "/".join(str(getattr(entry, "key", entry)) for entry in path)
        shape = tuple(int(d) for d in np.shape(leaf))
        rows.append((name, shape, int(np.prod(shape))))
    return rows
