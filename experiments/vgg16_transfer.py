"""VGG16 transfer learning: ImageNet features frozen, a new 4096-256-n head trained with Adam.

    python -m experiments.vgg16_transfer --data-root DATA --weights vgg16-397923af.pth
    python -m experiments.vgg16_transfer --split-from FLAT --data-root DATA --weights vgg16-397923af.pth
    python -m experiments.vgg16_transfer --data-root DATA --weights vgg16-397923af.pth --cache-features true

--data-root holds train/ valid/ test/, each with one <class>/ folder of images; --split-from first copies
a flat <class>/ folder into that layout, 50/25/25 per class (seeded). --weights is a torchvision VGG
state_dict (.pth/.pt/.npz) of --arch (vgg16, the tutorial's, or any of torchvision's eight: vgg11 ...
vgg19_bn); without it torchvision's IMAGENET1K_V1 weights of --arch are fetched (online only). The
frozen BatchNorm layers of a *_bn backbone normalise with their ImageNet running statistics.

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
from experiments.common import (ConfigError, check_batch_size, default_policy, fit_config, parse_config,
                                policy_record, precision_field, prepare_workdir, run_cli)
from jaxvgg import augment, data, distributed, evaluation, metrics, optim, parallel, plots
from jaxvgg.input_pipeline import ImageFolderStream
from jaxvgg.models import TRANSFER_PREFIX, VGG_ARCHS, transfer_arch
from jaxvgg.report import Predictions, evaluate_and_report
from jaxvgg.train import TrainState, fit

MODEL = "vgg16_transfer"
HEAD_MODEL = "transfer_head"  # the new head alone, trained on cached features
FEATURE_LAYER = "classifier_4"  # ReLU after the 2nd Linear: the input of classifier.5 (dropout) and the head
CROP = 224
RESIZE = 256  # the transforms' Resize / RandomResizedCrop size, then CenterCrop(CROP); valid/ is read at it
IMAGENET_WEIGHTS_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"  # torchvision IMAGENET1K_V1


@dataclasses.dataclass(frozen=True)
class Config:
    """VGG16 transfer learning. Defaults: the tutorial's Adam 1e-3, batch 128, early stopping after 5 epochs."""

    data_root: str | None = dataclasses.field(default=None, metadata={
        "help": "folder with train/ valid/ test/ of <class>/ image folders (default with --split-from: WORKDIR/data)"})
    split_from: str | None = dataclasses.field(default=None, metadata={
        "help": "flat <class>/ image folder to split 50/25/25 per class (seeded) into --data-root first"})
    weights: str | None = dataclasses.field(default=None, metadata={
        "help": "torchvision state_dict of --arch (.pth/.pt/.npz); default: torchvision's IMAGENET1K_V1 (online)"})
    arch: str = dataclasses.field(default="vgg16", metadata={
        "help": "the torchvision VGG whose features transfer (the tutorial's vgg16)", "choices": list(VGG_ARCHS)})
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
        "help": "every image is resized to SIZE x SIZE when read (one array needs one size); >= 256",
        "check": lambda v: None if v >= 256 else "must be >= 256 (the transforms resize to 256 and crop 224)"})
    rotation: float = dataclasses.field(default=15.0, metadata={
        "help": "random rotation range in degrees (+/-)",
        "check": lambda v: None if 0 <= v <= 180 else "must be in [0, 180]"})
    jitter: float = dataclasses.field(default=0.2, metadata={
        "help": "colour jitter strength for brightness, contrast and saturation (0: off, the tutorial's ColorJitter())",
        "check": lambda v: None if 0 <= v <= 1 else "must be in [0, 1]"})
    limit: int | None = dataclasses.field(default=None, metadata={
        "help": "use at most N random images of each split (quick runs)"})
    workers: int = dataclasses.field(default=0, metadata={
        "help": "grain worker processes decoding train/ and valid/ (streamed from disk unless --cache-features; "
                "0: reader threads of this process)", "check": lambda v: None if v >= 0 else "must be >= 0"})
    eval_batch_size: int = dataclasses.field(default=32, metadata={
        "help": "images per forward pass of the whole VGG16 (features, evaluation, TTA)"})
    precision: str = precision_field()
    seed: int = dataclasses.field(default=0, metadata={"help": "split, head init, data order, dropout, augmentation"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoint"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no progress bars"})

    def check(self) -> None:
        if self.data_root is None and self.split_from is None:
            raise ConfigError("data_root", "pass --data-root (a folder with train/ valid/ test/) or --split-from "
                                           "(a flat <class>/ folder)", None)


# --- data -------------------------------------------------------------------------------------------

def load_image_splits(cfg: Config, workdir: Path) -> dict[str, Any]:
    """train/valid/test, after splitting --split-from into the data root when asked.

    Without --cache-features, train/ and valid/ stream from disk (`jaxvgg.input_pipeline.ImageFolderStream`:
    decoded and resized in grain's readers, each process reading its rows; valid/ decoded at 256 and
    center-cropped to 224 there, so the device only normalises it); test/ is read into memory for the
    report's figures and TTA. With it, all three are arrays (their features are computed once).
    """
    root = Path(cfg.data_root) if cfg.data_root is not None else workdir / "data"
    if cfg.split_from is not None:
        if cfg.resume and (root / "train").is_dir():
            print(f"--resume: reusing the split in {root}")
        else:
            if distributed.is_main_process():  # one process writes the split, the others wait for it
                counts = data.split_image_folder(cfg.split_from, root, (0.5, 0.25, 0.25), seed=cfg.seed)
                print(f"split {cfg.split_from} into {root}: {counts}")
            distributed.sync("vgg16_transfer: split written")
    if cfg.cache_features:
        splits = {name: data.load_image_folder(root / name, cfg.load_size) for name in data.SPLIT_NAMES}
    else:  # valid/: the evaluation transform's Resize(256) + CenterCrop(224) in grain's readers
        splits = {"train": ImageFolderStream(root / "train", cfg.load_size, workers=cfg.workers),
                  "valid": ImageFolderStream(root / "valid", RESIZE, crop=CROP, workers=cfg.workers),
                  "test": data.load_image_folder(root / "test", cfg.load_size)}
    names = {name: split.class_names for name, split in splits.items()}
    if len(set(names.values())) != 1:
        raise ValueError(f"train/valid/test of {root} must have the same class folders, got {names}")
    if cfg.limit is not None:
        rng = np.random.default_rng(cfg.seed)  # random, not the first N: image folders are sorted by class
        splits = {name: split.subset(np.sort(rng.permutation(len(split))[:cfg.limit]))
                  for name, split in splits.items()}
    return splits


# --- transforms -------------------------------------------------------------------------------------

def transforms(rotation: float, jitter: float) -> tuple[Callable, Callable]:
    """(train, eval) transforms of the tutorial: `jaxvgg.augment.transfer_transforms`, 256 then 224."""
    return augment.transfer_transforms(rotation, jitter, CROP, RESIZE)


def cropped_eval(images):
    """The evaluation transform of images the stream already resized and cropped: normalisation only."""
    return augment.normalize(images, augment.IMAGENET_MEAN, augment.IMAGENET_STD)


# --- weights ----------------------------------------------------------------------------------------

def pretrained_state_dict(path: str | None, quiet: bool = False, arch: str = "vgg16") -> dict[str, np.ndarray]:
    """The state_dict at ``path``, else torchvision's ImageNet weights of ``arch`` (needs torchvision and internet)."""
    if path is not None:
        return jaxvgg.load_torch_state_dict(path)
    url = IMAGENET_WEIGHTS_URL if arch == "vgg16" else f"torchvision's {arch} IMAGENET1K_V1 weights"
    try:
        from torchvision.models import get_model_weights
    except ImportError as err:
        raise FileNotFoundError(f"no --weights given, and torchvision is not installed to fetch its ImageNet {arch} "
                                f"weights: download {url} and pass --weights PATH") from err
    weights = get_model_weights(arch).IMAGENET1K_V1
    url = weights.url
    try:  # the state_dict of torchvision.models.<arch>(weights="IMAGENET1K_V1"), without building the model
        state_dict = weights.get_state_dict(progress=not quiet)
    except Exception as err:  # offline: URLError, OSError, RuntimeError from torch.hub
        raise FileNotFoundError(f"no --weights given, and torchvision could not fetch its ImageNet {arch} weights "
                                f"({type(err).__name__}: {err}); download {url} where there is "
                                "internet and pass --weights PATH") from err
    return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def count_trainable(params: Any) -> int:
    """Scalars in the layers vgg16_transfer trains (the head)."""
    mask = jaxvgg.trainable_mask(MODEL, params)
    return int(sum(np.size(p) for p, trains in zip(jax.tree_util.tree_leaves(params),
                                                    jax.tree_util.tree_leaves(mask)) if trains))


# --- test-time augmentation -----------------------------------------------------------------------

def tta_probabilities(model: nn.Module, variables: Any, dataset: data.Dataset, train_tf: Callable, views: int,
                      seed: int, batch_size: int, quiet: bool) -> np.ndarray:
    """Class probabilities averaged over ``views`` training-transform views of every image (float64).

    ``variables``: the model's ``{"params": ...}`` (and ``"batch_stats"``), or its bare params."""
    variables = variables if "params" in variables else {"params": variables}
    fn = parallel.compile_step(lambda v, key, images: model.apply(v, train_tf(key, images)),
                               model.policy, "infer")
    total = np.zeros((len(dataset), dataset.num_classes))
    for view in tqdm(range(views), desc="TTA", unit="view", disable=quiet, leave=False):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), view)
        parts = [np.asarray(fn(variables, jax.random.fold_in(key, i), batch["image"]),
                            np.float64)[:int(batch["mask"].sum())]
                 for i, batch in enumerate(data.padded_batches(dataset.images, batch_size))]
        probs = np.exp(np.concatenate(parts))
        total += probs / probs.sum(axis=1, keepdims=True)
    return total / views


def tta_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean NLL of averaged probabilities (floored at the smallest float64, so a 0 stays finite)."""
    return evaluation.nll(np.log(np.maximum(probs, np.finfo(np.float64).tiny)), labels)


# --- the model and its training -------------------------------------------------------------------

def transfer_variables(cfg: Config, state_dict: dict, num_classes: int, key: jax.Array) -> tuple[dict, dict]:
    """(params, {"batch_stats": ...} or {}): the pretrained --arch layers with a fresh head for ``num_classes``."""
    fresh = jaxvgg.init_params(MODEL, key, num_classes, **transfer_arch(cfg.arch))["params"]
    try:
        pretrained = jaxvgg.from_torch(f"{cfg.arch}_torchvision", state_dict)
    except ValueError as err:  # one line: the first problem and how many more
        problems = str(err).splitlines()[1:]
        more = f", and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise ConfigError("weights", f"not a torchvision {cfg.arch} state_dict (see --arch): "
                                     f"{problems[0].strip() if problems else err}{more}", cfg.weights) from None
    params = jaxvgg.transplant(pretrained["params"], fresh, keep=(TRANSFER_PREFIX,))  # every layer but the new head
    stats = {"batch_stats": pretrained["batch_stats"]} if "batch_stats" in pretrained else {}  # frozen: eval mode
    return params, stats


def train_head_on_features(cfg: Config, model: nn.Module, variables: dict, splits: dict, workdir: Path,
                           key: jax.Array) -> tuple[TrainState, dict, data.Features]:
    """--cache-features: the head alone, trained on the frozen layers' features, computed once.

    Returns the trained head's state, its history and the test set's features."""
    t0 = time.perf_counter()
    eval_tf = transforms(cfg.rotation, cfg.jitter)[1]
    train_x, val_x, test_x = evaluation.extract_features(model, variables, [splits[n] for n in data.SPLIT_NAMES],
                                                         FEATURE_LAYER, transform=eval_tf,
                                                         batch_size=cfg.eval_batch_size, quiet=cfg.quiet)
    print(f"cached {FEATURE_LAYER} features of {sum(map(len, splits.values()))} images "
          f"in {time.perf_counter() - t0:.0f} s")
    head = jaxvgg.create_model(HEAD_MODEL, train_x.num_classes, policy=default_policy(HEAD_MODEL, cfg.precision))
    head_params = {k: v for k, v in variables["params"].items() if k.startswith(TRANSFER_PREFIX)}  # the fresh init
    state = TrainState.for_model(HEAD_MODEL, head, head_params, optim.adam(cfg.lr), rng=key)
    state, history = fit(state, train_x, val_x, fit_config(cfg, workdir, early_stopping_patience=cfg.patience,
                                                           keep_checkpoints=1, eval_batch_size=500),
                         train_transform=augment.unchanged_train, eval_transform=augment.unchanged)
    return state, history, test_x


def train_whole_model(cfg: Config, model: nn.Module, variables: dict, splits: dict, workdir: Path,
                      key: jax.Array) -> tuple[TrainState, dict]:
    """The whole network on augmented images, its frozen layers masked out of Adam's updates."""
    tx = optim.create_optimizer("adam", cfg.lr, trainable=jaxvgg.trainable_mask(MODEL, variables["params"]))
    state = TrainState.for_model(MODEL, model, variables, tx, rng=key)  # NLL loss
    return fit(state, splits["train"], splits["valid"], fit_config(cfg, workdir, early_stopping_patience=cfg.patience,
                                                                   keep_checkpoints=1),
               train_transform=transforms(cfg.rotation, cfg.jitter)[0], eval_transform=cropped_eval)  # valid: cropped


def topk_tta_and_figures(predictions: Predictions, cfg: Config, model: nn.Module, variables: dict, splits: dict,
                         workdir: Path) -> tuple[dict, list[Path]]:
    """Top-k (k = min(5, classes)), with --tta the same over augmented views, and the per-class and top-k figures."""
    test, labels, probs, names = splits["test"], predictions.labels, predictions.probs, predictions.class_names
    k = min(5, len(names))
    entries = {"top_k_accuracy": metrics.topk_accuracy(labels, probs, k), "top_k": k}
    if cfg.tta:
        tta_probs = tta_probabilities(model, variables, test, transforms(cfg.rotation, cfg.jitter)[0], cfg.tta,
                                      cfg.seed, cfg.eval_batch_size, cfg.quiet)
        entries.update(tta_views=cfg.tta, tta_accuracy=metrics.accuracy(labels, tta_probs.argmax(axis=1)),
                       tta_top_k_accuracy=metrics.topk_accuracy(labels, tta_probs, k),
                       tta_loss=tta_nll(tta_probs, labels))
    per_class = metrics.per_class_accuracy(labels, predictions.predicted, len(names))
    train_counts = np.bincount(splits["train"].labels, minlength=len(names))
    shown = np.sort(np.random.default_rng(cfg.seed).permutation(len(test))[:8])
    ranking = metrics.topk_ranking(probs[shown], k)
    return entries, [
        plots.plot_per_class_vs_count(per_class, train_counts, names, workdir / "per_class_vs_count.png"),
        plots.plot_topk_predictions(test.images[shown], ranking, np.take_along_axis(probs[shown], ranking, axis=1),
                                    labels[shown], names, workdir / "topk_predictions.png")]


# --- main -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__, launch=True)
    policy = default_policy(MODEL, cfg.precision)
    workdir = prepare_workdir(cfg.workdir, cfg, cfg.resume, policy_record(policy))
    started = time.perf_counter()
    state_dict = pretrained_state_dict(cfg.weights, cfg.quiet, cfg.arch)  # first: a missing file fails before work
    splits = load_image_splits(cfg, workdir)
    train, num_classes = splits["train"], splits["train"].num_classes
    check_batch_size(cfg.batch_size, train)
    print(f"{num_classes} classes: {len(train)} train, {len(splits['valid'])} validation, {len(splits['test'])} "
          f"test images; {jax.device_count()} {jax.default_backend()} device(s)")
    key_init, key_train = jax.random.split(jax.random.PRNGKey(cfg.seed))
    model = jaxvgg.create_model(MODEL, num_classes, policy=policy, **transfer_arch(cfg.arch))
    params, stats = transfer_variables(cfg, state_dict, num_classes, key_init)
    del state_dict  # half a GB of float32 for VGG16
    total, trainable = jaxvgg.count_params(params), count_trainable(params)
    print(f"{cfg.arch.upper()} transfer, {num_classes} classes: {total:,} parameters, {trainable:,} trainable "
          f"({total - trainable:,} frozen)")
    if cfg.cache_features:  # the test set is scored on its features, then the trained head goes back in the model
        state, history, test_x = train_head_on_features(cfg, model, {"params": params, **stats}, splits, workdir,
                                                        key_train)
        params, scored = {**params, **state.params}, (test_x, augment.unchanged, 500)
    else:
        state, history = train_whole_model(cfg, model, {"params": params, **stats}, splits, workdir, key_train)
        params, scored = state.params, (splits["test"], transforms(cfg.rotation, cfg.jitter)[1], cfg.eval_batch_size)
    run = {"train_time_s": time.perf_counter() - started, "arch": cfg.arch, "parameters": total,
           "trainable_parameters": trainable, "cached_features": cfg.cache_features, **policy_record(policy)}
    notes = ("Features were cached: the head trained on evaluation-view features, without training augmentation."
             if cfg.cache_features else "")
    extra = partial(topk_tta_and_figures, cfg=cfg, model=model, variables={"params": params, **stats}, splits=splits,
                    workdir=workdir)
    summary = evaluate_and_report(state, *scored[:2], workdir, history, batch_size=scored[2], summary=run,
                                  title=f"{cfg.arch.upper()} transfer learning ({num_classes} classes)",
                                  history_label=f"{cfg.arch.upper()} transfer, {num_classes} classes", extra=extra,
                                  extra_md=notes, started=started)
    if summary:
        tta = f"; with {cfg.tta}-view TTA {summary['tta_accuracy']:.4f}" if cfg.tta else ""
        print(f"test accuracy {summary['test_accuracy']:.4f}, top-{summary['top_k']} {summary['top_k_accuracy']:.4f}, "
              f"test loss {summary['test_loss']:.4f}{tta}; outputs in {workdir}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
