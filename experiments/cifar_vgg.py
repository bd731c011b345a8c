"""VGG-A (VGG11) on CIFAR-10: the main job; ``--model`` trains any VGG of the family.

    python -m experiments.cifar_vgg --workdir runs/cifar_vgg            # defaults below
    python -m experiments.cifar_vgg --model vgg11_bn --lr 0.1 --precision bf16 --workdir runs/cifar_vgg11_bn
    python -m experiments.cifar_vgg --schedule plateau --lr 0.01 --nesterov false --label-smoothing 0 \\
        --epochs 74 --workdir runs/cifar_vgg_paper                      # the paper's recipe
    python -m experiments.cifar_vgg --limit 512 --epochs 1              # a quick look
    python -m experiments.cifar_vgg --model vgg11_bn --lr 0.1 --schedule cosine --warmup 0.3 --ema-decay 0.999 \
        --tta 2 --workdir runs/cifar_vgg11_bn_ema                       # warm-up + cosine, EMA, test-time views

Leaves in --workdir: config.json, history.json, checkpoints/, history.png, confusion_matrix.png,
test_samples.png, summary.json (test loss/accuracy, per-class accuracy, confusion matrix,
vehicle-vs-animal breakdown; with --tta the accuracy over test-time views) and report.md showing all of it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from functools import partial

import jax

import jaxvgg
from experiments.common import (ConfigError, at_least, check_batch_size, default_policy, fit_config, in_range,
                                load_splits, parse_config, policy_record, precision_field, prepare_workdir, run_cli)
from jaxvgg import augment, data, evaluation, metrics, optim, plots
from jaxvgg.models import VGG_ARCHS
from jaxvgg.policy import Policy
from jaxvgg.report import Predictions, evaluate_and_report
from jaxvgg.train import TrainState, fit

MODEL = "vgg11"  # VGG-A, the tutorial's


def model_label(name: str) -> str:
    """"vgg11_bn" -> "VGG11-BN" (VGG-A for the tutorial's vgg11)."""
    return "VGG-A" if name == MODEL else name.upper().replace("_BN", "-BN")


@dataclasses.dataclass(frozen=True)
class Config:
    """VGG-A on CIFAR-10. Defaults: a one-cycle schedule that reaches the target in few epochs."""

    data_dir: str | None = dataclasses.field(default=None, metadata={
        "help": "folder with cifar-10-binary.tar.gz or cifar-10-batches-bin/ (else $JAXVGG_DATA_DIR, else tfds)"})
    workdir: str = dataclasses.field(default="runs/cifar_vgg", metadata={"help": "where every output goes"})
    model: str = dataclasses.field(default=MODEL, metadata={
        "help": "vgg11 is VGG-A (the tutorial's); *_bn: Conv -> BatchNorm -> ReLU (the CIFAR-native VGGs: the "
                "paper's head on the 512-d the last pool leaves at 32x32)", "choices": list(VGG_ARCHS)})
    image_size: int = dataclasses.field(default=32, metadata={
        "help": "32: CIFAR-native (512-d flatten); 224: the tutorial's resize 256 + crop 224", "choices": [32, 224]})
    epochs: int = dataclasses.field(default=30, metadata={"help": "training epochs"})
    batch_size: int = dataclasses.field(default=128, metadata={"help": "global batch size"})
    schedule: str = dataclasses.field(default="onecycle", metadata={
        "help": "lr schedule; 'plateau' is the paper's rule (lr/10 when val accuracy stalls, at most 3 times)",
        "choices": ["onecycle", "cosine", "step", "constant", "plateau"]})
    lr: float = dataclasses.field(default=0.05, metadata={"help": "peak lr (onecycle) or initial lr; paper: 0.01"})
    momentum: float = dataclasses.field(default=0.9, metadata={"help": "SGD momentum (paper: 0.9)"})
    nesterov: bool = dataclasses.field(default=True, metadata={"help": "Nesterov momentum (paper: false)"})
    weight_decay: float = dataclasses.field(default=5e-4, metadata={"help": "coupled L2, torch SGD style (paper: 5e-4)"})
    dropout: float = dataclasses.field(default=0.5, metadata={"help": "dropout before the 2nd and 3rd Linear (paper: 0.5)"})
    hidden: int = dataclasses.field(default=4096, metadata={
        "help": "width of the two hidden Linear layers (paper: 4096; CIFAR ports often use 512)",
        "check": at_least(1)})
    label_smoothing: float = dataclasses.field(default=0.1, metadata={"help": "0 for the paper's plain cross-entropy"})
    warmup: float = dataclasses.field(default=0.0, metadata={
        "help": "cosine: share of all steps with a linear warm-up from 0 to --lr, then cosine decay to 0",
        "check": in_range(0, 1, high_open=True)})
    ema_decay: float = dataclasses.field(default=0.0, metadata={
        "help": "keep an exponential moving average of the weights and BatchNorm statistics with this decay "
                "(e.g. 0.999; 0: none); validation and test evaluate the average",
        "check": in_range(0, 1, high_open=True)})
    tta: int = dataclasses.field(default=0, metadata={
        "help": "also score the test set with test-time augmentation: 1 averages each image and its mirror, 2 "
                "also both moved 2 pixels up-left and down-right (summary: tta_accuracy)", "choices": [0, 1, 2]})
    plateau_patience: int = dataclasses.field(default=2, metadata={"help": "epochs without gain before lr/10 (plateau)"})
    val_fraction: float = dataclasses.field(default=0.1, metadata={"help": "random seeded share of train for validation"})
    limit: int | None = dataclasses.field(default=None, metadata={
        "help": "use at most N training and N test images (quick runs)"})
    precision: str = precision_field()
    seed: int = dataclasses.field(default=0, metadata={"help": "init, split, data order and augmentation"})
    num_devices: int | None = dataclasses.field(default=None, metadata={"help": "devices for data parallel (all)"})
    resume: bool = dataclasses.field(default=False, metadata={"help": "continue from the newest checkpoint"})
    quiet: bool = dataclasses.field(default=False, metadata={"help": "no progress bars"})


    def check(self) -> None:
        if self.warmup and self.schedule != "cosine":
            raise ConfigError("warmup", f"applies to --schedule cosine, not {self.schedule}", self.warmup)


def paper_recipe() -> Config:
    """Simonyan & Zisserman: SGD lr 1e-2, momentum 0.9, wd 5e-4, dropout 0.5, lr/10 on plateau (3 times)."""
    return Config(schedule="plateau", lr=0.01, nesterov=False, label_smoothing=0.0, epochs=74)


def transforms(image_size: int):
    """(train, eval) transforms: crop+flip at 32; resize 256 + random/center crop 224 at 224."""
    mean, std = augment.CIFAR10_MEAN, augment.CIFAR10_STD
    if image_size == 32:
        return partial(augment.cifar_train_transform, mean=mean, std=std), partial(augment.eval_transform,
                                                                                     mean=mean, std=std)

    def train(key, images):
        k_crop, k_flip = jax.random.split(key)
        crops = augment.scale_jitter_crop(k_crop, images, crop=224, min_side=256, max_side=256)
        return augment.normalize(augment.random_flip(k_flip, crops) / 255.0, mean, std)  # float input: [0, 1]

    def evaluate(images):
        return augment.normalize(augment.resize_center_crop(images, resize=256, crop=224) / 255.0, mean, std)

    return train, evaluate


def build_state(cfg: Config, steps_per_epoch: int, policy: Policy) -> TrainState:
    """The step-0 TrainState of a run with ``cfg``; also the template its checkpoints restore into."""
    model = jaxvgg.create_model(cfg.model, num_classes=10, policy=policy, dropout_rate=cfg.dropout, hidden=cfg.hidden)
    key_init, key_train = jax.random.split(jax.random.PRNGKey(cfg.seed))
    variables = jaxvgg.init_params(cfg.model, key_init, 10, (cfg.image_size, cfg.image_size, 3),
                                   dropout_rate=cfg.dropout, hidden=cfg.hidden)  # and batch_stats for BN models
    warmup = {"warmup_fraction": cfg.warmup} if cfg.warmup else {}
    lr = cfg.lr if cfg.schedule == "plateau" else optim.make_schedule(
        cfg.schedule, cfg.lr, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, **warmup)
    tx = optim.sgd(lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    return TrainState.for_model(cfg.model, model, variables, tx, rng=key_train, label_smoothing=cfg.label_smoothing,
                                ema_decay=cfg.ema_decay)


def samples_and_tta(predictions: Predictions, state: TrainState, test: data.Dataset, eval_tf, tta: int,
                    workdir) -> tuple[dict, list]:
    """The report's extras: the first nine test images with their true and predicted classes, and with
    ``tta`` the test set scored again over its test-time views (`evaluation.tta_log_probs`)."""
    entries = {}
    if tta:
        log_probs = evaluation.tta_log_probs(state, test, eval_tf, tta)
        entries = {"tta_level": tta, "tta_accuracy": metrics.accuracy(test.labels, log_probs.argmax(axis=1)),
                   "tta_loss": evaluation.nll(log_probs, test.labels)}
    return entries, [plots.plot_image_grid(test.images[:9], test.labels[:9], predictions.predicted[:9],
                                           data.CIFAR10_CLASSES, workdir / "test_samples.png")]


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__, launch=True)
    policy = default_policy(cfg.model, cfg.precision)
    label = model_label(cfg.model)
    workdir = prepare_workdir(cfg.workdir, cfg, cfg.resume, policy_record(policy))
    started = time.perf_counter()

    train, val, test = load_splits("cifar10", cfg.data_dir, cfg.limit, cfg.val_fraction, cfg.seed)
    state = build_state(cfg, check_batch_size(cfg.batch_size, train), policy)
    parameters = jaxvgg.count_params(state.params)
    print(f"{label}: {parameters:,} parameters; {policy.describe()}")

    train_tf, eval_tf = transforms(cfg.image_size)
    plateau = cfg.plateau_patience if cfg.schedule == "plateau" else None
    state, history = fit(state, train, val, fit_config(cfg, workdir, plateau_patience=plateau),
                         train_transform=train_tf, eval_transform=eval_tf)
    run = {"model": cfg.model, "train_time_s": time.perf_counter() - started, "parameters": parameters,
           **policy_record(policy)}
    # the test set: every number and figure the tutorial looks at (every process computes its share)
    summary = evaluate_and_report(state, test, eval_tf, workdir, history, title=f"{label} on CIFAR-10", summary=run,
                                  groups=metrics.CIFAR10_GROUPS, started=started,
                                  extra=partial(samples_and_tta, state=state, test=test, eval_tf=eval_tf, tta=cfg.tta,
                                                workdir=workdir))
    if summary:
        within = summary["superclass"]["within_group_error_fraction"]
        tta = f" ({summary['tta_accuracy']:.4f} with level-{cfg.tta} TTA)" if cfg.tta else ""
        print(f"test accuracy {summary['test_accuracy']:.4f}{tta}, test loss {summary['test_loss']:.4f}; "
              f"vehicle errors within vehicles {within['vehicle']}, animal errors within animals "
              f"{within['animal']}; outputs in {workdir}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main, sys.argv[1:]))
