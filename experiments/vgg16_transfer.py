"""VGG16 transfer learning: ImageNet features frozen, a new 4096-256-n head trained with Adam.

    python -m experiments.vgg16_transfer --data-root DATA --weights vgg16-397923af.pth
    python -m experiments.vgg16_transfer --split-from FLAT --data-root DATA --weights vgg16-397923af.pth
    python -m experiments.vgg16_transfer --data-root DATA --weights vgg16-397923af.pth --cache-features true

--data-root holds train/ valid/ test/, each with one <class>/ folder of images; --split-from first copies
a flat <class>/ folder into that layout, 50/25/25 per class (seeded). --weights is a torchvision VGG16
state_dict (.pth/.pt/.npz); without it torchvision's IMAGENET1K_V1 weights are fetched (online only).

--cache-features: the frozen part is deterministic under the evaluation transform, so the 4096-d output
of classifier.4 is computed once per image and only the head trains, on those features (much faster on a
CPU). Training dropout before the head (classifier.5) is kept, but the features are of the evaluation
view: cached features mean NO training augmentation (crop, rotation, jitter, flip).

Leaves in --workdir: config.json, history.json, checkpoints/ (of the head alone with --cache-features),
history.png, confusion_matrix.png, per_class_vs_count.png, topk_predictions.png, summary.json (test
loss, top-1 and top-k accuracy, per-class accuracy, and with --tta N the same over N augmented views)
and report.md.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from tqdm.auto import tqdm

import jaxvgg
from experiments.common import parse_config, prepare_workdir, run_cli, write_summary
from jaxvgg import augment, data, evaluation, gemm, metrics, models, optim, parallel, plots
from jaxvgg.train import FitConfig, TrainState, fit

MODEL = "vgg16_transfer"
HEAD_PREFIX = "classifier_6"  # the new head; every other layer comes from the pretrained VGG16
FEATURE_LAYER = "classifier_4"  # ReLU after the 2nd Linear: the input of classifier.5 (dropout) and the head
CROP = 224
IMAGENET_WEIGHTS_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision IMAGENET1K_V1


@dataclasses.dataclass(frozen=True)
class Config:
    """VGG16 transfer learning. Defaults: the tutorial's Adam 1e-3, batch 128, early stopping after 5 epochs."""

    data_root: str | None = dataclasses.field(default=None, metadata={
        "help": "folder with train/ valid/ test/ of <class>/ image folders (default with --split-from: WORKDIR/data)"})
    split_from: str | None = dataclasses.field(default=None, metadata={
        "help": "flat <class>/ image folder to split 50/25/25 per class (seeded) into --data-root first"})
    weights: str | None = dataclasses.field(default=None, metadata={
        "help": "torchvision VGG16 state_dict (.pth/.pt/.npz); default: torchvision's IMAGENET1K_V1 (online)"})
    workdir: str = dataclasses.field(default="runs/vgg16_transfer", metadata={"help": "where every output goes"})
    epochs: int = dataclasses.field(default=30, metadata={"help": "most training epochs (early stopping may end sooner)"})
    batch_size: int = dataclasses.field(default=128, metadata={"help": "global batch size"})
    lr: float = dataclasses.field(default=1e-3, metadata={"help": "Adam learning rate (torch default)"})
    patience: int = dataclasses.field(default=5, metadata={
        "help": "stop after this many epochs without a lower validation loss; the best epoch is restored"})
    cache_features: bool = dataclasses.field(default=False, metadata={
        "help": "train the head on cached classifier.4 features (fast on CPU; no training augmentation)"})
    tta: int = dataclasses.field(default=0, metadata={
        "help": "test-time augmentation: also report metrics of probabilities averaged over N augmented views "
                "(each view is a whole-VGG16 pass, with --cache-features too)"})
    load_size: int = dataclasses.field(default=256, metadata={
        "help": "every image is resized to SIZE x SIZE when read (one array needs one size); >= 256"})
    rotation: float = dataclasses.field(default=15.0, metadata={"help": "random rotation range in degrees (+/-)"})
    jitter: float = dataclasses.field(default=0.2, metadata={
        "help": "colour jitter strength for brightness, contrast and saturation (0: off, the tutorial's ColorJitter())"})
    limit: int | None = dataclasses.field(default=None, metadata={
        "help": "use at most N random images of each split (quick runs)"})
    eval_batch_size: int = dataclasses.field(default=32, metadata={
        "help": "images per forward pass of the whole VGG16 (features, evaluation, TTA)"})
    seed: int = dataclasses.field(default=0, metadata={"help": "split, head init, data order, dropout, augmentation"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoint"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no progress bars"})


# --- data -------------------------------------------------------------------------------------------

def load_splits(cfg: Config, workdir: Path) -> dict[str, data.Dataset]:
    """train/valid/test Datasets, after splitting --split-from into the data root when asked."""
    if cfg.data_root is None and cfg.split_from is None:
        raise ValueError("pass --data-root (a folder with train/ valid/ test/) or --split-from (a flat <class>/ folder)")
    root = Path(cfg.data_root) if cfg.data_root is not None else workdir / "data"
    if cfg.split_from is not None:
        if cfg.resume and (root / "train").is_dir():
            print(f"--resume: reusing the split in {root}")
        else:
            counts = data.split_image_folder(cfg.split_from, root, (0.5, 0.25, 0.25), seed=cfg.seed)
            print(f"split {cfg.split_from} into {root}: {counts}")
    if cfg.load_size < 256:
        raise ValueError(f"load_size must be >= 256 (the transforms resize to 256 and crop 224), got {cfg.load_size}")
    splits = {name: data.load_image_folder(root / name, cfg.load_size) for name in data.SPLIT_NAMES}
    names = {name: split.class_names for name, split in splits.items()}
    if len(set(names.values())) != 1:
        raise ValueError(f"train/valid/test of {root} must have the same class folders, got {names}")
    if cfg.limit is not None:
        rng = np.random.default_rng(cfg.seed)  # random, not the first N: image folders are sorted by class
        splits = {name: split.subset(np.sort(rng.permutation(len(split))[:cfg.limit]))
                  for name, split in splits.items()}
    return splits


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureSet:
    """Cached features with labels, shaped like a `data.Dataset` so fit/evaluate/predict take it."""

    images: np.ndarray  # float32 (N, 4096): classifier.4 outputs (named images: fit reads .images)
    labels: np.ndarray  # int32 (N,)
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


# --- transforms -------------------------------------------------------------------------------------

def transforms(rotation: float, jitter: float) -> tuple[Callable, Callable]:
    """(train, eval) transforms of the tutorial, uint8 in, ImageNet-normalised float32 (B, 224, 224, 3) out.

    train: RandomResizedCrop(256, scale=(0.8, 1)) -> RandomRotation -> ColorJitter -> RandomHorizontalFlip
    -> CenterCrop(224); eval: Resize(256) -> CenterCrop(224).
    """
    mean, std = augment.IMAGENET_MEAN, augment.IMAGENET_STD

    def train_tf(key, images):
        k_crop, k_rotate, k_jitter, k_flip = jax.random.split(key, 4)
        x = augment.random_resized_crop(k_crop, images, 256, scale=(0.8, 1.0)) / 255.0  # float in [0, 1]
        x = augment.random_rotation(k_rotate, x, float(rotation))
        x = augment.color_jitter(k_jitter, x, brightness=jitter, contrast=jitter, saturation=jitter)
        x = augment.random_flip(k_flip, x)
        return augment.normalize(augment.center_crop(x, CROP), mean, std)

    def eval_tf(images):
        return augment.normalize(augment.resize_center_crop(images, resize=256, crop=CROP) / 255.0, mean, std)

    return train_tf, eval_tf


# --- weights ----------------------------------------------------------------------------------------

def pretrained_state_dict(path: str | None, quiet: bool = False) -> dict[str, np.ndarray]:
    """The VGG16 state_dict at ``path``, else torchvision's ImageNet weights (needs torchvision and internet)."""
    if path is not None:
        return jaxvgg.load_torch_state_dict(path)
    try:
        from torchvision.models import VGG16_Weights
    except ImportError as err:
        raise FileNotFoundError("no --weights given, and torchvision is not installed to fetch its ImageNet VGG16 "
                                f"weights: download {IMAGENET_WEIGHTS_URL} and pass --weights PATH") from err
    try:  # the state_dict of torchvision.models.vgg16(weights="IMAGENET1K_V1"), without building the model
        state_dict = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=not quiet)
    except Exception as err:  # offline: URLError, OSError, RuntimeError from torch.hub
        raise FileNotFoundError(f"no --weights given, and torchvision could not fetch its ImageNet VGG16 weights "
                                f"({type(err).__name__}: {err}); download {IMAGENET_WEIGHTS_URL} where there is "
                                "internet and pass --weights PATH") from err
    return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def transplant_backbone(pretrained: dict, fresh: dict) -> dict:
    """``fresh`` vgg16_transfer params with every layer except the head replaced by the pretrained VGG16's.

    Checks that both hold the same non-head layers with the same shapes, naming what differs.
    """
    wanted = {layer for layer in fresh if not layer.startswith(HEAD_PREFIX)}
    given = {layer for layer in pretrained if not layer.startswith(HEAD_PREFIX)}
    problems = [f"missing layer {layer!r}" for layer in sorted(wanted - given)]
    problems += [f"unexpected layer {layer!r}" for layer in sorted(given - wanted)]
    for layer in sorted(wanted & given):
        for leaf, value in fresh[layer].items():
            found = np.shape(pretrained[layer].get(leaf))
            if found != np.shape(value):
                problems.append(f"{layer}/{leaf}: expected shape {np.shape(value)}, found {found}")
    if problems:
        raise ValueError("pretrained VGG16 does not fit vgg16_transfer:\n  " + "\n  ".join(problems))
    return {**fresh, **{layer: pretrained[layer] for layer in wanted}}


def count_trainable(params: Any) -> int:
    """Scalars in the layers vgg16_transfer trains (the head)."""
    mask = jaxvgg.trainable_mask(MODEL, params)
    return int(sum(np.size(p) for p, trains in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(mask)) if trains))


# --- the head on cached features --------------------------------------------------------------------

class TransferHead(nn.Module):
    """vgg16_transfer above classifier.4: Dropout(0.5) -> Linear(4096, 256) -> ReLU -> Dropout(0.4) -> Linear(256, n)
    -> log_softmax. Its params are exactly classifier_6_0 / classifier_6_3, so they drop back into the full model.

    The first dropout is the frozen model's classifier.5: the tutorial trains in train mode, where it is active.
    """

    num_classes: int
    width: int = 256
    dropout_rate: float = 0.4
    features_dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Dropout(self.features_dropout_rate, deterministic=not train, name="classifier_5")(x)
        dense = partial(nn.Dense, dot_general=gemm.dot_general)  # MKL's products where built (jaxvgg.gemm)
        x = nn.relu(dense(self.width, name=f"{HEAD_PREFIX}_0")(x))
        x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"{HEAD_PREFIX}_2")(x)
        return nn.log_softmax(dense(self.num_classes, name=f"{HEAD_PREFIX}_3")(x), axis=-1)


def _features_as_they_are(features: jax.Array) -> jax.Array:
    """Evaluation transform of cached features: none."""
    return features


def _features_as_they_are_train(key: jax.Array, features: jax.Array) -> jax.Array:
    """Training transform of cached features: none (they are of the evaluation view)."""
    del key
    return features


def _batched(images: np.ndarray, batch_size: int):
    """(padded batch, number of real images) over ``images`` in order; every batch has ``batch_size`` rows."""
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        padded = parallel.pad_batch({"image": chunk, "label": np.zeros(len(chunk), np.int32)}, batch_size)
        yield padded["image"], len(chunk)


def extract_features(model: nn.Module, params: Any, datasets: list[data.Dataset], eval_tf: Callable,
                     batch_size: int, quiet: bool, layer: str = FEATURE_LAYER,
                     model_name: str | None = None) -> list[FeatureSet]:
    """``layer``'s outputs (eval mode; default classifier.4) of every image of each data set, through the frozen VGG.

    Outputs of a conv-stack layer are flattened in torch's (C, H, W) order. The data sets go through as
    one stream, so only its last batch is padded and one program is compiled, with the XLA options of
    ``model_name``'s inference (`jaxvgg.models.resolve_compiler_options`).
    """
    images = np.concatenate([dataset.images for dataset in datasets])
    batch_size = min(batch_size, len(images))

    def features(p, x):
        out = models.layer_outputs(model, {"params": p}, eval_tf(x))[1][layer]
        return models.torch_flatten(out) if out.ndim == 4 else out

    fn = jax.jit(features, compiler_options=models.resolve_compiler_options(model_name, "infer"))
    chunks = [np.asarray(fn(params, batch))[:n]
              for batch, n in tqdm(_batched(images, batch_size), total=-(-len(images) // batch_size),
                                   desc="features", unit="batch", disable=quiet, leave=False)]
    features = np.split(np.concatenate(chunks), np.cumsum([len(d) for d in datasets])[:-1])
    return [FeatureSet(f, d.labels, d.class_names) for f, d in zip(features, datasets)]


def tta_probabilities(model: nn.Module, params: Any, dataset: data.Dataset, train_tf: Callable, views: int,
                      seed: int, batch_size: int, quiet: bool) -> np.ndarray:
    """Class probabilities averaged over ``views`` training-transform views of every image (float64)."""
    fn = jax.jit(lambda p, key, images: model.apply({"params": p}, train_tf(key, images)))
    total = np.zeros((len(dataset), dataset.num_classes))
    for view in tqdm(range(views), desc="TTA", unit="view", disable=quiet, leave=False):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), view)
        parts = [np.asarray(fn(params, jax.random.fold_in(key, i), images), np.float64)[:n]
                 for i, (images, n) in enumerate(_batched(dataset.images, batch_size))]
        probs = np.exp(np.concatenate(parts))
        total += probs / probs.sum(axis=1, keepdims=True)
    return total / views


def tta_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean NLL of averaged probabilities (floored at the smallest float64, so a 0 stays finite)."""
    return evaluation.nll(np.log(np.maximum(probs, np.finfo(np.float64).tiny)), labels)


# --- main -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__)
    if cfg.tta < 0:
        raise ValueError(f"tta must be >= 0 views, got {cfg.tta}")
    workdir = prepare_workdir(cfg.workdir, cfg, cfg.resume)
    started = time.perf_counter()

    state_dict = pretrained_state_dict(cfg.weights, cfg.quiet)  # first: a missing file fails before any work
    splits = load_splits(cfg, workdir)
    train, val, test = splits["train"], splits["valid"], splits["test"]
    class_names, num_classes = train.class_names, train.num_classes
    print(f"{num_classes} classes: {len(train)} train, {len(val)} validation, {len(test)} test images; "
          f"{jax.device_count()} {jax.default_backend()} device(s)")

    key_init, key_train = jax.random.split(jax.random.PRNGKey(cfg.seed))
    model = jaxvgg.create_model(MODEL, num_classes)
    fresh = jaxvgg.init_params(MODEL, key_init, num_classes)["params"]
    pretrained = jaxvgg.from_torch("vgg16_torchvision", state_dict)["params"]
    params = transplant_backbone(pretrained, fresh)
    del state_dict, pretrained, fresh
    total, trainable = jaxvgg.count_params(params), count_trainable(params)
    print(f"VGG16 transfer, {num_classes} classes: {total:,} parameters, {trainable:,} trainable "
          f"({total - trainable:,} frozen)")

    train_tf, eval_tf = transforms(cfg.rotation, cfg.jitter)
    fit_cfg = FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, workdir=str(workdir),
                        resume=cfg.resume, early_stopping_patience=cfg.patience, keep_checkpoints=1,
                        quiet=cfg.quiet)
    if cfg.cache_features:
        t0 = time.perf_counter()
        train_x, val_x, test_x = extract_features(model, params, [train, val, test], eval_tf, cfg.eval_batch_size,
                                                  cfg.quiet, model_name=MODEL)
        print(f"cached {FEATURE_LAYER} features of {len(train) + len(val) + len(test)} images "
              f"in {time.perf_counter() - t0:.0f} s")
        width, rate = models.vgg16_transfer.keywords["transfer_head"]
        head = TransferHead(num_classes, width, rate)
        head_params = {k: v for k, v in params.items() if k.startswith(HEAD_PREFIX)}  # the model's fresh init
        state = TrainState.create(apply_fn=head.apply, params=head_params, tx=optim.adam(cfg.lr), rng=key_train,
                                  log_probs=True, model=models.TRANSFER_HEAD)
        state, history = fit(state, train_x, val_x, dataclasses.replace(fit_cfg, eval_batch_size=500),
                             train_transform=_features_as_they_are_train, eval_transform=_features_as_they_are)
        params = {**params, **state.params}  # the trained head back into the full model
        log_probs = evaluation.predict_log_probs(state, test_x, _features_as_they_are)
    else:
        tx = optim.create_optimizer("adam", cfg.lr, trainable=jaxvgg.trainable_mask(MODEL, params))
        state = TrainState.for_model(MODEL, model, params, tx, rng=key_train)  # log_softmax outputs: NLL loss
        state, history = fit(state, train, val, dataclasses.replace(fit_cfg, eval_batch_size=cfg.eval_batch_size),
                             train_transform=train_tf, eval_transform=eval_tf)
        params = state.params
        log_probs = evaluation.predict_log_probs(state, test, eval_tf, batch_size=cfg.eval_batch_size)
    train_time = time.perf_counter() - started

    probs = evaluation.probs_from_log_probs(log_probs)
    k = min(5, num_classes)
    test_loss = evaluation.nll(log_probs, test.labels)
    scores = metrics.summarize_classification(test.labels, probs, class_names)
    summary = {"test_accuracy": scores["accuracy"], "test_loss": test_loss,
               "top5_accuracy": metrics.topk_accuracy(test.labels, probs, k), "top_k": k,
               "epochs": len(history["epoch"]["epoch"]), "wall_time_s": train_time,
               "parameters": total, "trainable_parameters": trainable, "cached_features": cfg.cache_features}
    if cfg.tta:
        tta_probs = tta_probabilities(model, params, test, train_tf, cfg.tta, cfg.seed, cfg.eval_batch_size, cfg.quiet)
        summary.update(tta_views=cfg.tta, tta_accuracy=metrics.accuracy(test.labels, tta_probs.argmax(axis=1)),
                       tta_top5_accuracy=metrics.topk_accuracy(test.labels, tta_probs, k),
                       tta_loss=tta_nll(tta_probs, test.labels))
    summary.update(scores)

    preds = probs.argmax(axis=1)
    per_class = metrics.per_class_accuracy(test.labels, preds, num_classes)
    train_counts = np.bincount(train.labels, minlength=num_classes)
    shown = np.sort(np.random.default_rng(cfg.seed).permutation(len(test))[:8])
    ranking = metrics.topk_ranking(probs[shown], k)
    figures = [
        plots.plot_history(history, workdir / "history.png", label=f"VGG16 transfer, {num_classes} classes"),
        plots.plot_confusion_matrix(np.asarray(scores["confusion_matrix"]), class_names,
                                    workdir / "confusion_matrix.png"),
        plots.plot_per_class_vs_count(per_class, train_counts, class_names, workdir / "per_class_vs_count.png"),
        plots.plot_topk_predictions(test.images[shown], ranking, np.take_along_axis(probs[shown], ranking, axis=1),
                                    test.labels[shown], class_names, workdir / "topk_predictions.png"),
    ]
    write_summary(workdir, summary)
    notes = ("Features were cached: the head trained on evaluation-view features, without training augmentation."
             if cfg.cache_features else "")
    plots.write_report(workdir, f"VGG16 transfer learning ({num_classes} classes)", summary, figures, extra_md=notes)
    print(f"test accuracy {summary['test_accuracy']:.4f}, top-{k} {summary['top5_accuracy']:.4f}, "
          f"test loss {test_loss:.4f}"
          + (f"; with {cfg.tta}-view TTA {summary['tta_accuracy']:.4f}" if cfg.tta else "")
          + f"; outputs in {workdir}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
