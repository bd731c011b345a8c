"""Model-side evaluation glue: test-set probabilities, and the outputs of any layer (t-SNE, transfer learning).

`jaxvgg.metrics` works on numpy arrays only; this module runs the network to produce them:

    log_probs = predict_log_probs(state, test, eval_tf)            # float64 (N, C), rows logsumexp to 0
    probs = predict_probs(state, test, eval_tf)                    # float64 (N, C), rows sum to 1
    tta = tta_log_probs(state, test, eval_tf, level=2)             # mirror + translate views, averaged
    feats = penultimate_features("mnist_lenet", model, state.variables, test.images[:2000],
                                 transform=eval_tf)                # (2000, 84): the input of fc3
    train_x, test_x = extract_features(model, variables, [train, test], "classifier_4", transform=eval_tf)
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxvgg import augment, data, models, parallel
from jaxvgg.layers import torch_flatten
from jaxvgg.policy import NATIVE
from jaxvgg.train import EvalTransform, TrainState, padded_outputs, predict

# The input of each registry model's last Linear layer: (captured layer whose output it is, or None for
# the network's input, and the function between that output and the last Linear).
_PENULTIMATE: dict[str, tuple[str | None, Callable | None]] = {
    "mnist_linear": (None, torch_flatten),  # the only layer reads the flattened image
    "mnist_lenet": ("fc2", nn.relu),  # fc3(relu(fc2(x)))
    "cifar_cnn": ("fc2", nn.relu),
    # VGG: classifier_6 reads the output of the Dropout classifier_5 (the identity in eval mode)
    **{name: ("classifier_5", None) for name in models.list_models()
       if name.startswith("vgg") and name != "vgg16_transfer"},
    "vgg16_transfer": ("classifier_6_2", None),  # the new head's last Linear is classifier_6_3
    "transfer_head": ("classifier_6_2", None),
}


def predict_log_probs(state: TrainState, dataset: data.BatchSource, eval_transform: EvalTransform,
                      batch_size: int = 500, mesh: Any = None) -> np.ndarray:
    """Normalised log-probabilities of every example, in float64.

    Args:
      state: a trained `TrainState` (logit or log-prob outputs, either works).
      dataset: a `jaxvgg.data.BatchSource` (a `Dataset` of uint8 images, `Features`, a stream).
      eval_transform: jittable ``uint8 images -> float32``.
      batch_size: examples per forward pass.
      mesh: split every batch over this mesh's devices (`jaxvgg.train.predict`); over several processes
        every process calls this, reads its rows and gets all N rows back. None: one device.

    Returns:
      float64 (N, C): ``log_softmax`` of the outputs computed in float64, so each row's ``exp`` sums to 1
      to float64 precision (a log_softmax output is renormalised, which changes it by float32 rounding only).
    """
    outputs = np.asarray(predict(state, dataset, eval_transform, batch_size, mesh), np.float64)
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def predict_probs(state: TrainState, dataset: data.BatchSource, eval_transform: EvalTransform,
                  batch_size: int = 500, mesh: Any = None) -> np.ndarray:
    """Probabilities of every example: float64 (N, C), rows summing to 1 (see `predict_log_probs`)."""
    return probs_from_log_probs(predict_log_probs(state, dataset, eval_transform, batch_size, mesh))


def tta_log_probs(state: TrainState, dataset: data.Dataset, eval_transform: EvalTransform, level: int,
                  batch_size: int = 500, mesh: Any = None) -> np.ndarray:
    """Test-time augmentation: the log of the weighted mean of the class probabilities over the views of
    `augment.tta_views` (``level`` 0: `predict_log_probs` itself). float64 (N, C), rows logsumexp to 0.

    ``dataset`` holds uint8 images (each view moves or mirrors them before ``eval_transform``).
    """
    mean = None
    for weight, view in augment.tta_views(level):
        probs = probs_from_log_probs(predict_log_probs(state, dataset, _viewed(view, eval_transform), batch_size,
                                                       mesh))
        mean = weight * probs if mean is None else mean + weight * probs
    return np.log(np.maximum(mean, np.finfo(np.float64).tiny))  # a probability of 0 stays finite


def _viewed(view: Callable, eval_transform: EvalTransform) -> EvalTransform:
    return lambda images: eval_transform(view(images))


def probs_from_log_probs(log_probs: np.ndarray) -> np.ndarray:
    """float64 probabilities from `predict_log_probs` output, rows renormalised to sum to 1."""
    probs = np.exp(np.asarray(log_probs, np.float64))
    return probs / probs.sum(axis=1, keepdims=True)


def nll(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the labels: the test loss of `jaxvgg.train.evaluate`, in float64."""
    log_probs, labels = np.asarray(log_probs), np.asarray(labels)
    if log_probs.ndim != 2 or log_probs.shape[0] != labels.shape[0]:
        raise ValueError(f"log_probs must be (N, C) with N = {labels.shape[0]} labels, got {log_probs.shape}")
    return float(-np.mean(log_probs[np.arange(labels.shape[0]), labels]))


def layer_features(model: nn.Module, variables: Any, inputs: np.ndarray, layer: str | None, *,
                   transform: Callable | None = None, after: Callable | None = None, batch_size: int = 500,
                   quiet: bool = True, desc: str = "features") -> np.ndarray:
    """Evaluation-mode outputs of one layer of ``model`` for every input, in order.

    Args:
      model: a flax module whose layers `models.layer_outputs` names (every registry model).
      variables: ``{"params": ...}`` (and ``"batch_stats"`` for BatchNorm models: evaluation reads them).
      inputs: (N, H, W, C) images (a data set's ``images``) or (N, D) feature vectors.
      layer: torch-style layer name (``classifier_4``, ``features_15``); None: the (transformed) input.
      transform: jittable ``images -> float32`` applied per batch (e.g. normalisation), or None.
      after: jittable function applied to the layer's output (e.g. the ReLU between it and the next layer).
      batch_size: examples per forward pass; the last batch is padded so one compiled program serves all.
      quiet: no progress bar.
      desc: the progress bar's label.

    Returns:
      float32 (N, D); a 4-d (B, H, W, C) output is flattened in torch's (C, H, W) order.
    """
    inputs = np.asarray(inputs)
    if inputs.ndim < 2 or inputs.shape[0] == 0:
        raise ValueError(f"inputs must be a non-empty batch of images or features, got shape {inputs.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    transform = transform or (lambda x: x)
    after = after or (lambda x: x)

    def features(variables, batch):
        x = transform(batch["image"])
        out = x if layer is None else models.layer_outputs(model, variables, x)[1][layer]
        out = after(out).astype(jnp.float32)  # a bfloat16 model's layer outputs are bfloat16
        return torch_flatten(out) if out.ndim == 4 else out

    fn = parallel.compile_step(features, getattr(model, "policy", NATIVE), "infer")
    batch_size = min(batch_size, inputs.shape[0])
    outputs = padded_outputs(fn, variables, data.padded_batches(inputs, batch_size), len(inputs), batch_size)
    chunks = [np.asarray(out)[:real]
              for out, real in tqdm(outputs, total=data.num_batches(len(inputs), batch_size), desc=desc, unit="batch",
                                    disable=quiet, leave=False, dynamic_ncols=True)]
    return np.concatenate(chunks)


def extract_features(model: nn.Module, variables: Any, datasets: Sequence[data.Dataset], layer: str, *,
                     transform: Callable | None = None, batch_size: int = 500,
                     quiet: bool = True) -> list[data.Features]:
    """`layer_features` of several data sets as one stream (one padded batch, one program), as `data.Features`.

    The transfer experiments train a new head on these: a frozen network's evaluation-mode features,
    computed once.
    """
    images = np.concatenate([np.asarray(dataset.images) for dataset in datasets])
    features = layer_features(model, variables, images, layer, transform=transform, batch_size=batch_size,
                              quiet=quiet)
    parts = np.split(features, np.cumsum([len(dataset) for dataset in datasets])[:-1])
    return [data.Features(part, dataset.labels, dataset.class_names) for part, dataset in zip(parts, datasets)]


def penultimate_features(model_name: str, model: nn.Module, variables: Any, images: Any, *,
                         transform: EvalTransform | None = None, batch_size: int = 500) -> np.ndarray:
    """The vector each image feeds into the model's last Linear layer (eval mode).

    Args:
      model_name: a registry name with a known last layer (see ``_PENULTIMATE``).
      model: the flax module (``jaxvgg.create_model(model_name)``).
      variables: ``{"params": ...}`` (and ``"batch_stats"`` for BatchNorm models: evaluation reads them).
      images: (N, H, W, C) images, uint8 when ``transform`` maps them to floats.
      transform: jittable ``images -> float32`` applied per batch (e.g. normalisation), or None.
      batch_size: images per forward pass; the last batch is padded so one compiled shape serves all.

    Returns:
      float32 (N, D), D the in-features of the last Linear (84 for mnist_lenet, 784 for mnist_linear).
    """
    if model_name not in _PENULTIMATE:
        raise ValueError(f"no known last layer for model {model_name!r}; known: {', '.join(sorted(_PENULTIMATE))}")
    layer, after = _PENULTIMATE[model_name]
    return layer_features(model, variables, images, layer, transform=transform, after=after, batch_size=batch_size)
