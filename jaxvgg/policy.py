"""How a model runs, as one explicit value: conv/pool forms, matrix-product and convolution backends, compute
precision, XLA compile options.

A `Policy` never changes *what* a network computes (the parity suite runs both the native and the
fast policy against PyTorch), only how fast. It is a frozen, hashable dataclass held by every model as
a module attribute, so it is part of the module's identity and of every jit cache key: two models that
differ only in their policy trace to two programs. Nothing here reads the environment; "auto" is
resolved once, when `make_policy` builds the value, from the JAX backend and what is installed.

Forms:
  "native": lax.conv and reduce_window max-pools, XLA's dots and default compile options; what GPU and
    TPU compilers are tuned for, and plain JAX anywhere.
  "cpu": per layer, the form measured fastest on XLA:CPU (`Policy.conv_form`): im2col convs in
    training, im2col in inference for small maps (lax.conv for large ones), the Toeplitz form on maps
    smaller than the kernel's window, the direct form for single-channel inputs in inference; reshape
    max-pools in training; each model's XLA:CPU compile options (`CPU_COMPILER_OPTIONS`).
  "fast": every CPU fast form forced, in training and inference alike, MKL's products and oneDNN's
    convolutions included wherever they are built (the parity suite's second form).

Conv backend: "xla" (the forms above) or "onednn": every stride-1 convolution that oneDNN has optimised
kernels for, in the policy's precision, on this CPU, runs as oneDNN's primitives (`jaxvgg.onednn`),
forward and both backward passes; the others keep their form. "auto" resolves to "xla" (except under the
"fast" forms, which force it where it runs): on the
AVX2-only AMD EPYC oneDNN's float32 kernels won on the 16x16 and 8x8 maps of VGG-A by at most 1.2-1.4x
and lost on the 4x4 and 2x2 ones (docs/performance.md, "oneDNN convolutions"), and its bfloat16 kernels
(AVX-512 only) are not measured yet.

Precision ("float32" or "bfloat16", flax's ``dtype`` with ``param_dtype`` float32): in bfloat16 every
convolution and matrix product takes bfloat16 operands and accumulates in float32, forward and backward
(the cotangents are cast too, so the gradient products also run on the bf16 units), layer outputs are
bfloat16 as under ``torch.autocast``, and the parameters, the optimizer, the logits, softmax and loss
stay float32. It changes the numbers within bfloat16's rounding (the parity suite bounds it against
float64 and torch.autocast), so unlike the forms it is a choice of the user's: "auto" picks bfloat16
only where the hardware multiplies bfloat16 natively (`bf16_units`).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxvgg import gemm, onednn

FORMS = ("native", "cpu", "fast")
CONV_FORMS = ("lax", "im2col", "direct", "toeplitz")
CONV_BACKENDS = ("xla", "onednn")
POOL_FORMS = ("reduce_window", "reshape")
MODES = ("train", "infer")
DTYPES = ("float32", "bfloat16")
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16"}  # the CLI's --precision names
# CPU flags (/proc/cpuinfo) of bfloat16 matrix hardware: Intel's AMX tiles, and AVX-512's bf16 dot
# products (AMD Zen 4 and later, Intel since Cooper Lake), which XLA's bf16 x bf16 -> f32 dots use, at
# about twice the float32 rate (docs/performance.md, "Mixed precision").
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
MKL_VENDOR = "GenuineIntel"  # "auto" GEMM is MKL's on this vendor's CPUs only (`make_policy`)
# In inference, im2col wins on the CPU below this many output pixels per image (VGG's 8x8 and 4x4
# blocks), lax.conv elsewhere; in training, im2col wins everywhere measured (docs/performance.md).
IM2COL_MAX_INFER_PIXELS = 64

# XLA:CPU hands dots, convolutions and the element-wise ops around them to YNNPACK by default. For some
# (model, mode) pairs Eigen's kernels and XLA's own loop emitters were faster in JAX-only A/B runs (LeNet
# training, VGG-A inference at 32x32, the transfer head's inference); for the other pairs YNNPACK was as
# fast or faster. The figures, and the CPU they were measured on, are in docs/performance.md.
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNNPACK_OFF = ((YNN_FUSION_OPTION, ""),)
CPU_COMPILER_OPTIONS: dict[tuple[str, str], tuple[tuple[str, Any], ...]] = {
    ("mnist_lenet", "train"): _YNNPACK_OFF,
    ("vgg11", "infer"): _YNNPACK_OFF,
    ("transfer_head", "infer"): _YNNPACK_OFF,
}


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a model computes (never what): resolved forms, GEMM backend and per-mode XLA options.

    Attributes:
      forms: "native", "cpu" or "fast" (module docstring).
      gemm: "xla" (XLA's dots) or "mkl" (MKL's sgemm through `jaxvgg.gemm`, float32 products).
      conv: "xla" (the forms' convolutions) or "onednn" (oneDNN's primitives wherever it has optimised
        kernels for the layer, `jaxvgg.onednn`; module docstring).
      dtype: compute precision, "float32" or "bfloat16" (module docstring); parameters stay float32.
      train_options / infer_options: XLA compile options for the model's training / inference
        programs, as sorted (name, value) pairs so the policy stays hashable.
    """

    forms: str = "native"
    gemm: str = "xla"
    train_options: tuple[tuple[str, Any], ...] = ()
    infer_options: tuple[tuple[str, Any], ...] = ()
    dtype: str = "float32"
    conv: str = "xla"

    def __post_init__(self):
        if self.forms not in FORMS:
            raise ValueError(f"Policy.forms={self.forms!r}; expected one of {', '.join(FORMS)}")
        if self.gemm not in gemm.BACKENDS:
            raise ValueError(f"Policy.gemm={self.gemm!r}; expected one of {', '.join(gemm.BACKENDS)}")
        if self.conv not in CONV_BACKENDS:
            raise ValueError(f"Policy.conv={self.conv!r}; expected one of {', '.join(CONV_BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Policy.dtype={self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.dtype != "float32" and self.gemm == "mkl":
            # MKL's cblas_gemm_bf16bf16f32 ran at a quarter of XLA's bf16 dots (docs/performance.md)
            raise ValueError("Policy.gemm='mkl' computes float32 products only; bfloat16 uses gemm='xla'")

    def with_dtype(self, dtype: Any) -> "Policy":
        """This policy computing in ``dtype`` (a name or jnp dtype). Leaving float32 also leaves what was
        tuned for it: MKL's products (float32 ones) become XLA's dots, and the XLA:CPU options go (with
        YNNPACK off, XLA:CPU's own dot kernels would run every bfloat16 product in float32)."""
        dtype = jnp.dtype(dtype).name
        if dtype == self.dtype:
            return self
        if dtype == "float32":
            return dataclasses.replace(self, dtype=dtype)
        return dataclasses.replace(self, dtype=dtype, gemm="xla", train_options=(), infer_options=())

    @property
    def compute_dtype(self) -> jnp.dtype:
        """The dtype of the products' operands and of the layer outputs (jnp.float32 or jnp.bfloat16)."""
        return jnp.dtype(self.dtype)

    def conv_form(self, out_pixels: int, train: bool, in_channels: int = 0, in_pixels: int = 0,
                  taps: int = 0) -> str:
        """The conv form ("lax", "im2col", "direct", "toeplitz") of a stride-1 layer.

        ``out_pixels`` and ``in_pixels`` are H*W of its output and input maps, ``taps`` kh*kw (0: unknown).
        """
        if self.forms == "native":
            return "lax"
        if 0 < in_pixels < taps:
            return "toeplitz"  # every output window covers the whole map: skip im2col's padding zeros
        if in_channels == 1 and not train:
            return "direct"
        if self.forms == "fast" or train or out_pixels <= IM2COL_MAX_INFER_PIXELS:
            return "im2col"
        return "lax"

    def onednn_conv(self, x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], padding: int,
                    dtype: Any) -> bool:
        """Whether a stride-1 layer (NHWC ``x_shape`` of ``dtype``, HWIO ``kernel_shape``) runs on oneDNN: the
        backend asks for it, the input is float32 or bfloat16 (a float64 run keeps XLA's forms) and oneDNN has
        optimised kernels for all three passes of this shape in the policy's precision."""
        return (self.conv == "onednn" and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16)
                and onednn.supports(tuple(x_shape), tuple(kernel_shape), padding, self.dtype))

    def pool_form(self, train: bool) -> str:
        """The 2x2 max-pool form ("reduce_window" or "reshape")."""
        if self.forms == "native":
            return "reduce_window"
        return "reshape" if self.forms == "fast" or train else "reduce_window"

    def compiler_options(self, mode: str) -> dict[str, Any] | None:
        """XLA compile options for this model's ``mode`` ("train" or "infer") programs; None: XLA's defaults."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; expected one of {', '.join(MODES)}")
        options = self.train_options if mode == "train" else self.infer_options
        return dict(options) or None

    def describe(self) -> str:
        """One line for logs: forms, GEMM and whether compile options are set."""
        options = [mode for mode in MODES if self.compiler_options(mode)]
        return (f"forms {self.forms}, GEMM {self.gemm}, {self.dtype}"
                + (", oneDNN convs" if self.conv == "onednn" else "")
                + (f", XLA:CPU options for {' and '.join(options)}" if options else ""))


NATIVE = Policy()


def _cpuinfo(field: str) -> str:
    """The first ``field`` line's value in Linux /proc/cpuinfo; "" where that cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == field:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux /proc/cpuinfo); empty where that cannot be read."""
    return frozenset(_cpuinfo("flags").split())


def cpu_vendor() -> str:
    """This CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...; "" where unknown)."""
    return _cpuinfo("vendor_id")


def bf16_units(backend: str | None = None, flags: frozenset[str] | None = None,
               compute_capability: str | None = None) -> bool:
    """Whether ``backend``'s hardware multiplies bfloat16 natively: the CPU flags in `CPU_BF16_FLAGS`,
    NVIDIA GPUs of compute capability 8.0 or newer, TPUs. ``flags`` / ``compute_capability`` default to
    this machine's (given, they let a test stand for another machine)."""
    backend = backend or jax.default_backend()
    if backend == "tpu":
        return True
    if backend == "cpu":
        flags = cpu_flags() if flags is None else flags
        return any(flag in flags for flag in CPU_BF16_FLAGS)
    if backend in ("gpu", "cuda"):
        if compute_capability is None:
            compute_capability = getattr(jax.devices(backend)[0], "compute_capability", "0")
        return float(compute_capability) >= 8.0
    return False


def resolve_precision(precision: str, backend: str | None = None, **hardware: Any) -> str:
    """"auto", "fp32"/"float32" or "bf16"/"bfloat16" -> "float32" or "bfloat16" ("auto": `bf16_units`)."""
    if precision == "auto":
        return "bfloat16" if bf16_units(backend, **hardware) else "float32"
    dtype = PRECISIONS.get(precision, precision)
    if dtype not in DTYPES:
        raise ValueError(f"precision={precision!r}; expected auto, {', '.join(PRECISIONS)} or {', '.join(DTYPES)}")
    return dtype


def precision_name(dtype: str) -> str:
    """"float32" -> "fp32", "bfloat16" -> "bf16" (the names ``--precision`` takes)."""
    return {v: k for k, v in PRECISIONS.items()}[jnp.dtype(dtype).name]


def make_policy(model: str | None = None, forms: str = "auto", gemm_backend: str = "auto",
                backend: str | None = None, num_devices: int | None = None,
                precision: str = "fp32", conv_backend: str = "auto") -> Policy:
    """Resolves "auto" choices into a `Policy` for ``model`` (a registry name; None: no compile options).

    Args:
      model: picks the model's XLA:CPU options from `CPU_COMPILER_OPTIONS` under the CPU forms.
      forms: "auto" ("cpu" on the CPU backend, "native" elsewhere) or one of `FORMS`.
      gemm_backend: "auto" (MKL where its handler is built, on the CPU, with one device, in float32, and
        on an Intel CPU under the "cpu" forms or any CPU under "fast"), "xla" or "mkl" (an error where
        MKL cannot run).
      backend: JAX backend name; default ``jax.default_backend()``.
      num_devices: devices the program will span; default ``jax.device_count()``. MKL's custom call has
        no partitioning rule, so several devices keep XLA's dots.
      precision: "fp32" (default), "bf16", or "auto" (`resolve_precision`). In bfloat16, "auto" GEMM is
        XLA's dot (MKL's products are float32 ones).
      conv_backend: "auto" ("onednn" under the "fast" forms with one device where oneDNN runs the precision,
        else "xla": module docstring), "xla" or "onednn" (an error where oneDNN's handler is not built or
        has no optimised kernels for the precision on this CPU).
    """
    backend = backend or jax.default_backend()
    dtype = resolve_precision(precision, backend)
    if forms == "auto":
        forms = "cpu" if backend == "cpu" else "native"
    if forms not in FORMS:
        raise ValueError(f"forms={forms!r}; expected auto or one of {', '.join(FORMS)}")
    if gemm_backend not in ("auto", *gemm.BACKENDS):
        raise ValueError(f"gemm={gemm_backend!r}; expected auto or one of {', '.join(gemm.BACKENDS)}")
    num_devices = jax.device_count() if num_devices is None else num_devices
    if gemm_backend == "auto":
        usable = backend == "cpu" and forms != "native" and num_devices == 1 and dtype == "float32"
        # MKL beat XLA's dots on the Intel Xeon; on AMD CPUs (MKL takes no AVX-512 path there) XLA's were
        # faster (docs/performance.md). "fast" forces MKL wherever it is built, so the parity suite's fast
        # column proves its products on every machine.
        preferred = forms == "fast" or cpu_vendor() == MKL_VENDOR
        gemm_backend = "mkl" if usable and preferred and gemm.problem() is None else "xla"
    elif gemm_backend == "mkl":
        if backend != "cpu":
            raise ValueError(f"gemm=mkl runs on the CPU only; the backend is {backend}")
        if gemm.problem() is not None:
            raise RuntimeError(f"gemm=mkl, but {gemm.problem()}")
    if conv_backend not in ("auto", *CONV_BACKENDS):
        raise ValueError(f"conv={conv_backend!r}; expected auto or one of {', '.join(CONV_BACKENDS)}")
    if conv_backend == "auto":
        # "fast" forces oneDNN wherever it runs, as it forces MKL, so the parity suite's fast column proves
        # its convolutions on every machine; the custom calls have no partitioning rule: one device only
        usable = backend == "cpu" and forms == "fast" and num_devices == 1
        conv_backend = "onednn" if usable and onednn.problem(dtype) is None else "xla"
        if usable and conv_backend == "xla":
            warnings.warn(f"the fast forms keep XLA's convolutions: {onednn.problem(dtype)}", stacklevel=2)
    elif conv_backend == "onednn":
        if backend != "cpu":
            raise ValueError(f"conv=onednn runs on the CPU only; the backend is {backend}")
        if onednn.problem(dtype) is not None:
            raise RuntimeError(f"conv=onednn, but {onednn.problem(dtype)}")
    # the options were measured in float32; in bfloat16 YNNPACK must stay on: XLA:CPU's own dot kernels
    # do not use the bf16 units (docs/performance.md, "Mixed precision")
    tuned = backend == "cpu" and forms != "native" and dtype == "float32"
    options = {mode: CPU_COMPILER_OPTIONS.get((model, mode), ()) if tuned else () for mode in MODES}
    return Policy(forms, gemm_backend, options["train"], options["infer"], dtype, conv_backend)
