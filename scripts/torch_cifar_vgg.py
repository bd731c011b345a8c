"""The PyTorch baseline of ``experiments.cifar_vgg``: the same network (torch_ref), data split, augmentation,
optimizer and schedule, trained by plain PyTorch, to tell a defect of jaxvgg's training from a limit of the recipe.

    python scripts/torch_cifar_vgg.py --data-dir ../shared/data --model vgg11_bn --limit 10000 --epochs 8 \\
        --lr 0.1 --dropout 0 --out runs/torch_vgg11_bn.json
    python -m experiments.cifar_vgg --data-dir ../shared/data --model vgg11_bn --limit 10000 --epochs 8 \\
        --lr 0.1 --dropout 0 --workdir runs/jax_vgg11_bn                # the same run in jaxvgg

Recipe, as cifar_vgg's: SGD (momentum 0.9, Nesterov, coupled weight decay), torch ``OneCycleLR`` stepped per
batch (``cycle_momentum=False``, as `jaxvgg.optim`'s onecycle) or, with ``--schedule cosine --warmup F``, a
``LambdaLR`` of `jaxvgg.optim`'s warm-up + cosine closed form; cross-entropy with label smoothing,
RandomCrop(32, padding=4) + RandomHorizontalFlip per image, the CIFAR-10 mean/std, batches without the last
partial one. ``--ema-decay`` keeps the moving average of `jaxvgg.optim.ema_update` (parameters and BatchNorm
buffers; evaluation uses it) and ``--tta`` scores the test set over `jaxvgg.augment.tta_views`, as cifar_vgg's
flags do. The float32 run's test accuracy (running BatchNorm statistics) and per-epoch history go to ``--out``
(JSON); with ``--workdir`` every epoch ends in a checkpoint there, and ``--resume 1`` continues from it.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's torch_ref, jaxvgg, experiments

from experiments.common import load_splits  # noqa: E402
from jaxvgg import augment  # noqa: E402
from jaxvgg.checkpoint import write_json  # noqa: E402
from jaxvgg.models import VGG_ARCHS  # noqa: E402 -- the eight VGG names, torch_ref's as the registry's
from torch_ref.models import DEPTHS, VGG  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with cifar-10-binary.tar.gz (else $JAXVGG_DATA_DIR)")
    p.add_argument("--model", default="vgg11_bn", choices=VGG_ARCHS, help="a CIFAR-native VGG of torch_ref")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="OneCycleLR's max_lr, or the cosine's peak")
    p.add_argument("--schedule", default="onecycle", choices=["onecycle", "cosine"])
    p.add_argument("--warmup", type=float, default=0.0, help="cosine: share of the steps warming up from 0")
    p.add_argument("--ema-decay", type=float, default=0.0, help="moving average of the weights (0: none)")
    p.add_argument("--tta", type=int, default=0, choices=[0, 1, 2], help="test-time views (cifar_vgg's --tta)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--nesterov", type=int, default=1, choices=[0, 1])
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--val-fraction", type=float, default=0.1, help="as cifar_vgg (the same seeded split)")
    p.add_argument("--limit", type=int, default=None, help="at most N training and N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="JSON file for the history and test accuracy")
    p.add_argument("--workdir", default=None, help="folder for the checkpoint written after every epoch")
    p.add_argument("--resume", type=int, default=0, choices=[0, 1], help="continue from --workdir's checkpoint")
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1 (got {getattr(args, name)})")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout: must be in [0, 1) (got {args.dropout})")
    for name in ("warmup", "ema_decay"):
        if not 0 <= getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be in [0, 1) (got {getattr(args, name)})")
    if args.warmup and args.schedule != "cosine":
        p.error(f"--warmup: applies to --schedule cosine, not {args.schedule} (got {args.warmup})")
    if args.resume and not args.workdir:
        p.error("--resume: needs --workdir (got 1)")
    return args


def warmup_cosine(total_steps: int, warmup: float):
    """`jaxvgg.optim.make_schedule("cosine", warmup_fraction=warmup)` as LambdaLR's factor of step t."""
    w = round(warmup * total_steps)

    def factor(t: int) -> float:
        if t < w:
            return t / w
        return 0.5 * (1 + math.cos(math.pi * min(t - w, total_steps - w) / (total_steps - w)))

    return factor


class EMA:
    """`jaxvgg.optim.ema_update` in torch: decay ``min(decay, (1 + t) / (10 + t))`` after step t, over the
    parameters and floating buffers (BatchNorm's running statistics); integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.model, self.decay = copy.deepcopy(model), decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for (_, avg), (_, new) in zip(self.model.state_dict().items(), model.state_dict().items()):
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(new, alpha=1 - d)
            else:
                avg.copy_(new)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> normalised float32 NCHW (ToTensor + Normalize)."""
    mean = torch.tensor(augment.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(augment.CIFAR10_STD).view(1, 3, 1, 1)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - mean) / std


def crop_flip(images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, padding: int = 4) -> np.ndarray:
    """RandomCrop(H, padding) with zero padding at per-image (top, left) ``offsets`` into the padded image,
    then a horizontal flip where ``flips`` is True (`jaxvgg.augment.pad_and_crop` + ``flip_where``)."""
    n, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out = np.empty_like(images)
    for i, (top, left) in enumerate(offsets):
        crop = padded[i, top:top + h, left:left + w]
        out[i] = crop[:, ::-1] if flips[i] else crop
    return out


def random_crop_flip(images: np.ndarray, rng: np.random.Generator, padding: int = 4) -> np.ndarray:
    """`crop_flip` with offsets uniform in [0, 2 * padding] and flips with probability 0.5, per image."""
    n = len(images)
    return crop_flip(images, rng.integers(0, 2 * padding + 1, (n, 2)), rng.random(n) < 0.5, padding)


def tta_views(images: np.ndarray, level: int, shift: int = 2) -> list[tuple[float, np.ndarray]]:
    """`jaxvgg.augment.tta_views` on uint8 NHWC images: (weight, the view)."""
    if level == 0:
        return [(1.0, images)]
    mirror = images[:, :, ::-1]
    if level == 1:
        return [(0.5, images), (0.5, mirror)]
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    h, w = images.shape[1:3]
    moved = [padded[:, 2 * shift:2 * shift + h, 2 * shift:2 * shift + w], padded[:, :h, :w]]  # up-left, down-right
    return [(0.25, images), (0.25, mirror)] + [(0.125, m) for m in moved] + [(0.125, m[:, :, ::-1]) for m in moved]


@torch.no_grad()
def tta_accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, level: int, batch_size: int = 500) -> dict:
    """Accuracy and NLL of the weighted mean of the views' probabilities (`jaxvgg.evaluation.tta_log_probs`)."""
    model.eval()
    mean = np.zeros((len(images), 10))
    for weight, view in tta_views(images, level):
        for i in range(0, len(images), batch_size):
            out = model(to_tensor(view[i:i + batch_size])).double()
            mean[i:i + batch_size] += weight * torch.softmax(out, 1).numpy()
    log_mean = np.log(np.maximum(mean, np.finfo(np.float64).tiny))
    return {"accuracy": float(np.mean(mean.argmax(1) == labels)),
            "loss": float(-np.mean(log_mean[np.arange(len(labels)), labels]))}


def save_checkpoint(path: Path, state: dict) -> None:
    """``state`` (tensors, numbers, lists, dicts) to ``path``, atomically: a killed save leaves the last one."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int = 500) -> dict:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(images), batch_size):
        out = model(to_tensor(images[i:i + batch_size]))
        y = torch.from_numpy(labels[i:i + batch_size].astype(np.int64))
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return {"loss": loss / len(images), "accuracy": correct / len(images)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train, val, test = load_splits("cifar10", args.data_dir, args.limit, args.val_fraction, args.seed)
    x_train, y_train = np.asarray(train.images), np.asarray(train.labels).astype(np.int64)
    x_val, y_val = np.asarray(val.images), np.asarray(val.labels).astype(np.int64)

    depth = int(args.model[3:5])
    model = VGG(DEPTHS[depth], num_classes=10, image_size=32, dropout=args.dropout,
                batch_norm=args.model.endswith("_bn"))
    steps_per_epoch = len(x_train) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch-size {args.batch_size} is larger than the {len(x_train)} training images")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=bool(args.nesterov),
                          weight_decay=args.weight_decay)
    total_steps = steps_per_epoch * args.epochs
    if args.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total_steps, cycle_momentum=False)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, args.warmup))
    ema = EMA(model, args.ema_decay) if args.ema_decay else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; {steps_per_epoch} steps per epoch")

    history, first_epoch, spent = [], 1, 0.0
    checkpoint = Path(args.workdir) / "checkpoint.pt" if args.workdir else None
    if checkpoint is not None and checkpoint.exists() and not args.resume:
        raise SystemExit(f"error: --workdir: {checkpoint} holds a run; pass --resume 1 to continue it")
    if args.resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"]), opt.load_state_dict(saved["opt"]), sched.load_state_dict(saved["sched"])
        if ema is not None:
            ema.model.load_state_dict(saved["ema"])
        torch.set_rng_state(saved["torch_rng"])
        rng.bit_generator.state = saved["numpy_rng"]
        history, first_epoch, spent = saved["history"], saved["epoch"] + 1, saved["wall_time_s"]
        print(f"resumed from {checkpoint} after epoch {saved['epoch']}")
    scored = ema.model if ema is not None else model
    started = time.perf_counter() - spent
    for epoch in range(first_epoch, args.epochs + 1):
        model.train()
        t0, sums = time.perf_counter(), np.zeros(3)
        order = rng.permutation(len(x_train))
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            x, y = to_tensor(random_crop_flip(x_train[idx], rng)), torch.from_numpy(y_train[idx])
            out = model(x)
            loss = loss_fn(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                ema.update(model, (epoch - 1) * steps_per_epoch + s + 1)
            sums += (float(loss.detach()) * len(idx), int((out.argmax(1) == y).sum()), len(idx))
        record = {"epoch": epoch, "train_loss": float(sums[0] / sums[2]), "train_accuracy": float(sums[1] / sums[2]),
                  "time_s": time.perf_counter() - t0}
        if len(x_val):
            v = evaluate(scored, x_val, y_val)
            record.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
        history.append(record)
        print("epoch {epoch}: train loss {train_loss:.4f} acc {train_accuracy:.4f}".format(**record)
              + (" | val acc {val_accuracy:.4f}".format(**record) if "val_accuracy" in record else "")
              + f" | {record['time_s']:.0f} s", flush=True)
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(checkpoint, {"model": model.state_dict(), "opt": opt.state_dict(),
                                         "sched": sched.state_dict(), "ema": ema.model.state_dict() if ema else None,
                                         "torch_rng": torch.get_rng_state(), "numpy_rng": rng.bit_generator.state,
                                         "history": history, "epoch": epoch,
                                         "wall_time_s": time.perf_counter() - started})
    x_test, y_test = np.asarray(test.images), np.asarray(test.labels).astype(np.int64)
    result = {"model": args.model, "config": vars(args), "history": history,
              "test": evaluate(scored, x_test, y_test), "wall_time_s": time.perf_counter() - started}
    if args.tta:
        result["tta"] = tta_accuracy(scored, x_test, y_test, args.tta)
    print(f"test accuracy {result['test']['accuracy']:.4f}, test loss {result['test']['loss']:.4f}"
          + (f"; level-{args.tta} TTA {result['tta']['accuracy']:.4f}" if args.tta else ""))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
