"""The PyTorch baseline of ``experiments.cifar_vgg``: the same network (torch_ref), data split, augmentation,
optimizer and schedule, trained by plain PyTorch, to tell a defect of jaxvgg's training from a limit of the recipe.

    python scripts/torch_cifar_vgg.py --data-dir ../shared/data --model vgg11_bn --limit 10000 --epochs 8 \\
        --lr 0.1 --dropout 0 --out runs/torch_vgg11_bn.json
    python -m experiments.cifar_vgg --data-dir ../shared/data --model vgg11_bn --limit 10000 --epochs 8 \\
        --lr 0.1 --dropout 0 --workdir runs/jax_vgg11_bn                # the same run in jaxvgg

Recipe, as cifar_vgg's: SGD (momentum 0.9, Nesterov, coupled weight decay), torch ``OneCycleLR`` stepped per
batch (``cycle_momentum=False``, as `jaxvgg.optim`'s onecycle), cross-entropy with label smoothing,
RandomCrop(32, padding=4) + RandomHorizontalFlip per image, the CIFAR-10 mean/std, batches without the last
partial one. The float32 run's test accuracy (running BatchNorm statistics) and per-epoch history go to ``--out``
(JSON).
"""

from __future__ import annotations

import argparse
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
from torch_ref.models import DEPTHS, VGG  # noqa: E402

MODELS = tuple(f"vgg{d}{bn}" for d in DEPTHS for bn in ("", "_bn"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None, help="folder with cifar-10-binary.tar.gz (else $JAXVGG_DATA_DIR)")
    p.add_argument("--model", default="vgg11_bn", choices=MODELS, help="a CIFAR-native VGG of torch_ref")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="OneCycleLR's max_lr")
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
    args = p.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: must be >= 1 (got {getattr(args, name)})")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout: must be in [0, 1) (got {args.dropout})")
    return args


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
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps_per_epoch * args.epochs,
                                                cycle_momentum=False)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}: "
          f"{sum(p.numel() for p in model.parameters()):,} parameters; {steps_per_epoch} steps per epoch")

    history = []
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
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
            sums += (float(loss.detach()) * len(idx), int((out.argmax(1) == y).sum()), len(idx))
        record = {"epoch": epoch, "train_loss": sums[0] / sums[2], "train_accuracy": sums[1] / sums[2],
                  "time_s": time.perf_counter() - t0}
        if len(x_val):
            v = evaluate(model, x_val, y_val)
            record.update(val_loss=v["loss"], val_accuracy=v["accuracy"])
        history.append(record)
        print("epoch {epoch}: train loss {train_loss:.4f} acc {train_accuracy:.4f}".format(**record)
              + (" | val acc {val_accuracy:.4f}".format(**record) if "val_accuracy" in record else "")
              + f" | {record['time_s']:.0f} s", flush=True)
    result = {"model": args.model, "config": vars(args), "history": history,
              "test": evaluate(model, np.asarray(test.images), np.asarray(test.labels).astype(np.int64)),
              "wall_time_s": time.perf_counter() - started}
    print(f"test accuracy {result['test']['accuracy']:.4f}, test loss {result['test']['loss']:.4f}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
