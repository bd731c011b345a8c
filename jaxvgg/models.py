"""The tutorials' networks as flax.linen modules (NHWC inputs), and the registry that names them.

This file says *what* each network computes; *how* (conv and pool forms, GEMM backend, precision,
compile options) is the `jaxvgg.policy.Policy` each module holds, and the forms live in `jaxvgg.layers`.
Whatever the precision, parameters are float32 and every network's output (logits or log-probabilities)
is float32: the final log-softmax runs in float32, as torch.autocast runs it.

Every module names its layers after the PyTorch state_dict key of the layer it mirrors, with
``.`` written as ``_`` (``features.0`` -> ``features_0``, ``classifier.6.0`` -> ``classifier_6_0``),
so `jaxvgg.convert` needs no per-model table. The outputs torch forward hooks would see are in the
``intermediates`` collection under the same names: layers that are modules (Conv, BatchNorm, Dense, Dropout)
through ``capture_intermediates=INTERMEDIATE_LAYERS``, functional ones (ReLU, max-pool, adaptive
pool, log-softmax) sown by the network; see `layer_outputs`.

Flattening before the first Linear layer goes through NCHW so the flat vector has torch's
(C, H, W) order and converted Linear weights work unchanged.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvgg.layers import (BatchNorm2d, Conv2d, Dense, adaptive_avg_pool, max_pool_2x2, torch_conv, torch_dense,
                           torch_flatten)
from jaxvgg.policy import NATIVE, Policy, make_policy

# VGG configurations: conv widths, "M" = 2x2 max-pool (Simonyan & Zisserman 2015, Table 1;
# the same lists as torchvision.models.vgg.cfgs).
VGG_CFGS: dict[str, list[int | str]] = {
    "A": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "B": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "D": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "E": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
VGG_DEPTHS = {11: "A", 13: "B", 16: "D", 19: "E"}  # torchvision's names for the paper's configurations

# torchvision.models.VGG._initialize_weights: kaiming_normal_(fan_out, relu) convs, N(0, 0.01) linears,
# zero biases.
vgg_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
vgg_linear_init = nn.initializers.normal(stddev=0.01)

# The transfer tutorial's new classifier[6]: Linear(4096, 256) -> ReLU -> Dropout(0.4) -> Linear(256, n)
# -> LogSoftmax, with torch's default Linear initialisation.
TRANSFER_HEAD = (256, 0.4)  # (width, dropout)
TRANSFER_PREFIX = "classifier_6"  # the new head's layers; everything else comes from the pretrained VGG


def _record(module: nn.Module, name: str, x: jax.Array) -> jax.Array:
    """Records a functional layer's output under its torch name (see `layer_outputs`)."""
    module.sow("intermediates", name, x)
    return x


def log_softmax(x: jax.Array) -> jax.Array:
    """Log-probabilities over the last axis, in float32 (or wider) whatever the compute precision."""
    return nn.log_softmax(at_least_float32(x), axis=-1)


def at_least_float32(x: jax.Array) -> jax.Array:
    """``x`` as float32 when it is narrower (a bfloat16 model's outputs); float32 and float64 unchanged."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _transfer_head(module: nn.Module, x: jax.Array, num_classes: int, train: bool, policy: Policy,
                   width: int = TRANSFER_HEAD[0], rate: float = TRANSFER_HEAD[1]) -> jax.Array:
    """classifier_6_0 .. classifier_6_4 of ``module`` (called from its compact ``__call__``)."""
    x = torch_dense(f"{TRANSFER_PREFIX}_0", width, x.shape[-1], policy)(x)
    x = _record(module, f"{TRANSFER_PREFIX}_1", nn.relu(x))
    x = nn.Dropout(rate, deterministic=not train, name=f"{TRANSFER_PREFIX}_2")(x)
    x = torch_dense(f"{TRANSFER_PREFIX}_3", num_classes, width, policy)(x)
    return _record(module, f"{TRANSFER_PREFIX}_4", log_softmax(x))


class VGG(nn.Module):
    """VGG from a cfg list, mirroring torchvision's ``features`` / ``classifier`` indices.

    Attributes:
      cfg: conv widths and "M" for max-pool.
      batch_norm: Conv -> BatchNorm2d -> ReLU per width (torchvision's ``make_layers(batch_norm=True)``:
        three ``features`` indices per conv instead of two; the conv keeps its bias).
      num_classes: outputs of the last Linear layer.
      avgpool_size: torchvision's AdaptiveAvgPool2d((7, 7)) when set; None for the paper/tutorial
        network that flattens whatever the last pool leaves (512 at 32x32, 25,088 at 224x224).
      hidden: width of the two hidden Linear layers.
      dropout_rate: dropout before the 2nd and 3rd Linear layers (0.5 in the paper).
      transfer_head: replace classifier[6] by Linear(4096, h) -> ReLU -> Dropout(p) -> Linear(h, n)
        -> LogSoftmax, given as (h, p); then the output is log-probabilities.
      freeze_features: stop gradients below the transfer head (the tutorial freezes them).
      policy: how it computes (`jaxvgg.policy.Policy`); every policy computes the same function.
    """

    cfg: Sequence[int | str]
    batch_norm: bool = False
    num_classes: int = 1000
    avgpool_size: tuple[int, int] | None = None
    hidden: int = 4096
    dropout_rate: float = 0.5
    transfer_head: tuple[int, float] | None = None
    freeze_features: bool = False
    policy: Policy = NATIVE


    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        idx = 0
        features_train = train and not self.freeze_features  # frozen features only run forward
        for v in self.cfg:
            if v == "M":
                x = _record(self, f"features_{idx}", max_pool_2x2(x, self.policy.pool_form(features_train)))
                idx += 1
            else:
                x = Conv2d(int(v), 3, 1, kernel_init=vgg_conv_init, bias_init=nn.initializers.zeros,
                           policy=self.policy, name=f"features_{idx}")(x, features_train)
                if self.batch_norm:
                    idx += 1
                    x = BatchNorm2d(policy=self.policy, name=f"features_{idx}")(x, features_train)
                x = _record(self, f"features_{idx + 1}", nn.relu(x))
                idx += 2
        if self.avgpool_size is not None:
            x = _record(self, "avgpool", adaptive_avg_pool(x, self.avgpool_size))
        x = torch_flatten(x)

        dense = partial(Dense, kernel_init=vgg_linear_init, bias_init=nn.initializers.zeros, policy=self.policy)
        for i in (0, 3):
            x = dense(self.hidden, name=f"classifier_{i}")(x)
            x = _record(self, f"classifier_{i + 1}", nn.relu(x))
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"classifier_{i + 2}")(x)
        if self.transfer_head is None:
            return at_least_float32(dense(self.num_classes, name="classifier_6")(x))

        if self.freeze_features:
            x = jax.lax.stop_gradient(x)  # nothing below the head trains: skip its backward pass
        return _transfer_head(self, x, self.num_classes, train, self.policy, *self.transfer_head)


class TransferHead(nn.Module):
    """vgg16_transfer above classifier.4, to train on cached features: Dropout(0.5) (the frozen model's
    classifier.5) -> the tutorial's new head -> log-probabilities.

    Its parameters are exactly classifier_6_0 / classifier_6_3 of vgg16_transfer, initialised as there
    (torch's default Linear init), so they drop back into the full model; the input width is whatever
    the features have (4096 for classifier.4).
    """

    num_classes: int = 100
    width: int = TRANSFER_HEAD[0]
    dropout_rate: float = TRANSFER_HEAD[1]
    features_dropout_rate: float = 0.5
    policy: Policy = NATIVE

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Dropout(self.features_dropout_rate, deterministic=not train, name="classifier_5")(x)
        return _transfer_head(self, x, self.num_classes, train, self.policy, self.width, self.dropout_rate)


class CifarCNN(nn.Module):
    """The CIFAR-10 tutorial CNN: three conv/ReLU/max-pool blocks and three Linear layers (537,610 params).

    Returns log-probabilities, as the tutorial's ``F.log_softmax``.
    """

    num_classes: int = 10
    policy: Policy = NATIVE

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        # no dropout in this network; ``train`` only picks the fastest conv/pool forms
        in_ch = x.shape[-1]
        for name, width in (("conv1", 64), ("conv2", 128), ("conv3", 256)):
            x = torch_conv(name, width, in_ch, 3, policy=self.policy)(x, train)
            x = max_pool_2x2(nn.relu(x), self.policy.pool_form(train))
            in_ch = width
        x = torch_flatten(x)  # (B, 2, 2, 256) -> (B, 1024), torch flatten order
        for name, width in (("fc1", 128), ("fc2", 256)):
            x = torch_dense(name, width, x.shape[-1], self.policy)(x)
            x = nn.relu(x)
        x = torch_dense("fc3", self.num_classes, x.shape[-1], self.policy)(x)
        return log_softmax(x)


class MnistLinear(nn.Module):
    """The MNIST lab's linear baseline: Flatten + Linear(784, 10), log-probabilities out."""

    num_classes: int = 10
    policy: Policy = NATIVE

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        x = torch_flatten(x)
        x = torch_dense("fc", self.num_classes, x.shape[-1], self.policy)(x)
        return log_softmax(x)


class MnistLeNet(nn.Module):
    """LeNet-5-like net for 1x28x28: conv(1->6, 5x5, pad 2)-pool-conv(6->16, 5x5)-pool-120-84-10."""

    num_classes: int = 10
    policy: Policy = NATIVE

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        conv = partial(torch_conv, policy=self.policy)
        pool = partial(max_pool_2x2, form=self.policy.pool_form(train))
        x = conv("conv1", 6, x.shape[-1], 5, padding=2)(x, train)
        x = pool(nn.relu(x))  # (B, 14, 14, 6)
        x = conv("conv2", 16, 6, 5)(x, train)
        x = torch_flatten(pool(nn.relu(x)))  # (B, 5, 5, 16) -> (B, 400)
        for name, width in (("fc1", 120), ("fc2", 84)):
            x = torch_dense(name, width, x.shape[-1], self.policy)(x)
            x = nn.relu(x)
        x = torch_dense("fc3", self.num_classes, x.shape[-1], self.policy)(x)
        return log_softmax(x)


def INTERMEDIATE_LAYERS(module: nn.Module, method_name: str) -> bool:
    """capture_intermediates filter: the outputs of the layers that mirror torch modules."""
    return method_name == "__call__" and isinstance(module, (Conv2d, BatchNorm2d, Dense, nn.Conv, nn.Dense,
                                                             nn.Dropout))


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


def _vgg_variants() -> dict[str, ModelSpec]:
    """vgg{11,13,16,19}[_bn]: the paper/CIFAR-native head (flatten what the last pool leaves);
    vgg{11,13,16,19}[_bn]_torchvision: torchvision's (AdaptiveAvgPool 7x7), loading its state_dicts unchanged."""
    specs = {}
    for depth, cfg in VGG_DEPTHS.items():
        for bn in (False, True):
            name = f"vgg{depth}{'_bn' if bn else ''}"
            specs[name] = ModelSpec(partial(VGG, VGG_CFGS[cfg], batch_norm=bn), (224, 224, 3), 1000, log_probs=False)
            specs[f"{name}_torchvision"] = ModelSpec(partial(VGG, VGG_CFGS[cfg], batch_norm=bn, avgpool_size=(7, 7)),
                                                     (224, 224, 3), 1000, log_probs=False)
    return specs


def transfer_arch(arch: str) -> dict[str, Any]:
    """`create_model` keywords that give vgg16_transfer the backbone of torchvision VGG ``arch``
    (``vgg16``, ``vgg11_bn`` ...); its pretrained weights are ``from_torch(f"{arch}_torchvision", ...)``."""
    depth, _, bn = arch.removeprefix("vgg").partition("_")
    if not depth.isdigit() or int(depth) not in VGG_DEPTHS or bn not in ("", "bn"):
        raise ValueError(f"unknown VGG architecture {arch!r}; expected one of {', '.join(VGG_ARCHS)}")
    return {"cfg": VGG_CFGS[VGG_DEPTHS[int(depth)]], "batch_norm": bool(bn)}


VGG_ARCHS = tuple(f"vgg{d}{bn}" for d in VGG_DEPTHS for bn in ("", "_bn"))  # torchvision's eight constructors
vgg16_transfer = partial(VGG, cfg=VGG_CFGS["D"], avgpool_size=(7, 7), transfer_head=TRANSFER_HEAD,
                         freeze_features=True)

REGISTRY: dict[str, ModelSpec] = {
    **_vgg_variants(),
    "vgg16_transfer": ModelSpec(vgg16_transfer, (224, 224, 3), 100, log_probs=True,
                                frozen_prefixes=("features_", "classifier_0", "classifier_3")),
    # the new head alone, on cached 4096-d classifier.4 features (the transfer experiments, the benchmark)
    "transfer_head": ModelSpec(TransferHead, (4096,), 100, log_probs=True),
    "cifar_cnn": ModelSpec(CifarCNN, (32, 32, 3), 10, log_probs=True),
    "mnist_linear": ModelSpec(MnistLinear, (28, 28, 1), 10, log_probs=True),
    "mnist_lenet": ModelSpec(MnistLeNet, (28, 28, 1), 10, log_probs=True),
}


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``, with the known names in the error."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}") from None


def list_models() -> list[str]:
    """Names accepted by `create_model`."""
    return sorted(REGISTRY)


def create_model(name: str, num_classes: int | None = None, policy: Policy | None = None, dtype: Any = None,
                 **kwargs: Any) -> nn.Module:
    """Builds a named model.

    Args:
      name: one of `list_models()`.
      num_classes: outputs; defaults to the model's tutorial value (1000 for the torchvision VGGs,
        100 for vgg16_transfer and transfer_head, 10 otherwise).
      policy: how it runs (`jaxvgg.policy.Policy`); default ``make_policy(name)``, the fastest forms
        for the current backend, resolved now.
      dtype: compute precision (flax's ``dtype``: ``jnp.bfloat16`` or ``jnp.float32``); overrides the
        policy's (`jaxvgg.policy.Policy.dtype`; parameters stay float32, ``param_dtype`` in flax's terms).
      **kwargs: module attributes to override (e.g. ``dropout_rate``).

    Returns:
      An unbound flax.linen Module; ``model.apply(variables, x)`` is evaluation mode and
      ``model.apply(variables, x, train=True, rngs={"dropout": key})`` training mode.
    """
    spec = get_spec(name)
    policy = make_policy(name) if policy is None else policy
    if dtype is not None:
        policy = policy.with_dtype(dtype)
    return spec.build(num_classes=spec.num_classes if num_classes is None else num_classes, policy=policy, **kwargs)


def init_params(name: str, key: jax.Array, num_classes: int | None = None,
                input_shape: Sequence[int] | None = None, **kwargs: Any) -> dict:
    """Fresh variables for a named model at ``input_shape`` (H, W, C): ``{"params": ...}``, and
    ``"batch_stats"`` (running mean 0, variance 1, as torch starts them) for the BatchNorm models."""
    model = create_model(name, num_classes, NATIVE, **kwargs)  # the parameters do not depend on the policy
    shape = tuple(input_shape or get_spec(name).input_shape)
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, *shape), jnp.float32)))(key)


def count_params(params: Any) -> int:
    """Total number of scalars in a parameter pytree; of a model's variables, those of ``params`` only
    (BatchNorm's running statistics are buffers, as torch's ``parameters()`` leaves them out)."""
    if isinstance(params, dict) and "params" in params:
        params = params["params"]
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
