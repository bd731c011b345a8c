"""The CIFAR-10 tutorial CNN (537,610 parameters, log-softmax + NLL), evaluated with scikit-learn metrics.

    python -m experiments.cifar_cnn --data-dir ../shared/data                  # defaults below (aim: >= 78 %)
    python -m experiments.cifar_cnn --data-dir ../shared/data --schedule constant --lr 0.01 \\
        --weight-decay 0 --augment false --epochs 10                          # a plain, tutorial-style recipe
    python -m experiments.cifar_cnn --data-dir ../shared/data --limit 300 --epochs 1   # a quick look

Leaves in --workdir: config.json, history.json, checkpoints/, loss_moving_mean.png, history.png
(training accuracy per epoch), confusion_matrix.png, roc_cat.png, roc_all_classes.png, roc_cat.json
(the cat curve's points), summary.json (test loss/accuracy, F1 micro/macro, cat AUC, one-vs-rest AUC per
class, confusion matrix) and report.md showing all of it.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from functools import partial

import jax
import numpy as np

import jaxvgg
from experiments.common import (check_batch_size, default_policy, fit_config, load_splits, parse_config,
                                policy_record, precision_field, prepare_workdir, run_cli)
from jaxvgg import augment, data, metrics, optim, plots
from jaxvgg.checkpoint import write_json
from jaxvgg.models import parameter_table
from jaxvgg.report import Predictions, evaluate_and_report
from jaxvgg.train import TrainState, fit

MODEL = "cifar_cnn"
CAT = data.CIFAR10_CLASSES.index("cat")  # 3: the class whose ROC curve the tutorial draws


@dataclasses.dataclass(frozen=True)
class Config:
    """The CIFAR-10 CNN. Defaults: SGD + cosine decay + crop/flip, aimed past the tutorial's 74.5 %."""

    data_dir: str | None = dataclasses.field(default=None, metadata={
        "help": "folder with cifar-10-binary.tar.gz or cifar-10-batches-bin/ (else $JAXVGG_DATA_DIR, else tfds)"})
    workdir: str = dataclasses.field(default="runs/cifar_cnn", metadata={"help": "where every output goes"})
    epochs: int = dataclasses.field(default=30, metadata={"help": "training epochs"})
    batch_size: int = dataclasses.field(default=128, metadata={"help": "global batch size"})
    optimizer: str = dataclasses.field(default="sgd", metadata={
        "help": "torch.optim semantics (coupled weight decay)", "choices": ["sgd", "adam"]})
    schedule: str = dataclasses.field(default="cosine", metadata={
        "help": "per-step lr schedule (optim.make_schedule; onecycle needs >= 4 steps); plain recipe: constant",
        "choices": list(optim.SCHEDULES)})
    lr: float = dataclasses.field(default=0.05, metadata={
        "help": "start lr (cosine, step), peak lr (onecycle) or the lr (constant); plain recipe: 0.01"})
    momentum: float = dataclasses.field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = dataclasses.field(default=5e-4, metadata={"help": "coupled L2, torch style (plain recipe: 0)"})
    augment: bool = dataclasses.field(default=True, metadata={
        "help": "random crop (padding 4) + horizontal flip on the training images (plain recipe: false)"})
    val_fraction: float = dataclasses.field(default=0.1, metadata={"help": "random seeded share of train for validation"})
    limit: int | None = dataclasses.field(default=None, metadata={
        "help": "use at most N training and N test images (quick runs)"})
    loss_window: int = dataclasses.field(default=100, metadata={"help": "batches in the moving mean of the loss plot"})
    precision: str = precision_field()
    seed: int = dataclasses.field(default=0, metadata={"help": "init, split, data order and augmentation"})
    num_devices: int | None = dataclasses.field(default=None, metadata={"help": "devices for data parallel (all)"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoint"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no progress bars"})


def transforms(augmented: bool):
    """(train, eval) transforms with the tutorial's Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))."""
    mean, std = augment.HALF_MEAN, augment.HALF_STD
    eval_tf = partial(augment.eval_transform, mean=mean, std=std)
    if augmented:
        return partial(augment.cifar_train_transform, mean=mean, std=std), eval_tf
    return partial(_no_augmentation, eval_tf=eval_tf), eval_tf


def _no_augmentation(key: jax.Array, images: jax.Array, eval_tf) -> jax.Array:
    """The training transform of the plain recipe: normalisation only."""
    del key
    return eval_tf(images)


def format_parameter_table(params) -> str:
    """The per-layer parameter table and its total, as printed text."""
    rows = parameter_table(params)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"{'parameter':<{width}}  {'shape':<18} {'count':>9}"]
    lines += [f"{name:<{width}}  {str(shape):<18} {count:>9,}" for name, shape, count in rows]
    lines.append(f"{'total':<{width}}  {'':<18} {sum(count for _, _, count in rows):>9,}")
    return "\n".join(lines)


def _json_curve(curve: dict) -> dict:
    """A metrics.roc_for_class result as strict JSON (sklearn's first threshold is +inf: None)."""
    return {"auc": curve["auc"], "fpr": curve["fpr"].tolist(), "tpr": curve["tpr"].tolist(),
            "thresholds": [None if not math.isfinite(t) else float(t) for t in curve["thresholds"]]}


def build_state(cfg: Config, steps_per_epoch: int, policy) -> TrainState:
    """The step-0 TrainState: the tutorial's CNN with the configured optimizer and per-step schedule."""
    model = jaxvgg.create_model(MODEL, policy=policy)
    key_init, key_train = jax.random.split(jax.random.PRNGKey(cfg.seed))
    lr = optim.make_schedule(cfg.schedule, cfg.lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs)
    opt_kw = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    tx = optim.create_optimizer(cfg.optimizer, lr, weight_decay=cfg.weight_decay, **opt_kw)
    return TrainState.for_model(MODEL, model, jaxvgg.init_params(MODEL, key_init), tx, rng=key_train)  # NLL loss


def roc_and_loss_figures(predictions: Predictions, history: dict, cfg: Config, workdir) -> tuple[dict, list]:
    """The tutorial's extra analysis: F1, the loss's moving mean, and the ROC curves of cat and of every class."""
    labels, probs, scores = predictions.labels, predictions.probs, predictions.scores
    figures = [plots.plot_moving_mean_loss(history["batch"]["loss"], cfg.loss_window, workdir / "loss_moving_mean.png")]
    entries = {"cat_auc": None, "f1_micro": scores["f1"]["micro"], "f1_macro": scores["f1"]["macro"],
               "final_train_accuracy": history["epoch"]["train_accuracy"][-1] if history["epoch"]["epoch"] else None}
    if 0 < np.sum(labels == CAT) < len(labels):  # a ROC curve needs positives and negatives
        cat_curve = metrics.roc_for_class(labels, probs, CAT)
        entries["cat_auc"] = cat_curve["auc"]
        write_json(workdir / "roc_cat.json", _json_curve(cat_curve), allow_nan=False)
        figures.append(plots.plot_roc({"cat": cat_curve}, workdir / "roc_cat.png"))
        present = [c for c in range(len(data.CIFAR10_CLASSES)) if 0 < np.sum(labels == c) < len(labels)]
        figures.append(plots.plot_roc({data.CIFAR10_CLASSES[c]: metrics.roc_for_class(labels, probs, c)
                                       for c in present}, workdir / "roc_all_classes.png"))
    else:
        print(f"no ROC curve for cat: {int(np.sum(labels == CAT))} of {len(labels)} test images are cats")
    return entries, figures


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__, launch=True)
    policy = default_policy(MODEL, cfg.precision)
    workdir = prepare_workdir(cfg.workdir, cfg, cfg.resume, policy_record(policy))
    started = time.perf_counter()

    train, val, test = load_splits("cifar10", cfg.data_dir, cfg.limit, cfg.val_fraction, cfg.seed)
    state = build_state(cfg, check_batch_size(cfg.batch_size, train), policy)
    print(format_parameter_table(state.params))

    train_tf, eval_tf = transforms(cfg.augment)
    state, history = fit(state, train, val, fit_config(cfg, workdir), train_transform=train_tf, eval_transform=eval_tf)
    run = {"train_time_s": time.perf_counter() - started, "parameters": jaxvgg.count_params(state.params),
           **policy_record(policy)}
    summary = evaluate_and_report(  # float64, rows logsumexp to 0; every process computes its share
        state, test, eval_tf, workdir, history, title="The CIFAR-10 tutorial CNN", summary=run,
        groups=metrics.CIFAR10_GROUPS, extra=partial(roc_and_loss_figures, history=history, cfg=cfg, workdir=workdir),
        extra_md="## Parameters\n\n```\n" + format_parameter_table(state.params) + "\n```", started=started)
    if summary:
        cat_auc = summary["cat_auc"]
        print(f"test accuracy {summary['test_accuracy']:.4f}, test loss {summary['test_loss']:.4f}, "
              f"F1 micro {summary['f1_micro']:.4f} macro {summary['f1_macro']:.4f}, "
              f"cat AUC {'n/a' if cat_auc is None else f'{cat_auc:.4f}'}; outputs in {workdir}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
