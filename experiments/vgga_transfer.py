"""Transfer learning from our own VGG-A: CIFAR-10 features, frozen, with a new head trained on MNIST.

    python -m experiments.vgga_transfer --backbone runs/cifar_vgg --data-dir ../shared/data/mnist

The backbone is the best checkpoint (highest validation accuracy) of an `experiments.cifar_vgg` run at
32x32. Its convolutional features and first two Linear layers are frozen; the output of
classifier.4 (the ReLU after the second Linear, 4096-d; ``--layer`` picks another) of every image is
computed once, in evaluation mode, and the transfer tutorial's new head (the registry model
``transfer_head``: Dropout(0.5) -> Linear(4096, 256) -> ReLU -> Dropout(0.4) -> Linear(256, 10) ->
LogSoftmax, torch's default init) trains on those cached features with Adam and early stopping on the
validation loss, exactly as `experiments.vgg16_transfer --cache-features` trains its head. MNIST
digits are resized to 32x32 and repeated over three channels, then normalised with CIFAR-10's
statistics, as the backbone saw its training images.

Which layer transfers: classifier.4 is the tutorial's choice, but in a network trained on CIFAR-10's ten
classes it has become a CIFAR-10 class detector; the conv stack's outputs (``--layer features_20``, the
last max-pool, 512-d, or ``features_15``, block 4's pool, 2x2x512 = 2,048-d) keep more of the generic
edges and strokes a digit is made of. The head takes whatever width the layer has.

Leaves in --workdir: config.json, history.json, checkpoints/ (of the head), history.png,
confusion_matrix.png, summary.json (test accuracy/loss, top-5, backbone epoch and its CIFAR-10 val
accuracy) and report.md.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

import jaxvgg
from experiments.common import (ConfigError, check_batch_size, default_policy, fit_config, load_splits, parse_config,
                                policy_record, precision_field, prepare_workdir, run_cli)
from jaxvgg import augment, data, evaluation, optim
from jaxvgg.checkpoint import Checkpoints
from jaxvgg.models import TRANSFER_PREFIX
from jaxvgg.report import evaluate_and_report
from jaxvgg.train import TrainState, fit

# VGG-A's layers a head can sit on (flax names: features_15 = torch's features.15)
BACKBONE_MODEL = "vgg11"  # VGG-A, as experiments.cifar_vgg trains it
HEAD_MODEL = "transfer_head"
FEATURE_LAYER = "classifier_4"  # the transfer tutorial's: the ReLU after the 2nd Linear
LAYERS = ("classifier_4", "classifier_1", "features_20", "features_15")


@dataclasses.dataclass(frozen=True)
class Config:
    """A new head on frozen VGG-A (CIFAR-10) features, trained on MNIST."""

    backbone: str = dataclasses.field(default="runs/cifar_vgg", metadata={
        "help": "workdir of an experiments.cifar_vgg run (its config.json and checkpoints/)"})
    data_dir: str | None = dataclasses.field(default=None, metadata={
        "help": "folder with the four MNIST IDX files (else $JAXVGG_DATA_DIR, else tfds)"})
    workdir: str = dataclasses.field(default="runs/vgga_transfer", metadata={"help": "where every output goes"})
    layer: str = dataclasses.field(default=FEATURE_LAYER, metadata={
        "help": "frozen layer whose outputs feed the head: classifier_4 (4096-d, the tutorial's), classifier_1 "
                "(4096-d), features_20 (last max-pool, 512-d), features_15 (block 4's max-pool, 2,048-d)",
        "choices": LAYERS})
    epochs: int = dataclasses.field(default=10, metadata={"help": "most epochs of head training"})
    batch_size: int = dataclasses.field(default=128, metadata={"help": "batch size of head training"})
    lr: float = dataclasses.field(default=1e-3, metadata={"help": "Adam learning rate (the transfer tutorial's)"})
    patience: int = dataclasses.field(default=3, metadata={"help": "early stopping: epochs without a lower val loss"})
    val_fraction: float = dataclasses.field(default=0.1, metadata={"help": "random seeded share of train for validation"})
    limit: int | None = dataclasses.field(default=None, metadata={
        "help": "use at most N training and N test images (quick runs)"})
    eval_batch_size: int = dataclasses.field(default=500, metadata={"help": "batch size of feature extraction"})
    precision: str = precision_field()
    seed: int = dataclasses.field(default=0, metadata={"help": "split, head init, data order, dropout"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoint"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no progress bars"})


def load_backbone(run_dir: str | Path, precision: str = "fp32", layer: str = FEATURE_LAYER) -> tuple[Any, Any, dict]:
    """(model, variables, info) from the best checkpoint of a cifar_vgg run in ``run_dir``; the model
    runs with the default policy of its own name in ``precision``.

    Reads the run's config.json (model, image size, dropout) and only the variables of its checkpoint
    (parameters, and BatchNorm statistics), which `jaxvgg.convert.transplant` checks against a fresh
    model's layers and shapes.

    Raises:
      FileNotFoundError: no config.json or no checkpoint there, naming the folder.
      ConfigError: a run at another image size than 32, one whose weights are not its model's, or a
        features_* ``layer`` (VGG-A's indices) on another VGG.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: --backbone must be the workdir of an "
                                "experiments.cifar_vgg run")
    saved = json.loads(config_path.read_text())
    if saved.get("image_size", 32) != 32:
        raise ConfigError("backbone", f"{config_path} is a run at image_size {saved['image_size']}; the MNIST "
                                      "transfer needs a 32x32 backbone", str(run_dir))
    name = saved.get("model", BACKBONE_MODEL)  # runs before --model existed trained VGG-A
    if name != BACKBONE_MODEL and layer.startswith("features_"):
        raise ConfigError("layer", f"the features_* choices are VGG-A's indices; the backbone is {name}: "
                                   "use a classifier_* layer", layer)
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=1, best_metric="val_accuracy")
    best = checkpoints.best_epoch() is not None
    variables, meta = checkpoints.restore_variables(best=best)  # FileNotFoundError when there is none
    checkpoints.close()
    fresh = jaxvgg.init_params(name, jax.random.PRNGKey(0), 10, (32, 32, 3))
    try:
        params = jaxvgg.transplant(variables["params"], fresh)
        if "batch_stats" in fresh:
            variables["batch_stats"] = jaxvgg.transplant(variables.get("batch_stats", {}), fresh["batch_stats"])
    except ValueError as e:
        raise ConfigError("backbone", f"its checkpoint is not a 10-class {name}: {e}", str(run_dir)) from None
    val_acc = meta["history"]["epoch"]["val_accuracy"][meta["epoch"] - 1]
    info = {"backbone": str(run_dir), "backbone_model": name, "backbone_epoch": meta["epoch"],
            "backbone_checkpoint": "best" if best else "last", "backbone_val_accuracy": val_acc}
    model = jaxvgg.create_model(name, num_classes=10, policy=default_policy(name, precision),
                                dropout_rate=saved.get("dropout", 0.5))
    return model, {**variables, "params": params}, info


def mnist_as_cifar(images: jax.Array) -> jax.Array:
    """uint8 (B, 28, 28, 1) digits -> float32 (B, 32, 32, 3): resized, grey repeated, CIFAR-10 normalised."""
    x = augment.resize(images.astype(jnp.float32) / 255.0, 32)
    return augment.normalize(jnp.repeat(x, 3, axis=-1), augment.CIFAR10_MEAN, augment.CIFAR10_STD)


def cached_features(cfg: Config, model: Any, variables: Any,
                    splits: list[data.Dataset]) -> list[data.Features]:
    """The frozen backbone's ``--layer`` outputs of every image of ``splits``, computed once (evaluation mode)."""
    t0 = time.perf_counter()
    features = evaluation.extract_features(model, variables, splits, cfg.layer, transform=mnist_as_cifar,
                                           batch_size=cfg.eval_batch_size, quiet=cfg.quiet)
    print(f"cached {cfg.layer} features ({features[0].features.shape[1]}-d) of {sum(map(len, splits))} images "
          f"in {time.perf_counter() - t0:.0f} s")
    return features


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__, launch=True)
    head_policy = default_policy(HEAD_MODEL, cfg.precision)
    model, variables, info = load_backbone(cfg.backbone, cfg.precision, cfg.layer)  # a missing run fails first
    workdir = prepare_workdir(cfg.workdir, cfg, cfg.resume, policy_record(head_policy))
    started = time.perf_counter()
    train, val, test = load_splits("mnist", cfg.data_dir, cfg.limit, cfg.val_fraction, cfg.seed)
    check_batch_size(cfg.batch_size, train)
    print(f"backbone: {info['backbone_model']} epoch {info['backbone_epoch']} ({info['backbone_checkpoint']}) "
          f"of {cfg.backbone}, CIFAR-10 val accuracy {info['backbone_val_accuracy']:.4f}")
    train_x, val_x, test_x = cached_features(cfg, model, variables, [train, val, test])
    width = int(train_x.features.shape[1])

    head = jaxvgg.create_model(HEAD_MODEL, train.num_classes, policy=head_policy)
    head_params = jaxvgg.init_params(HEAD_MODEL, jax.random.PRNGKey(cfg.seed), train.num_classes, (width,))
    trainable = jaxvgg.count_params(head_params)
    print(f"new head: {trainable:,} trainable parameters on {jaxvgg.count_params(variables['params']):,} frozen ones")
    state = TrainState.for_model(HEAD_MODEL, head, head_params, optim.adam(cfg.lr),
                                 rng=jax.random.PRNGKey(cfg.seed + 1))
    state, history = fit(state, train_x, val_x, fit_config(cfg, workdir, early_stopping_patience=cfg.patience,
                                                           keep_checkpoints=1),
                         train_transform=augment.unchanged_train, eval_transform=augment.unchanged)
    run = {"train_time_s": time.perf_counter() - started, "trainable_parameters": trainable, "layer": cfg.layer,
           "feature_width": width, **info, **policy_record(head_policy)}
    summary = evaluate_and_report(
        state, test_x, augment.unchanged, workdir, history, title="Transfer: VGG-A (CIFAR-10) features -> MNIST",
        history_label=f"VGG-A (CIFAR-10) {cfg.layer} features, new head on MNIST", summary=run,
        extra_md=f"Head parameters: {TRANSFER_PREFIX}_0, {TRANSFER_PREFIX}_3, on {cfg.layer} ({width}-d); "
                 "features cached in evaluation mode.", started=started)
    if summary:
        print(f"test accuracy {summary['test_accuracy']:.4f}, top-5 {summary['top5_accuracy']:.4f}, "
              f"test loss {summary['test_loss']:.4f}; outputs in {workdir}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
