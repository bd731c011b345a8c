"""Figures of a run (PNG files, Agg backend); `jaxvgg.report` gathers them into report.md.

Every plot function writes one PNG to `path`, closes its figure and returns the path as a Path.
A run's history is the dict the training engine writes as history.json:
  {"batch": {"step", "epoch" (float epoch units), "loss", "accuracy", "lr"},
   "epoch": {"epoch" (1, 2, ...), "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "time_s"}}
where val_* may be missing or hold None for epochs without validation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from jaxvgg.metrics import ewa, moving_mean  # noqa: E402

_DPI = 110
_FAINT = 0.25  # alpha of raw per-batch curves drawn under their smoothed version


# ----------------------------------------------------------------------------- helpers


def _save(fig, path) -> Path:
    """Write `fig` to `path` as PNG (creating parent folders), close it and return the Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=_DPI, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path


def _series(values) -> np.ndarray:
    """A float array from a list that may hold None (None -> NaN)."""
    if values is None:
        return np.array([], dtype=np.float64)
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _points(xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (x, y) where y is present and finite; x and y may be lists holding None."""
    xs, ys = _series(xs), _series(ys)
    n = min(xs.size, ys.size)
    xs, ys = xs[:n], ys[:n]
    keep = np.isfinite(xs) & np.isfinite(ys)
    return xs[keep], ys[keep]


def _log_scale_if_positive(ax, *arrays) -> None:
    """Use a log y axis when every finite value drawn is positive (a loss of exactly 0 stays linear)."""
    finite = np.concatenate([np.ravel(a)[np.isfinite(np.ravel(a))] for a in arrays] or [np.array([])])
    if finite.size and np.all(finite > 0):
        ax.set_yscale("log")
        if np.log10(finite.max() / finite.min()) < 1.5:
            # few decades: label the minor ticks too, as plain numbers ("2", "0.9") rather than "2x10^0"
            plain = FuncFormatter(lambda value, _: f"{value:g}")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(plain)


def _display_image(image: np.ndarray):
    """(H, W, C) uint8 or [0, 1] float image -> (array, cmap) for imshow; C == 1 shows in gray."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(f"each image must be (H, W, C) with C in (1, 3, 4), got shape {image.shape}")
    if image.shape[-1] == 1:
        return image[..., 0], "gray"
    return image, None


def _check_images(images, n_labels: int, name: str = "true_labels") -> np.ndarray:
    """Validate a (N, H, W, C) image batch against N labels."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    if images.shape[0] != n_labels:
        raise ValueError(f"images has {images.shape[0]} entries but {name} has {n_labels}")
    return images


def _image_vmax(images: np.ndarray) -> float:
    """255 for integer images, 1 for float images (imshow's range for gray images)."""
    return 255.0 if np.issubdtype(images.dtype, np.integer) else 1.0


# ----------------------------------------------------------------------------- training curves


def _history_panel(ax, history: Mapping, key: str, ewa_alpha: float, color=None, run: str | None = None,
                   raw: bool = True) -> list[np.ndarray]:
    """Draw one metric (loss or accuracy) of one run: faint batch curve, its EWA, val markers."""
    batch, epoch = history.get("batch", {}) or {}, history.get("epoch", {}) or {}
    prefix = f"{run}: " if run else ""
    drawn = []
    x_batch, y_batch = _points(batch.get("epoch"), batch.get(key))
    if y_batch.size:
        if raw:
            ax.plot(x_batch, y_batch, lw=0.6, alpha=_FAINT, color=color or "C0", label=f"{prefix}train (batch)")
        smooth = ewa(y_batch, ewa_alpha)
        ax.plot(x_batch, smooth, lw=1.6, color=color or "C0", label=f"{prefix}train (EWA α={ewa_alpha:g})")
        drawn += [y_batch] if raw else [smooth]
    else:  # no per-batch log: fall back on the per-epoch training means
        x_train, y_train = _points(epoch.get("epoch"), epoch.get(f"train_{key}"))
        if y_train.size:
            ax.plot(x_train, y_train, "-", lw=1.6, color=color or "C0", label=f"{prefix}train (epoch mean)")
            drawn.append(y_train)
    x_val, y_val = _points(epoch.get("epoch"), epoch.get(f"val_{key}"))
    if y_val.size:
        ax.plot(x_val, y_val, "o--", ms=5, lw=1.0, color=color or "C1", label=f"{prefix}validation (epoch end)")
        drawn.append(y_val)
    return drawn


def plot_history(history: Mapping, path, ewa_alpha: float = 0.05, label: str | None = None) -> Path:
    """Loss and accuracy of one run against epochs.

    Each panel shows the per-batch training curve (faint), its exponentially weighted average
    (solid) and the validation value at each epoch end (markers); the loss axis is logarithmic.

    Args:
        history: the run's history dict (see the module docstring).
        path: PNG file to write.
        ewa_alpha: smoothing weight of the newest batch, in (0, 1].
        label: run name for the title.

    Returns:
        The PNG path.
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    loss_drawn = _history_panel(ax_loss, history, "loss", ewa_alpha)
    _history_panel(ax_acc, history, "accuracy", ewa_alpha)
    _log_scale_if_positive(ax_loss, *loss_drawn)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(name.capitalize())
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle(f"Training history{f' — {label}' if label else ''}")
    return _save(fig, path)


def plot_history_comparison(histories: Mapping[str, Mapping], path, ewa_alpha: float = 0.05) -> Path:
    """Several runs on the same axes: smoothed training loss/accuracy and validation per epoch.

    Args:
        histories: run name -> history dict (e.g. {"lr 0.01": h1, "lr 0.005": h2}).
        path: PNG file to write.
        ewa_alpha: smoothing weight of the newest batch, in (0, 1].

    Returns:
        The PNG path.
    """
    if not histories:
        raise ValueError(f"histories must hold at least one run, got {dict(histories)!r}")
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    loss_drawn = []
    for i, (run, history) in enumerate(histories.items()):
        color = f"C{i % 10}"
        loss_drawn += _history_panel(ax_loss, history, "loss", ewa_alpha, color=color, run=run, raw=False)
        _history_panel(ax_acc, history, "accuracy", ewa_alpha, color=color, run=run, raw=False)
    _log_scale_if_positive(ax_loss, *loss_drawn)
    for ax, name in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.set_title(f"{name.capitalize()}: solid = train EWA, markers = validation")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle("Run comparison")
    return _save(fig, path)


def plot_moving_mean_loss(losses, window: int, path) -> Path:
    """Per-batch training loss with its trailing moving mean.

    Args:
        losses: 1-D per-batch losses.
        window: moving-mean window in batches.
        path: PNG file to write.

    Returns:
        The PNG path.
    """
    losses = _series(losses)
    if losses.size == 0:
        raise ValueError("losses must be non-empty, got 0 values")
    steps = np.arange(1, losses.size + 1)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, losses, lw=0.6, alpha=_FAINT * 1.5, color="C0", label="batch loss")
    ax.plot(steps, moving_mean(losses, window), lw=1.8, color="C3", label=f"moving mean ({window} batches)")
    _log_scale_if_positive(ax, losses)
    ax.set_xlabel("batch")
    ax.set_ylabel("loss")
    ax.set_title(f"Training loss, moving mean over {window} batches")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_lr_range(lrs, losses, smoothed, path, suggestions: Mapping[str, float] | None = None) -> Path:
    """Learning-rate range test: loss against learning rate on a log axis.

    The y range stops at 1.5x the highest smoothed loss before its minimum, so the final
    divergence does not flatten the interesting part.

    Args:
        lrs: 1-D learning rates tried, one per step.
        losses: raw loss at each step.
        smoothed: smoothed loss at each step.
        path: PNG file to write.
        suggestions: name -> suggested learning rate, drawn as labelled vertical lines.

    Returns:
        The PNG path.
    """
    lrs, losses, smoothed = _series(lrs), _series(losses), _series(smoothed)
    if not lrs.size == losses.size == smoothed.size:
        raise ValueError(
            f"lrs, losses and smoothed must have equal lengths, got {lrs.size}, {losses.size}, {smoothed.size}"
        )
    if lrs.size == 0:
        raise ValueError("lrs must be non-empty, got 0 values")
    if not np.all(lrs > 0):  # also catches NaN
        raise ValueError(f"lrs must be positive for a log axis, got min {np.nanmin(lrs)}")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(lrs, losses, lw=0.8, alpha=0.4, color="C0", label="loss")
    ax.plot(lrs, smoothed, lw=1.8, color="C0", label="smoothed loss")
    for i, (name, lr) in enumerate((suggestions or {}).items()):
        ax.axvline(lr, ls="--", lw=1.2, color=f"C{(i + 1) % 10}", label=f"{name}: {lr:.2e}")
    ax.set_xscale("log")
    finite = np.isfinite(smoothed)
    if finite.any():
        best = int(np.nanargmin(np.where(finite, smoothed, np.nan)))
        top, bottom = np.nanmax(smoothed[: best + 1]), np.nanmin(np.where(np.isfinite(losses), losses, np.nan))
        if np.isfinite(top) and np.isfinite(bottom) and top > bottom:
            ax.set_ylim(bottom - 0.05 * (top - bottom), top + 0.5 * abs(top))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.set_title("Learning-rate range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


# ----------------------------------------------------------------------------- evaluation figures


def plot_confusion_matrix(cm, class_names: Sequence[str], path, normalize: bool = False) -> Path:
    """Heatmap of a confusion matrix, counts written in each cell (up to 30 classes).

    Args:
        cm: (C, C) counts, rows true, columns predicted.
        class_names: C names.
        path: PNG file to write.
        normalize: colour each row as fractions of its true class; cells show the fraction
            and the count (the count is dropped above 12 classes to stay readable).

    Returns:
        The PNG path.
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] != len(class_names):
        raise ValueError(f"cm must be ({len(class_names)}, {len(class_names)}) to match class_names, got {cm.shape}")
    n = cm.shape[0]
    if normalize:
        with np.errstate(invalid="ignore", divide="ignore"):
            shown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    else:
        shown = cm
    size = max(4.5, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    if n <= 30:  # beyond that the numbers are unreadable
        threshold = np.nanmax(shown) / 2 if np.size(shown) else 0
        for i in range(n):
            for j in range(n):
                text = f"{int(cm[i, j])}"
                if normalize:  # the fraction, and the count under it while cells are big enough
                    text = f"{shown[i, j]:.2f}\n({text})" if n <= 12 else f"{shown[i, j]:.2f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if n > 12 else 9,
                        color="white" if shown[i, j] > threshold else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    return _save(fig, path)


def plot_image_grid(images, true_labels, pred_labels, class_names: Sequence[str], path, ncols: int = 3,
                    title: str = "true / predicted") -> Path:
    """Grid of images titled "true / pred", wrong predictions in red.

    Args:
        images: (N, H, W, C) uint8 (or float in [0, 1]) images; C == 1 is shown in gray.
        true_labels: int (N,) true classes.
        pred_labels: int (N,) predicted classes, or None to title with the true class only.
        class_names: names indexed by class.
        path: PNG file to write.
        ncols: images per row.
        title: figure title.

    Returns:
        The PNG path.
    """
    true_labels = np.asarray(true_labels).astype(int)
    images = _check_images(images, true_labels.size)
    if pred_labels is not None:
        pred_labels = np.asarray(pred_labels).astype(int)
        if pred_labels.shape != true_labels.shape:
            raise ValueError(f"pred_labels must have shape {true_labels.shape}, got {pred_labels.shape}")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, max(1, images.shape[0]))
    nrows = max(1, math.ceil(images.shape[0] / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.4 * ncols, 2.5 * nrows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= images.shape[0]:
            continue
        array, cmap = _display_image(images[i])
        ax.imshow(array, cmap=cmap, vmin=0, vmax=_image_vmax(images), interpolation="nearest")
        true_name = class_names[true_labels[i]]
        if pred_labels is None:
            ax.set_title(true_name, fontsize=10)
        else:
            wrong = pred_labels[i] != true_labels[i]
            ax.set_title(f"{true_name} / {class_names[pred_labels[i]]}", fontsize=10,
                         color="red" if wrong else "black")
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_topk_predictions(images, topk_indices, topk_probs, true_labels, class_names: Sequence[str], path) -> Path:
    """Each image beside a horizontal bar chart of its k most probable classes.

    The true class's bar is green, the others blue; an image title is red when top-1 is wrong.

    Args:
        images: (N, H, W, C) uint8 (or float in [0, 1]) images.
        topk_indices: int (N, k) class indices, most probable first.
        topk_probs: float (N, k) their probabilities.
        true_labels: int (N,) true classes.
        class_names: names indexed by class.
        path: PNG file to write.

    Returns:
        The PNG path.
    """
    true_labels = np.asarray(true_labels).astype(int)
    images = _check_images(images, true_labels.size)
    topk_indices, topk_probs = np.asarray(topk_indices).astype(int), np.asarray(topk_probs, dtype=np.float64)
    if topk_indices.shape != topk_probs.shape or topk_indices.shape[:1] != true_labels.shape:
        raise ValueError(
            f"topk_indices and topk_probs must both be ({true_labels.size}, k), "
            f"got {topk_indices.shape} and {topk_probs.shape}"
        )
    n, k = topk_indices.shape
    fig, axes = plt.subplots(n, 2, figsize=(8, max(2.0, 0.35 * k + 0.8) * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 2]})
    for i in range(n):
        ax_image, ax_bars = axes[i]
        array, cmap = _display_image(images[i])
        ax_image.imshow(array, cmap=cmap, vmin=0, vmax=_image_vmax(images), interpolation="nearest")
        ax_image.axis("off")
        wrong = topk_indices[i, 0] != true_labels[i]
        ax_image.set_title(f"true: {class_names[true_labels[i]]}", fontsize=10, color="red" if wrong else "black")
        colors = ["tab:green" if c == true_labels[i] else "tab:blue" for c in topk_indices[i]]
        ax_bars.barh(range(k), topk_probs[i], color=colors)
        ax_bars.set_yticks(range(k), [class_names[c] for c in topk_indices[i]])
        ax_bars.invert_yaxis()  # most probable on top
        ax_bars.set_xlim(0, 1)
        ax_bars.set_xlabel("probability")
        for j, p in enumerate(topk_probs[i]):
            ax_bars.text(min(p + 0.01, 0.9), j, f"{p:.2f}", va="center", fontsize=8)
    fig.suptitle(f"Top-{k} predictions (green = true class)")
    fig.tight_layout()
    return _save(fig, path)


def plot_roc(curves: Mapping[str, Mapping], path) -> Path:
    """One-vs-rest ROC curves with their AUC in the legend.

    Args:
        curves: name -> dict with "fpr", "tpr" and "auc" (e.g. metrics.roc_for_class results).
        path: PNG file to write.

    Returns:
        The PNG path.
    """
    if not curves:
        raise ValueError(f"curves must hold at least one curve, got {dict(curves)!r}")
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for i, (name, curve) in enumerate(curves.items()):
        ax.plot(curve["fpr"], curve["tpr"], lw=1.5, color=f"C{i % 10}", label=f"{name} (AUC {curve['auc']:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="gray", label="chance (AUC 0.5)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curves (one vs rest)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="lower right")
    return _save(fig, path)


def plot_reject_curves(curves: Mapping, path, exact: Mapping | None = None) -> Path:
    """Reject option: (a) errors among accepted vs threshold, (b) error rate of accepted vs rejected.

    Args:
        curves: metrics.reject_option_curves result.
        path: PNG file to write.
        exact: optional metrics.reject_curve_by_count result, drawn as a line in panel (b).

    Returns:
        The PNG path.
    """
    # constrained layout leaves room for the twin axis label between the panels
    fig, (ax_a, ax_b) = plt.subplots(1, 2, figsize=(13, 4.8), layout="constrained")
    errors_line = ax_a.plot(curves["thresholds"], curves["n_errors_accepted"], "-", lw=1.8, color="C3",
                            label="errors among accepted (left axis)")
    # accepted counts are orders of magnitude larger than errors: their own axis keeps errors readable
    ax_accepted = ax_a.twinx()
    accepted_line = ax_accepted.plot(curves["thresholds"], curves["n_accepted"], "-", lw=1.0, alpha=0.6,
                                     color="C0", label="accepted (right axis)")
    ax_accepted.set_ylabel("number of accepted points")
    ax_a.set_xlabel("confidence threshold t (accept if max prob ≥ t)")
    ax_a.set_ylabel("number of errors among accepted points")
    ax_a.set_title("(a) Errors among accepted points vs threshold")
    ax_a.legend(handles=errors_line + accepted_line, fontsize="small")
    if exact is not None:
        ax_b.plot(exact["n_rejected"], exact["error_rate_accepted"], "-", lw=1.2, color="C0",
                  label="reject k least confident")
    ax_b.plot(curves["n_rejected"], curves["error_rate_accepted"], "o", ms=3, color="C3", label="thresholds")
    ax_b.set_xlabel("number of rejected points (symlog)")
    ax_b.set_xscale("symlog", linthresh=10)  # the errors go in the first few percent; linear would hide them
    ax_b.set_ylabel("error rate of accepted points")
    ax_b.set_title("(b) Error rate of accepted vs number rejected")
    ax_b.legend(fontsize="small")
    for ax in (ax_a, ax_b):
        ax.grid(True, alpha=0.3)
    fig.suptitle("Reject option")
    return _save(fig, path)


def plot_tsne(embedding, labels, class_names: Sequence[str], path) -> Path:
    """Scatter of a 2-D embedding (e.g. metrics.tsne_embedding) coloured by class.

    Args:
        embedding: float (N, 2) coordinates.
        labels: int (N,) classes.
        class_names: names indexed by class.
        path: PNG file to write.

    Returns:
        The PNG path.
    """
    embedding, labels = np.asarray(embedding, dtype=np.float64), np.asarray(labels).astype(int)
    if embedding.ndim != 2 or embedding.shape[1] != 2 or embedding.shape[0] != labels.size:
        raise ValueError(f"embedding must be ({labels.size}, 2) to match labels, got {embedding.shape}")
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    fig, ax = plt.subplots(figsize=(8, 6.5))
    for cls in classes:
        chosen = labels == cls
        ax.scatter(embedding[chosen, 0], embedding[chosen, 1], s=8, alpha=0.75, color=cmap(cls % cmap.N),
                   label=class_names[cls])
    ax.set_xlabel("t-SNE dimension 1")
    ax.set_ylabel("t-SNE dimension 2")
    ax.set_title("t-SNE embedding of features, coloured by true class")
    ax.legend(fontsize="small", markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5),
              ncol=max(1, math.ceil(len(classes) / 20)))
    return _save(fig, path)


def plot_per_class_vs_count(per_class_acc, counts, class_names: Sequence[str], path) -> Path:
    """Scatter of each class's accuracy against its number of examples, points named.

    Args:
        per_class_acc: float (C,) accuracy per class (NaN is skipped).
        counts: int (C,) examples per class (e.g. in the training set).
        class_names: C names.
        path: PNG file to write.

    Returns:
        The PNG path.
    """
    per_class_acc, counts = _series(per_class_acc), _series(counts)
    if not per_class_acc.size == counts.size == len(class_names):
        raise ValueError(
            f"per_class_acc, counts and class_names must have equal lengths, "
            f"got {per_class_acc.size}, {counts.size}, {len(class_names)}"
        )
    fig, ax = plt.subplots(figsize=(8, 5.5))
    keep = np.isfinite(per_class_acc)
    ax.scatter(counts[keep], per_class_acc[keep], s=30, color="C0")
    ax.margins(0.12)  # room for the names beside the edge points
    for name, x, y in zip(np.asarray(class_names, dtype=object)[keep], counts[keep], per_class_acc[keep]):
        ax.annotate(str(name), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("number of examples")
    ax.set_ylabel("accuracy")
    ax.set_title("Per-class accuracy vs number of examples")
    ax.grid(True, alpha=0.3)
    return _save(fig, path)
