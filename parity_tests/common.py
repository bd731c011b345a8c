"""Shared set-up for the parity tests: the same weights and inputs in both frameworks."""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

import jaxvgg
import torch_ref
from jaxvgg import models, parallel
from jaxvgg.policy import Policy, make_policy

torch.use_deterministic_algorithms(True)


@dataclasses.dataclass(frozen=True)
class Case:
    """One model at one input size."""

    name: str
    height: int
    width: int
    num_classes: int
    batch: int = 2
    tol: float = 1e-5  # rtol = atol for outputs and activations

    @property
    def id(self) -> str:
        return f"{self.name}@{self.height}x{self.width}/{self.num_classes}"

    @property
    def channels(self) -> int:
        return models.get_spec(self.name).input_shape[-1]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)


def build_torch(case: Case, seed: int = 0, dropout: float | None = None) -> nn.Module:
    """The torch original with its own default init under a fixed seed, eval mode."""
    torch.manual_seed(seed)
    model = torch_ref.build(case.name, case.num_classes, image_size=case.height)
    if dropout is not None:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
    return model.eval()


def torch_state(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def convert(case: Case, model: nn.Module) -> dict:
    """Flax variables converted from the torch model's state_dict."""
    return jaxvgg.from_torch(case.name, model.state_dict(), input_shape=case.input_shape,
                             num_classes=case.num_classes)


@lru_cache(maxsize=None)
def inputs(case: Case, seed: int = 1) -> np.ndarray:
    """Fixed NHWC float32 inputs, roughly normalised images."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((case.batch, *case.input_shape)).astype(np.float32)


def labels(case: Case, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, case.num_classes, case.batch).astype(np.int32)


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(t: torch.Tensor) -> np.ndarray:
    a = t.detach().numpy()
    return a.transpose(0, 2, 3, 1) if a.ndim == 4 else a


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def torch_activations(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Forward with hooks on every leaf module; {key with '.' -> '_': NHWC output}."""
    acts: dict[str, np.ndarray] = {}
    handles = []
    for name, module in model.named_modules():
        if list(module.children()) or isinstance(module, nn.Identity) or not name:
            continue
        key = name.replace(".", "_")
        # clone: an in-place ReLU after a conv would otherwise overwrite what the hook saw
        handles.append(module.register_forward_hook(
            lambda m, i, o, key=key: acts.__setitem__(key, to_nhwc(o.detach().clone()))))
    try:
        with torch.no_grad():
            out = model(to_nchw(x))
    finally:
        for h in handles:
            h.remove()
    return out.numpy(), acts


def policy(case: Case, form: str) -> Policy:
    """The policy of the form under test ("native" or "fast"), with the model's own compile options."""
    return make_policy(case.name, forms=form)


def flax_activations(case: Case, variables: dict, x: np.ndarray, form: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Eval-mode forward in ``form``, compiled as the library compiles inference; {sown layer name: output}."""
    model = jaxvgg.create_model(case.name, num_classes=case.num_classes, policy=policy(case, form))
    out, acts = parallel.compile_step(lambda v, x: models.layer_outputs(model, v, x), model.policy, "infer")(
        variables, jnp.asarray(x))
    return np.asarray(out), {name: np.asarray(a) for name, a in acts.items()}
