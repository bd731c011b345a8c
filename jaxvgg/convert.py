"""The one place that maps PyTorch state_dicts to flax variables and back.

Naming: a flax layer is the torch module path with ``.`` written as ``_`` (see `jaxvgg.models`),
so ``features.3.weight`` <-> ``params/features_3/kernel``. Layouts:
  conv weight   torch (O, I, kH, kW)  <-> flax (kH, kW, I, O)
  linear weight torch (out, in)       <-> flax (in, out)
  bias          (out,)                 <-> (out,)
  BatchNorm     weight, bias           <-> params scale, bias
                running_mean, running_var, num_batches_tracked
                                       <-> batch_stats mean, var, num_batches_tracked
A state_dict without ``num_batches_tracked`` (torchvision's older checkpoints) loads with 0, as torch
loads it; with it, torch -> flax -> torch returns every tensor bit for bit.
The models flatten in torch's (C, H, W) order before their first Linear layer (`layers.torch_flatten`),
so that layer's weight needs only the transpose above — no row permutation — at any input size
(2x2x256 in the CIFAR CNN, 7x7x512 in VGG at 224).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from jaxvgg import models

# flax (collection, leaf) <-> torch's last key component
_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight", ("params", "bias"): "bias",
               ("batch_stats", "mean"): "running_mean", ("batch_stats", "var"): "running_var",
               ("batch_stats", "num_batches_tracked"): "num_batches_tracked"}
# torch buffers that may be absent (torch fills them in on load too)
_OPTIONAL = ("num_batches_tracked",)


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def torch_key(flax_path: tuple[str, ...], collection: str = "params") -> str:
    """('features_0', 'kernel') -> 'features.0.weight'; ('features_1', 'mean') in batch_stats ->
    'features.1.running_mean'."""
    *layer, leaf = flax_path
    return ".".join(layer).replace("_", ".") + "." + _TORCH_LEAF[collection, leaf]


def torch_to_flax_array(leaf: str, value: np.ndarray) -> np.ndarray:
    """Re-lays one torch tensor out as the flax parameter ``leaf`` ('kernel' or 'bias')."""
    if leaf == "bias" or value.ndim == 1:
        return value
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)  # (O, I, kH, kW) -> (kH, kW, I, O)
    return value.T  # (out, in) -> (in, out)


def flax_to_torch_array(leaf: str, value: np.ndarray) -> np.ndarray:
    """Inverse of `torch_to_flax_array`."""
    if leaf == "bias" or value.ndim == 1:
        return value
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)  # (kH, kW, I, O) -> (O, I, kH, kW)
    return value.T


def expected_variables(name: str, input_shape: tuple[int, int, int] | None = None,
                       **model_kw: Any) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """Flat {(collection, *flax path): shape and dtype} of a named model's variables (params, and
    batch_stats for BatchNorm models), without allocating them."""
    model = models.create_model(name, **model_kw)
    shape = tuple(input_shape or models.get_spec(name).input_shape)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *shape), np.float32))
    return {path: leaf for path, leaf in traverse_util.flatten_dict(dict(abstract)).items()}


def expected_param_shapes(name: str, input_shape: tuple[int, int, int] | None = None,
                          **model_kw: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {flax path: shape} of a named model's params, without allocating them."""
    return {path[1:]: tuple(leaf.shape) for path, leaf in expected_variables(name, input_shape, **model_kw).items()
            if path[0] == "params"}


def from_torch(name: str, state_dict: Mapping[str, Any], *, input_shape: tuple[int, int, int] | None = None,
               **model_kw: Any) -> dict:
    """Converts a PyTorch state_dict to flax variables for ``create_model(name, **model_kw)``.

    Args:
      name: a `jaxvgg.list_models()` name.
      state_dict: torch tensors or numpy arrays under torch's keys (``features.0.weight`` ...).
      input_shape: (H, W, C) the model will see; it fixes the first Linear size of ``vgg11``
        (25,088 at 224x224, 512 at 32x32). Defaults to the model's tutorial input.
      **model_kw: passed to `create_model` (``num_classes`` ...).

    Returns:
      ``{"params": ...}`` with numpy float32 leaves, and ``"batch_stats"`` for BatchNorm models
      (float32 running statistics, int32 ``num_batches_tracked``).

    Raises:
      ValueError: listing every missing key, unexpected key and wrong shape (expected vs found).
    """
    expected = expected_variables(name, input_shape, **model_kw)
    by_key = {torch_key(path[1:], path[0]): path for path in expected}
    given = dict(state_dict)

    problems = [f"missing key {k!r} (expected shape {_torch_shape(p, expected[p].shape)})"
                for k, p in by_key.items() if k not in given and not k.endswith(_OPTIONAL)]
    problems += [f"unexpected key {k!r} (shape {tuple(np.shape(_to_numpy(v)))})"
                 for k, v in given.items() if k not in by_key]
    flat = {}
    for k, path in by_key.items():
        want = expected[path]
        if k not in given:
            if k.endswith(_OPTIONAL):
                flat[path] = np.zeros(want.shape, want.dtype)
            continue
        value = torch_to_flax_array(path[-1], _to_numpy(given[k]))
        if value.shape != want.shape:
            problems.append(f"wrong shape for {k!r}: expected {_torch_shape(path, want.shape)}, "
                            f"found {tuple(np.shape(_to_numpy(given[k])))}")
            continue
        # copy: torch tensors' .numpy() share memory, and a torch optimizer would change them under us
        dtype = want.dtype if np.issubdtype(want.dtype, np.integer) else np.float32
        flat[path] = np.array(value, dtype, copy=True)
    if problems:
        hint = ""
        if f"{name}_torchvision" in models.REGISTRY and any("classifier.0.weight" in p for p in problems):
            hint = (f" ({name}'s first Linear size follows the image size: pass input_shape=(32, 32, 3) for CIFAR, "
                    f"or use {name}_torchvision for torchvision's 7x7-pooled head)")
        elif any(".running_mean" in p for p in problems):
            hint = " (BatchNorm buffers: a state_dict of torchvision's vgg*_bn loads into the *_bn models)"
        raise ValueError(f"state_dict does not fit {name!r}{hint}:\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(flat)


def _torch_shape(path: tuple[str, ...], flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(flax_to_torch_array(path[-1], np.empty(flax_shape, np.uint8)).shape)


def to_torch(name: str, variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Converts flax variables (or a gradient pytree of the same structure) to a torch-keyed dict.

    ``name`` is kept for symmetry with `from_torch` and checked against the registry; the mapping
    itself is the same for every model. Values are numpy arrays (``torch.from_numpy`` them to load).
    """
    models.get_spec(name)
    collections = ({c: variables[c] for c in ("params", "batch_stats") if c in variables} if "params" in variables
                   else {"params": variables})
    out = {}
    for path, leaf in traverse_util.flatten_dict(collections).items():
        value = np.asarray(leaf)
        if path[-1] == "num_batches_tracked":
            value = value.astype(np.int64)  # torch's dtype for the counter
        out[torch_key(path[1:], path[0])] = np.array(flax_to_torch_array(path[-1], value), order="C")  # keeps 0-d
    return out


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state_dict from ``.pth``/``.pt`` (``torch.load(weights_only=True)``) or ``.npz``.

    Never unpickles arbitrary objects: ``.pth`` goes through torch's weights-only loader, ``.npz``
    through ``np.load(allow_pickle=False)``; ``.npz`` needs no torch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state_dict file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    if suffix in (".pth", ".pt"):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"reading {path} needs torch (pip install 'jaxvgg[torch]'), "
                              "or save the state_dict as .npz") from e
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]  # checkpoints that wrap the weights
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
        return {k: v.detach().cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}
    raise ValueError(f"{path}: unknown state_dict format {suffix!r}; expected .pth, .pt or .npz")


def transplant(source: Mapping[str, Any], target: Mapping[str, Any], keep: Sequence[str] = ()) -> dict:
    """``target``'s parameters with every layer whose name does not start with a ``keep`` prefix taken from ``source``.

    The transfer-learning step: ``transplant(pretrained_vgg16, fresh_transfer_model, keep=("classifier_6",))``
    gives the transfer model the pretrained backbone and its own new head. Both are flax parameter trees
    (``{"params": ...}`` or the inner dict); the layers taken must exist in both with the same leaves and
    shapes, and layers of ``source`` that ``target`` lacks (outside ``keep``) are an error: every problem
    is named at once.
    """
    source, target = source.get("params", source), target.get("params", target)
    keep = tuple(keep)
    wanted = {layer for layer in target if not layer.startswith(keep)} if keep else set(target)
    given = {layer for layer in source if not layer.startswith(keep)} if keep else set(source)
    problems = [f"missing layer {layer!r}" for layer in sorted(wanted - given)]
    problems += [f"unexpected layer {layer!r}" for layer in sorted(given - wanted)]
    for layer in sorted(wanted & given):
        target_leaves = dict(traverse_util.flatten_dict(target[layer], sep="/"))
        source_leaves = dict(traverse_util.flatten_dict(source[layer], sep="/"))
        for leaf in sorted(set(target_leaves) | set(source_leaves)):
            want, found = target_leaves.get(leaf), source_leaves.get(leaf)
            if want is None or found is None or np.shape(want) != np.shape(found):
                problems.append(f"{layer}/{leaf}: expected shape {None if want is None else np.shape(want)}, "
                                f"found {None if found is None else np.shape(found)}")
    if problems:
        raise ValueError(f"cannot transplant {len(problems)} layer(s):\n  " + "\n  ".join(problems))
    return {**target, **{layer: source[layer] for layer in wanted}}
