"""The MNIST lab: LeNet (or the linear baseline) with an lr from the range test, then the analysis.

    python -m experiments.mnist --data-dir ../shared/data/mnist                     # 30 epochs, lr from the test
    python -m experiments.mnist --data-dir DIR --lr 0.01 --optimizer adam          # skip the range test
    python -m experiments.mnist --data-dir DIR --compare-half-lr true              # a second run at lr / 2
    python -m experiments.mnist --data-dir DIR --limit 600 --epochs 1              # a quick look

--data-dir is any folder with the four standard IDX files (optionally .gz, or in its mnist/ subfolder).
Flow: 90/10 seeded train/validation split; the lr range test (lr_range.png) unless --lr is given, whose
suggestion is the lr at the minimum smoothed loss divided by 2; training with jaxvgg.train.fit (a
checkpoint every epoch under checkpoints/, history.json rewritten every epoch); then on the test set:
loss and accuracy, the confusion matrix and the most confused pair of digits, a t-SNE of the features
entering the last layer, and the reject option.

Leaves in --workdir: config.json, lr_range.png + lr_range.json (when the test ran), history.json (the
per-epoch file fit keeps up to date), history_{model}_{optimizer}_lr{lr}_bs{batch}_e{epochs}.json (the same
history under a name built from the run's arguments, written when training ends), checkpoints/,
history.png, confusion_matrix.png, tsne.png, reject_option.png, summary.json, report.md; with
--compare-half-lr also half_lr/ (the second run's checkpoints and histories) and lr_comparison.png.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np

import jaxvgg
from experiments.common import (ConfigError, check_batch_size, default_policy, fit_config, load_splits, parse_config,
                                policy_record, precision_field, prepare_workdir, run_cli)
from jaxvgg import augment, data, distributed, evaluation, lr_finder, metrics, optim, plots
from jaxvgg.checkpoint import write_json
from jaxvgg.report import Predictions, evaluate_and_report
from jaxvgg.train import TrainState, fit

REGISTRY_NAME = {"lenet": "mnist_lenet", "linear": "mnist_linear"}  # --model -> the registry's name
REJECT_THRESHOLDS = (0.5, 0.9, 0.99)  # reported in summary.json; the plot sweeps 0..1


@dataclasses.dataclass(frozen=True)
class Config:
    """The MNIST lab. Defaults: LeNet, SGD momentum 0.9 + weight decay 5e-4, batch 64, 30 epochs, lr from the
    range test decayed by a cosine, shifts of up to 2 pixels (the lab's plain run: --schedule constant
    --augment false --weight-decay 0)."""

    data_dir: str | None = dataclasses.field(default=None, metadata={
        "help": "folder with the four MNIST IDX files (else $JAXVGG_DATA_DIR, else tfds)"})
    workdir: str = dataclasses.field(default="runs/mnist", metadata={"help": "where every output goes"})
    model: str = dataclasses.field(default="lenet", metadata={
        "help": "lenet (mnist_lenet) or linear (mnist_linear)", "choices": list(REGISTRY_NAME)})
    epochs: int = dataclasses.field(default=30, metadata={"help": "training epochs"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "global batch size"})
    lr: float | None = dataclasses.field(default=None, metadata={
        "help": "learning rate; None: the range test's suggestion (lr at the minimum smoothed loss / 2)"})
    optimizer: str = dataclasses.field(default="sgd", metadata={
        "help": "sgd (with --momentum) or adam", "choices": ["sgd", "adam"]})
    momentum: float = dataclasses.field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = dataclasses.field(default=5e-4, metadata={"help": "coupled L2 (torch style); 0 for none"})
    schedule: str = dataclasses.field(default="cosine", metadata={
        "help": "lr schedule over the run, starting at the chosen lr; 'constant' is the lab's plain run",
        "choices": ["cosine", "constant"]})
    augment: bool = dataclasses.field(default=True, metadata={
        "help": "random shifts of up to 2 pixels (crop with zero padding); false for the lab's plain run"})
    range_min_lr: float = dataclasses.field(default=1e-5, metadata={"help": "range test: first lr"})
    range_max_lr: float = dataclasses.field(default=1.0, metadata={"help": "range test: last planned lr"})
    range_steps: int | None = dataclasses.field(default=None, metadata={
        "help": "range test: steps (default one epoch of the training split)"})
    val_fraction: float = dataclasses.field(default=0.1, metadata={
        "help": "random seeded share of train for validation"})
    limit: int | None = dataclasses.field(default=None, metadata={
        "help": "use at most N training and N test images (quick runs)"})
    tsne_points: int = dataclasses.field(default=2000, metadata={"help": "test images in the t-SNE plot (the first N)"})
    compare_half_lr: bool = dataclasses.field(default=False, metadata={
        "help": "also train at lr / 2 (in workdir/half_lr) and plot both histories"})
    precision: str = precision_field()
    seed: int = dataclasses.field(default=0, metadata={"help": "init, split, data order"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoints"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no progress bars"})

    def check(self) -> None:
        if self.range_min_lr >= self.range_max_lr:
            raise ConfigError("range_max_lr", f"must exceed --range-min-lr {self.range_min_lr:g}", self.range_max_lr)


def normalize(images):
    """ToTensor + Normalize((0.1307,), (0.3081,)), the lab's transform."""
    return augment.normalize(images, augment.MNIST_MEAN, augment.MNIST_STD)


def shift_transform(key, images):
    """Random shifts of up to 2 pixels (zero padding is the background), then the lab's normalisation."""
    return normalize(augment.random_crop(key, images, padding=2))


def plain_transform(key, images):
    """No augmentation: the key is unused."""
    del key
    return normalize(images)


def train_transform(cfg: Config):
    """The training transform the config asks for."""
    return shift_transform if cfg.augment else plain_transform


def history_name(cfg: Config, lr: float) -> str:
    """The history file name the lab asks for, built from the run's arguments."""
    return f"history_{cfg.model}_{cfg.optimizer}_lr{lr:g}_bs{cfg.batch_size}_e{cfg.epochs}.json"


def new_state(cfg: Config, model: Any, params: Any, lr: float, steps_per_epoch: int | None = None) -> TrainState:
    """A fresh state from the run's initial parameters: every run of this config starts from the same point.

    With ``steps_per_epoch`` the configured schedule starts at ``lr``; without, the lr is constant (the
    range test sets it step by step).
    """
    kw = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    if steps_per_epoch is not None and cfg.schedule != "constant":
        lr = optim.make_schedule(cfg.schedule, lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs)
    tx = optim.create_optimizer(cfg.optimizer, lr, weight_decay=cfg.weight_decay, **kw)
    key_train = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1)
    return TrainState.for_model(REGISTRY_NAME[cfg.model], model, params, tx, rng=key_train)


def choose_lr(cfg: Config, model: Any, params: Any, train: data.Dataset, workdir: Path) -> tuple[float, dict | None]:
    """--lr, else the range test's suggestion (reused from lr_range.json when resuming)."""
    if cfg.lr is not None:
        return cfg.lr, None
    saved = workdir / "lr_range.json"
    if cfg.resume and saved.exists():
        found = json.loads(saved.read_text())
        print(f"resuming: lr {found['suggested_lr']:.4g} from {saved}")
        return found["suggested_lr"], found["suggestions"]
    state = new_state(cfg, model, params, cfg.range_min_lr)
    result = lr_finder.lr_range_test(state, train, transform=train_transform(cfg), batch_size=cfg.batch_size,
                                     min_lr=cfg.range_min_lr, max_lr=cfg.range_max_lr, num_steps=cfg.range_steps,
                                     seed=cfg.seed, quiet=cfg.quiet)
    if distributed.is_main_process():
        lr_finder.plot_lr_range_result(result, workdir / "lr_range.png")
        write_json(saved, result.to_json())
    print(f"lr range test: {result.lrs.size}/{result.num_steps} steps"
          f"{', stopped early' if result.stopped_early else ''}; "
          + ", ".join(f"{k} {v:.3g}" for k, v in result.suggestions.items()))
    return result.suggested_lr, result.suggestions


def train_run(cfg: Config, model: Any, params: Any, lr: float, train: data.Dataset, val: data.Dataset,
              workdir: Path) -> tuple[TrainState, dict, Path]:
    """One training run at ``lr`` in ``workdir``; also writes the history under its argument-built name."""
    state = new_state(cfg, model, params, lr, data.num_batches(len(train), cfg.batch_size, drop_last=True))
    state, history = fit(state, train, val, fit_config(cfg, workdir), train_transform=train_transform(cfg),
                         eval_transform=normalize)
    named = workdir / history_name(cfg, lr)
    if distributed.is_main_process():
        shutil.copyfile(workdir / "history.json", named)
    return state, history, named


def most_confused_pair(cm: np.ndarray) -> dict | None:
    """The pair of digits most often mistaken for each other, both ways counted (None: no errors)."""
    # cm + cm.T counts both directions of a pair; its first off-diagonal maximum has a < b
    for a, b, both_ways in metrics.most_confused_pairs(cm + cm.T, 1):
        return {"digits": [a, b], "count_both_ways": both_ways, "count_a_as_b": int(cm[a, b]),
                "count_b_as_a": int(cm[b, a])}
    return None


def reject_option(predictions: Predictions, workdir: Path) -> tuple[list[dict], Path]:
    """The reject option at `REJECT_THRESHOLDS` (for summary.json) and its curves over 0..1 (a figure)."""
    labels, probs = predictions.labels, predictions.probs
    at = metrics.reject_option_curves(labels, probs, thresholds=REJECT_THRESHOLDS)
    rows = [{"threshold": float(t), "n_rejected": int(r), "n_errors_accepted": int(e),
             "error_rate_accepted": None if np.isnan(x) else float(x)}
            for t, r, e, x in zip(at["thresholds"], at["n_rejected"], at["n_errors_accepted"],
                                  at["error_rate_accepted"])]
    figure = plots.plot_reject_curves(metrics.reject_option_curves(labels, probs), workdir / "reject_option.png",
                                      exact=metrics.reject_curve_by_count(labels, probs))
    return rows, figure


def half_lr_comparison(half: tuple, history: dict, test: data.Dataset, workdir: Path) -> tuple[dict, Path]:
    """The run at lr / 2 (``half``: its lr, state, history and history file) scored on the test set, and
    both runs' histories in one figure."""
    half_lr, half_state, half_history, half_file = half
    log_probs = evaluation.predict_log_probs(half_state, test, normalize)
    entry = {"lr": half_lr, "test_accuracy": float(np.mean(log_probs.argmax(1) == test.labels)),
             "test_loss": evaluation.nll(log_probs, test.labels), "history_file": f"half_lr/{half_file.name}"}
    figure = plots.plot_history_comparison({f"lr {2 * half_lr:.3g}": history, f"lr {half_lr:.3g}": half_history},
                                           workdir / "lr_comparison.png")
    return entry, figure


def lab_analysis(predictions: Predictions, cfg: Config, model: Any, state: TrainState, history: dict,
                 test: data.Dataset, workdir: Path, half: tuple | None) -> tuple[dict, list[Path]]:
    """The lab's questions of the test set: the most confused digits, a t-SNE of the last layer's input,
    the reject option, and with ``half`` the run at lr / 2 (`half_lr_comparison`)."""
    tsne_count = min(cfg.tsne_points, len(test))
    features = evaluation.penultimate_features(REGISTRY_NAME[cfg.model], model, state.variables,
                                               test.images[:tsne_count], transform=normalize)
    reject_rows, reject_figure = reject_option(predictions, workdir)
    figures = [workdir / "lr_range.png"] if (workdir / "lr_range.png").exists() and cfg.lr is None else []
    figures += [plots.plot_tsne(metrics.tsne_embedding(features, seed=cfg.seed), test.labels[:tsne_count],
                                data.MNIST_CLASSES, workdir / "tsne.png"), reject_figure]
    entries = {"most_confused_pair": most_confused_pair(np.asarray(predictions.scores["confusion_matrix"])),
               "tsne_points": tsne_count, "reject_option": reject_rows}
    if half is not None:
        entries["half_lr"], comparison = half_lr_comparison(half, history, test, workdir)
        figures.append(comparison)
    return entries, figures


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__, launch=True)
    name = REGISTRY_NAME[cfg.model]
    policy = default_policy(name, cfg.precision)
    workdir = prepare_workdir(cfg.workdir, cfg, cfg.resume, policy_record(policy))
    started = time.perf_counter()

    train, val, test = load_splits("mnist", cfg.data_dir, cfg.limit, cfg.val_fraction, cfg.seed)
    check_batch_size(cfg.batch_size, train)
    model = jaxvgg.create_model(name, policy=policy)
    params = jaxvgg.init_params(name, jax.random.PRNGKey(cfg.seed))
    lr, suggestions = choose_lr(cfg, model, params, train, workdir)
    print(f"training {name} with {cfg.optimizer}, lr {lr:.4g}, batch {cfg.batch_size}, {cfg.epochs} epochs")
    state, history, history_file = train_run(cfg, model, params, lr, train, val, workdir)
    train_time = time.perf_counter() - started  # data, range test and training
    # every process trains both runs before process 0 turns to the test set
    half = None
    if cfg.compare_half_lr:
        half = (lr / 2, *train_run(cfg, model, params, lr / 2, train, val, workdir / "half_lr"))
    run = {"lr": lr, "lr_source": "--lr" if cfg.lr is not None else "range test (min smoothed loss / 2)",
           "model": name, "optimizer": cfg.optimizer, "batch_size": cfg.batch_size, "train_time_s": train_time,
           "parameters": jaxvgg.count_params(state.params), "history_file": history_file.name,
           "final_val_accuracy": history["epoch"]["val_accuracy"][-1] if history["epoch"]["val_accuracy"] else None,
           "lr_range_suggestions": suggestions, **policy_record(policy)}
    label = f"{name}, {cfg.optimizer}, lr {lr:.3g}"
    summary = evaluate_and_report(
        state, test, normalize, workdir, history, title=f"MNIST lab: {label}", history_label=label, summary=run,
        extra=partial(lab_analysis, cfg=cfg, model=model, state=state, history=history, test=test, workdir=workdir,
                      half=half),
        started=started)
    if summary:
        pair = summary["most_confused_pair"]
        pair = "none" if pair is None else "{} <-> {} ({} test images)".format(*pair["digits"],
                                                                              pair["count_both_ways"])
        print(f"test accuracy {summary['test_accuracy']:.4f}, test loss {summary['test_loss']:.4f}; "
              f"most confused digits {pair}; outputs in {workdir}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
