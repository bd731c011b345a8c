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
from pathlib import Path
from typing import Any

import jax
import numpy as np

import jaxvgg
from experiments.common import (ConfigError, check_batch_size, default_policy, load_splits, parse_config,
                                policy_record, precision_field, prepare_workdir, run_cli, write_summary)
from jaxvgg import augment, data, distributed, evaluation, lr_finder, metrics, optim, parallel, plots
from jaxvgg.checkpoint import write_json
from jaxvgg.train import FitConfig, TrainState, fit

MODEL_NAMES = {"lenet": "mnist_lenet", "linear": "mnist_linear"}
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
        "help": "lenet (mnist_lenet) or linear (mnist_linear)", "choices": list(MODEL_NAMES)})
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
    return TrainState.for_model(MODEL_NAMES[cfg.model], model, params, tx, rng=key_train)


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
    fit_cfg = FitConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed, workdir=str(workdir),
                        resume=cfg.resume, quiet=cfg.quiet)
    state, history = fit(state, train, val, fit_cfg, train_transform=train_transform(cfg), eval_transform=normalize)
    named = workdir / history_name(cfg, lr)
    if distributed.is_main_process():
        shutil.copyfile(workdir / "history.json", named)
    return state, history, named


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__, launch=True)
    policy = default_policy(MODEL_NAMES[cfg.model], cfg.precision)
    workdir = prepare_workdir(cfg.workdir, cfg, cfg.resume, policy_record(policy))
    started = time.perf_counter()

    train, val, test = load_splits("mnist", cfg.data_dir, cfg.limit, cfg.val_fraction, cfg.seed)
    check_batch_size(cfg.batch_size, train)

    model = jaxvgg.create_model(MODEL_NAMES[cfg.model], policy=policy)
    params = jaxvgg.init_params(MODEL_NAMES[cfg.model], jax.random.PRNGKey(cfg.seed))
    lr, suggestions = choose_lr(cfg, model, params, train, workdir)
    print(f"training {MODEL_NAMES[cfg.model]} with {cfg.optimizer}, lr {lr:.4g}, batch {cfg.batch_size}, "
          f"{cfg.epochs} epochs")
    state, history, history_file = train_run(cfg, model, params, lr, train, val, workdir)
    train_time = time.perf_counter() - started  # data, range test and training
    if cfg.compare_half_lr:  # every process trains both runs before process 0 turns to the test set
        half_state, half_history, half_file = train_run(cfg, model, params, lr / 2, train, val, workdir / "half_lr")
    # the test set: loss, accuracy, confusion, t-SNE of the last layer's input, reject option
    log_probs = evaluation.predict_log_probs(state, test, normalize, mesh=parallel.all_processes_mesh())
    if not distributed.is_main_process():
        return {}  # process 0 writes every file
    probs = evaluation.probs_from_log_probs(log_probs)
    test_loss = evaluation.nll(log_probs, test.labels)
    classification = metrics.summarize_classification(test.labels, probs, data.MNIST_CLASSES)
    cm = np.asarray(classification["confusion_matrix"])
    # cm + cm.T counts both directions of a pair; its first off-diagonal maximum has a < b (None: no errors)
    most_confused = None
    for a, b, both_ways in metrics.most_confused_pairs(cm + cm.T, 1):
        most_confused = {"digits": [a, b], "count_both_ways": both_ways, "count_a_as_b": int(cm[a, b]),
                         "count_b_as_a": int(cm[b, a])}

    tsne_count = min(cfg.tsne_points, len(test))
    features = evaluation.penultimate_features(MODEL_NAMES[cfg.model], model, state.variables,
                                               test.images[:tsne_count], transform=normalize)
    embedding = metrics.tsne_embedding(features, seed=cfg.seed)

    reject = metrics.reject_option_curves(test.labels, probs)
    reject_exact = metrics.reject_curve_by_count(test.labels, probs)
    at = metrics.reject_option_curves(test.labels, probs, thresholds=REJECT_THRESHOLDS)
    reject_summary = [{"threshold": float(t), "n_rejected": int(r), "n_errors_accepted": int(e),
                       "error_rate_accepted": None if np.isnan(x) else float(x)}
                      for t, r, e, x in zip(at["thresholds"], at["n_rejected"], at["n_errors_accepted"],
                                            at["error_rate_accepted"])]

    label = f"{MODEL_NAMES[cfg.model]}, {cfg.optimizer}, lr {lr:.3g}"
    figures = [workdir / "lr_range.png"] if (workdir / "lr_range.png").exists() and cfg.lr is None else []
    figures += [
        plots.plot_history(history, workdir / "history.png", label=label),
        plots.plot_confusion_matrix(cm, data.MNIST_CLASSES, workdir / "confusion_matrix.png"),
        plots.plot_tsne(embedding, test.labels[:tsne_count], data.MNIST_CLASSES, workdir / "tsne.png"),
        plots.plot_reject_curves(reject, workdir / "reject_option.png", exact=reject_exact),
    ]

    summary = {
        "test_accuracy": classification["accuracy"], "test_loss": test_loss, "lr": lr,
        "lr_source": "--lr" if cfg.lr is not None else "range test (min smoothed loss / 2)",
        "model": MODEL_NAMES[cfg.model], "optimizer": cfg.optimizer, "batch_size": cfg.batch_size,
        "epochs": len(history["epoch"]["epoch"]), "train_time_s": train_time,
        "parameters": jaxvgg.count_params(state.params), "history_file": history_file.name,
        "final_val_accuracy": history["epoch"]["val_accuracy"][-1] if history["epoch"]["val_accuracy"] else None,
        "most_confused_pair": most_confused, "lr_range_suggestions": suggestions,
        "tsne_points": tsne_count, "reject_option": reject_summary, **policy_record(policy), **classification,
    }
    if cfg.compare_half_lr:
        half_log_probs = evaluation.predict_log_probs(half_state, test, normalize)
        summary["half_lr"] = {"lr": lr / 2, "test_accuracy": float(np.mean(half_log_probs.argmax(1) == test.labels)),
                              "test_loss": evaluation.nll(half_log_probs, test.labels),
                              "history_file": f"half_lr/{half_file.name}"}
        figures.append(plots.plot_history_comparison({f"lr {lr:.3g}": history, f"lr {lr / 2:.3g}": half_history},
                                                     workdir / "lr_comparison.png"))
    summary["wall_time_s"] = time.perf_counter() - started  # everything: range test, runs, analysis
    write_summary(workdir, summary)
    plots.write_report(workdir, f"MNIST lab: {label}", summary, figures)
    pair = ("none" if most_confused is None else "{0} <-> {1}".format(*most_confused["digits"])
            + f" ({most_confused['count_both_ways']} test images)")
    print(f"test accuracy {summary['test_accuracy']:.4f}, test loss {test_loss:.4f}; most confused digits {pair}; "
          f"outputs in {workdir}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
