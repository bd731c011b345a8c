"""Learning-rate range test (Smith, Super-Convergence Fig. 2a) for any model and data set of the project.

    python -m experiments.lr_range --model mnist_lenet --dataset mnist --data-dir ../shared/data/mnist
    python -m experiments.lr_range --model vgg11 --dataset cifar10 --data-dir ../shared/data --max-lr 1

One epoch of the (seeded 90%) training split with the lr rising exponentially from --min-lr to
--max-lr, one step per batch, stopped early once the smoothed loss exceeds 4x its best value.

Leaves in --workdir: config.json, lr_range.png, lr_range.json (lrs, losses, smoothed, suggestions)
and summary.json (suggestions, chosen lr, steps). No test_accuracy / test_loss: the network trained
during the test is thrown away (its lr was never a sensible one), so there is nothing to evaluate.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from functools import partial

import jax

import jaxvgg
from experiments.common import (ConfigError, check_batch_size, default_policy, parse_config, policy_record,
                                precision_field, prepare_workdir, run_cli, split_train_val)
from jaxvgg import augment, data, lr_finder, optim
from jaxvgg.checkpoint import write_json
from jaxvgg.report import write_summary
from jaxvgg.train import TrainState

RANGE_TEST_MODELS = ("mnist_linear", "mnist_lenet", "cifar_cnn", "vgg11")
DATASETS = ("mnist", "cifar10")
_DEFAULT_DATASET = {"mnist_linear": "mnist", "mnist_lenet": "mnist", "cifar_cnn": "cifar10", "vgg11": "cifar10"}
_NORMALIZATION = {"mnist": (augment.MNIST_MEAN, augment.MNIST_STD),
                  "cifar10": (augment.CIFAR10_MEAN, augment.CIFAR10_STD)}
_VGG_MIN_SIDE = 32  # five 2x2 max-pools: smaller images pool down to nothing


@dataclasses.dataclass(frozen=True)
class Config:
    """The range test's settings; the optimizer's other hyper-parameters match the training run's."""

    model: str = dataclasses.field(default="mnist_lenet", metadata={"help": "network", "choices": list(RANGE_TEST_MODELS)})
    dataset: str | None = dataclasses.field(default=None, metadata={
        "help": "data set (default: mnist for the mnist_* models, cifar10 otherwise)", "choices": [*DATASETS, None]})
    data_dir: str | None = dataclasses.field(default=None, metadata={
        "help": "folder with the data set's files (else $JAXVGG_DATA_DIR, else tfds)"})
    workdir: str = dataclasses.field(default="runs/lr_range", metadata={"help": "where every output goes"})
    batch_size: int = dataclasses.field(default=64, metadata={"help": "global batch size"})
    min_lr: float = dataclasses.field(default=1e-5, metadata={"help": "lr of the first step"})
    max_lr: float = dataclasses.field(default=1.0, metadata={"help": "lr of the last planned step"})
    num_steps: int | None = dataclasses.field(default=None, metadata={
        "help": "steps of the test (default: one epoch of the training split)"})
    optimizer: str = dataclasses.field(default="sgd", metadata={"help": "optimizer", "choices": ["sgd", "adam"]})
    momentum: float = dataclasses.field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = dataclasses.field(default=0.0, metadata={"help": "coupled L2, torch style"})
    augment: bool = dataclasses.field(default=True, metadata={
        "help": "CIFAR-10 random crop (padding 4) + flip, as experiments.cifar_vgg trains; MNIST is never augmented"})
    diverge_factor: float = dataclasses.field(default=4.0, metadata={"help": "stop when smoothed loss > this x best"})
    smoothing: float = dataclasses.field(default=0.05, metadata={"help": "EWA weight of the newest loss"})
    val_fraction: float = dataclasses.field(default=0.1, metadata={
        "help": "share of train held out (as the training runs do), so the test sees their training split"})
    limit: int | None = dataclasses.field(default=None, metadata={"help": "use at most N training images"})
    precision: str = precision_field()
    seed: int = dataclasses.field(default=0, metadata={"help": "init, split and data order"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no progress bar"})

    def check(self) -> None:
        if self.min_lr >= self.max_lr:
            raise ConfigError("max_lr", f"must exceed --min-lr {self.min_lr:g}", self.max_lr)
        if self.model == "vgg11" and (self.dataset or _DEFAULT_DATASET[self.model]) == "mnist":
            raise ConfigError("dataset", f"vgg11 needs images of at least {_VGG_MIN_SIDE}x{_VGG_MIN_SIDE}; "
                                         "MNIST's are 28x28 (use cifar10)", self.dataset)


def make_transform(dataset: str, augment_images: bool):
    """The (key, uint8) -> float32 training transform: normalisation, plus crop+flip on CIFAR-10 if asked."""
    mean, std = _NORMALIZATION[dataset]
    if dataset == "cifar10" and augment_images:
        return partial(augment.cifar_train_transform, mean=mean, std=std)
    return lambda key, images: augment.normalize(images, mean, std)


def build_state(cfg: Config, train: data.Dataset, policy) -> TrainState:
    """The step-0 state the range test copies: the model at the data's shape, the optimizer at --min-lr."""
    key_init, key_train = jax.random.split(jax.random.PRNGKey(cfg.seed))
    model = jaxvgg.create_model(cfg.model, num_classes=train.num_classes, policy=policy)
    params = jaxvgg.init_params(cfg.model, key_init, train.num_classes, train.images.shape[1:])
    momentum = {"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}
    tx = optim.create_optimizer(cfg.optimizer, cfg.min_lr, weight_decay=cfg.weight_decay, **momentum)
    return TrainState.for_model(cfg.model, model, params, tx, rng=key_train)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__)
    dataset = cfg.dataset or _DEFAULT_DATASET[cfg.model]
    policy = default_policy(cfg.model, cfg.precision)
    workdir = prepare_workdir(cfg.workdir, cfg, False, policy_record(policy))
    started = time.perf_counter()

    train_all = data.load_dataset(dataset, cfg.data_dir)["train"]
    if cfg.limit is not None:
        train_all = train_all.take(cfg.limit)
    train, _ = split_train_val(train_all, cfg.val_fraction, cfg.seed, cfg.limit)
    check_batch_size(cfg.batch_size, train)
    print(f"{dataset}: {len(train)} training images {train.images.shape[1:]}; {cfg.model}; "
          f"{jax.device_count()} {jax.default_backend()} device(s)")

    result = lr_finder.lr_range_test(
        build_state(cfg, train, policy), train, transform=make_transform(dataset, cfg.augment),
        batch_size=cfg.batch_size, min_lr=cfg.min_lr, max_lr=cfg.max_lr, num_steps=cfg.num_steps, seed=cfg.seed,
        diverge_factor=cfg.diverge_factor, smoothing=cfg.smoothing, quiet=cfg.quiet)
    lr_finder.plot_lr_range_result(result, workdir / "lr_range.png")
    write_json(workdir / "lr_range.json", result.to_json())

    summary = {"model": cfg.model, "dataset": dataset, "optimizer": cfg.optimizer,
               "suggested_lr": result.suggested_lr, "suggestions": result.suggestions,
               "stopped_early": result.stopped_early, "steps_recorded": int(result.lrs.size),
               "num_steps": result.num_steps, "burn_in": result.burn_in,
               "min_smoothed_loss": float(result.smoothed.min()), "wall_time_s": time.perf_counter() - started,
               **policy_record(policy)}
    write_summary(workdir, summary)
    stop = f"stopped early at lr {result.lrs[-1]:.3g}" if result.stopped_early else "ran every step"
    print(f"lr range test: {result.lrs.size}/{result.num_steps} steps, {stop}; suggestions "
          + ", ".join(f"{k} {v:.3g}" for k, v in result.suggestions.items()) + f"; outputs in {workdir}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
