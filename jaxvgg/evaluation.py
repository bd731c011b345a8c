"""Model-side evaluation glue: test-set probabilities and the features a t-SNE plot needs.

`jaxvgg.metrics` works on numpy arrays only; this module runs the network to produce them:

    log_probs = predict_log_probs(state, test, eval_tf)            # float64 (N, C), rows logsumexp to 0
    probs = predict_probs(state, test, eval_tf)                    # float64 (N, C), rows sum to 1
    feats = penultimate_features("mnist_lenet", model, {"params": state.params}, test.images[:2000],
                                 transform=eval_tf)                # (2000, 84): the input of fc3
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvgg import models
from jaxvgg.train import EvalTransform, TrainState, predict

# The input of each registry model's last Linear layer: (captured layer whose output it is, or None for
# the network's input, and the function between that output and the last Linear).
_PENULTIMATE: dict[str, tuple[str | None, Callable[[jax.Array], jax.Array]]] = {
    "mnist_linear": (None, models.torch_flatten),  # the only layer reads the flattened image
    "mnist_lenet": ("fc2", nn.relu),  # fc3(relu(fc2(x)))
    "cifar_cnn": ("fc2", nn.relu),
    # VGG: classifier_6 reads the output of the Dropout classifier_5 (the identity in eval mode)
    "vgg11": ("classifier_5", lambda x: x),
    "vgg11_torchvision": ("classifier_5", lambda x: x),
    "vgg16_torchvision": ("classifier_5", lambda x: x),
    "vgg16_transfer": ("classifier_6_2", lambda x: x),  # the new head's last Linear is classifier_6_3
}


def predict_log_probs(state: TrainState, dataset: Any, eval_transform: EvalTransform,
                      batch_size: int = 500) -> np.ndarray:
    """Normalised log-probabilities of every example, in float64.

    Args:
      state: a trained `TrainState` (logit or log-prob outputs, either works).
      dataset: `jaxvgg.data.Dataset` of uint8 images.
      eval_transform: jittable ``uint8 images -> float32``.
      batch_size: examples per forward pass.

    Returns:
      float64 (N, C): ``log_softmax`` of the outputs computed in float64, so each row's ``exp`` sums to 1
      to float64 precision (a log_softmax output is renormalised, which changes it by float32 rounding only).
    """
    outputs = np.asarray(predict(state, dataset, eval_transform, batch_size), np.float64)
    shifted = outputs - outputs.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def predict_probs(state: TrainState, dataset: Any, eval_transform: EvalTransform,
                  batch_size: int = 500) -> np.ndarray:
    """Probabilities of every example: float64 (N, C), rows summing to 1 (see `predict_log_probs`)."""
    return probs_from_log_probs(predict_log_probs(state, dataset, eval_transform, batch_size))


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


def penultimate_features(model_name: str, model: nn.Module, variables: Any, images: Any, *,
                         transform: EvalTransform | None = None, batch_size: int = 500) -> np.ndarray:
    """The vector each image feeds into the model's last Linear layer (eval mode).

    Args:
      model_name: a registry name with a known last layer (see ``_PENULTIMATE``).
      model: the flax module (``jaxvgg.create_model(model_name)``).
      variables: ``{"params": ...}``.
      images: (N, H, W, C) images, uint8 when ``transform`` maps them to floats.
      transform: jittable ``images -> float32`` applied per batch (e.g. normalisation), or None.
      batch_size: images per forward pass; the last batch is padded so one compiled shape serves all.

    Returns:
      float32 (N, D), D the in-features of the last Linear (84 for mnist_lenet, 784 for mnist_linear).
    """
    if model_name not in _PENULTIMATE:
        raise ValueError(f"no known last layer for model {model_name!r}; known: {', '.join(sorted(_PENULTIMATE))}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layer, after = _PENULTIMATE[model_name]
    transform = transform or (lambda x: x)

    @partial(jax.jit, compiler_options=models.resolve_compiler_options(model_name, "infer"))
    def features(variables, batch):
        x = transform(batch)
        if layer is None:
            return after(x)
        _, acts = models.layer_outputs(model, variables, x)
        return after(acts[layer])

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) batch, got shape {images.shape}")
    batch_size = min(batch_size, images.shape[0])
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - chunk.shape[0]  # repeat the last image so the shape stays compiled
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)]) if pad else chunk
        chunks.append(np.asarray(features(variables, jnp.asarray(padded)))[: chunk.shape[0]])
    return np.concatenate(chunks)
