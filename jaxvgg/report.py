"""The end of a run in one step: the test set's predictions, summary.json, the figures and report.md.

Every experiment ends with `evaluate_and_report`; what only one experiment looks at (a ROC curve, a
t-SNE, test-time augmentation) comes in through its ``extra`` callback:

    summary = evaluate_and_report(state, test, eval_tf, workdir, history, title="VGG-A on CIFAR-10",
                                  summary={"model": "vgg11", "train_time_s": 812.0}, started=t0)

`write_report` renders any JSON-like summary as markdown: scalars in one table, dicts as sections,
confusion matrices labelled by a sibling ``*names`` list, lists of dicts as tables.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable

import numpy as np

from jaxvgg import data, distributed, evaluation, metrics, parallel, plots
from jaxvgg.checkpoint import write_json
from jaxvgg.train import EvalTransform, TrainState


@dataclasses.dataclass(frozen=True, eq=False)
class Predictions:
    """A test set's predictions and scores, as the end-of-run figures and an ``extra`` callback read them."""

    log_probs: np.ndarray  # float64 (N, C), rows logsumexp to 0 (`evaluation.predict_log_probs`)
    probs: np.ndarray  # float64 (N, C), rows summing to 1 (`evaluation.probs_from_log_probs` of them)
    labels: np.ndarray  # int32 (N,)
    class_names: tuple[str, ...]
    scores: dict  # `metrics.summarize_classification` of them

    @property
    def predicted(self) -> np.ndarray:
        """The predicted class of every example: int (N,)."""
        return self.probs.argmax(axis=1)

    @property
    def loss(self) -> float:
        """Mean NLL of the labels (the test loss)."""
        return evaluation.nll(self.log_probs, self.labels)


Extra = Callable[[Predictions], tuple[dict, list[Path]]]  # -> (summary entries, figure paths)


def evaluate_and_report(state: TrainState, test: data.BatchSource, eval_transform: EvalTransform, workdir: Path,
                        history: dict, *, title: str, summary: dict, history_label: str | None = None,
                        groups: Mapping[str, Sequence[int]] | None = None, batch_size: int = 500,
                        extra: Extra | None = None, extra_md: str = "", started: float | None = None) -> dict:
    """Scores ``state`` on ``test`` and writes summary.json, history.png, confusion_matrix.png and report.md.

    Over several processes every process calls this (each predicts its share of the test set); only
    process 0 writes, and the others get ``{}`` back.

    Args:
      state, test, eval_transform: the trained state, the test `jaxvgg.data.BatchSource` and its transform.
      workdir: the run's folder. history: what `jaxvgg.train.fit` returned.
      title: the report's title (and the history plot's label unless ``history_label``).
      summary: the run's own entries (model, parameters, policy, train_time_s, ...).
      groups: superclasses for `metrics.summarize_classification` (e.g. `metrics.CIFAR10_GROUPS`).
      batch_size: test examples per forward pass.
      extra: more entries and figures from the `Predictions` (an experiment's own analysis).
      extra_md: markdown appended to the report.
      started: ``time.perf_counter()`` when the command began: the summary's ``wall_time_s``.

    Returns:
      The summary as written: test_accuracy, test_loss, epochs, then ``summary``, ``extra``'s
      entries and the classification scores.
    """
    log_probs = evaluation.predict_log_probs(state, test, eval_transform, batch_size,
                                             mesh=parallel.all_processes_mesh())
    if not distributed.is_main_process():
        return {}  # process 0 writes every file
    probs = evaluation.probs_from_log_probs(log_probs)
    scores = metrics.summarize_classification(test.labels, probs, test.class_names, groups)
    predictions = Predictions(log_probs, probs, np.asarray(test.labels), tuple(test.class_names), scores)
    figures = [plots.plot_history(history, workdir / "history.png", label=history_label or title),
               plots.plot_confusion_matrix(np.asarray(scores["confusion_matrix"]), test.class_names,
                                           workdir / "confusion_matrix.png")]
    entries, more_figures = extra(predictions) if extra is not None else ({}, [])
    summary = {"test_accuracy": scores["accuracy"], "test_loss": predictions.loss,
               "epochs": len(history["epoch"]["epoch"]), **summary, **entries}
    if started is not None:
        summary["wall_time_s"] = time.perf_counter() - started  # the whole command: data, training, analysis
    summary.update(scores)
    write_summary(workdir, summary)
    write_report(workdir, title, summary, [*figures, *more_figures], extra_md)
    return summary


def write_summary(workdir: Path, summary: dict) -> Path:
    """summary.json, written atomically (strict JSON: a NaN is an error, not a token)."""
    return write_json(Path(workdir) / "summary.json", summary, allow_nan=False)


# --- the markdown report ---------------------------------------------------------------------------

def _format_value(value) -> str:
    """A number or short value as markdown text; None and NaN read "n/a"."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{float(value):.6g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _is_scalar(value) -> bool:
    """True for what fits in one table cell."""
    return value is None or isinstance(value, (str, bool, int, float, np.generic))


def _is_matrix(value) -> bool:
    """True for a non-empty list of equal-length lists of scalars (or a 2-D array)."""
    value = value.tolist() if isinstance(value, np.ndarray) else value
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(row, (list, tuple)) and len(row) == len(value[0]) for row in value)
            and all(_is_scalar(x) for row in value for x in row))


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    """Markdown table lines."""
    lines = ["| " + " | ".join(_format_value(h) for h in header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_format_value(x) for x in row) + " |" for row in rows]
    return lines


def _matrix_names(siblings: Mapping, size: int) -> list[str] | None:
    """Row/column names for a matrix: a sibling "*names" list of the matrix's size."""
    for key, value in siblings.items():
        if str(key).endswith("names") and isinstance(value, (list, tuple)) and len(value) == size:
            return [str(v) for v in value]
    return None


def _render(key: str, value, siblings: Mapping, depth: int) -> list[str]:
    """Markdown lines for one non-scalar summary entry under a heading."""
    heading = "#" * min(depth, 6) + " " + str(key).replace("_", " ")
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if _is_matrix(value):
        rows = value
        names = _matrix_names(siblings, len(rows)) if len(rows) == len(rows[0]) else None
        if names is None:
            names = [str(i) for i in range(max(len(rows), len(rows[0])))]
        header = ["true \\ predicted"] + names[: len(rows[0])]
        return [heading, "", *_table(header, [[names[i], *row] for i, row in enumerate(rows)]), ""]
    if isinstance(value, Mapping):
        scalars = {k: v for k, v in value.items() if _is_scalar(v)}
        lines = [heading, ""]
        if scalars:
            lines += [*_table(["name", "value"], scalars.items()), ""]
        for k, v in value.items():
            if not _is_scalar(v):
                lines += _render(k, v, value, depth + 1)
        return lines
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, Mapping) for v in value):
        columns = list(dict.fromkeys(k for row in value for k in row))
        return [heading, "", *_table(columns, [[row.get(c) for c in columns] for row in value]), ""]
    if isinstance(value, (list, tuple)) and all(_is_scalar(v) for v in value):
        return [heading, "", ", ".join(_format_value(v) for v in value) or "(empty)", ""]
    return [heading, "", "```", str(value), "```", ""]


def write_report(
    workdir, title: str, summary: Mapping, figures: Sequence[str | os.PathLike], extra_md: str = ""
) -> Path:
    """Write `workdir/report.md`: every number of `summary` and every figure of the run.

    Top-level scalars form one table; dicts become sections with a name/value table; square
    lists of lists (a confusion matrix) become a table labelled by a sibling "*names" list of the
    same length (e.g. "class_names", "group_names"); lists of dicts become tables; figures are
    embedded with paths relative to `workdir`.

    Args:
        workdir: run folder; created if missing.
        title: report title.
        summary: JSON-like dict of results (e.g. metrics.summarize_classification output).
        figures: PNG paths to embed, in order.
        extra_md: markdown appended at the end.

    Returns:
        Path of the written report.md.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", ""]
    scalars = {k: v for k, v in summary.items() if _is_scalar(v)}
    if scalars:
        lines += ["## Summary", "", *_table(["metric", "value"], scalars.items()), ""]
    for key, value in summary.items():
        if not _is_scalar(value):
            lines += _render(key, value, summary, depth=2)
    if figures:
        lines += ["## Figures", ""]
        for figure in figures:
            figure = Path(figure)
            relative = Path(os.path.relpath(figure.resolve(), workdir.resolve())).as_posix()
            lines += [f"### {figure.stem.replace('_', ' ')}", "", f"![{figure.stem}]({relative})", ""]
    if extra_md:
        lines += [extra_md.rstrip(), ""]
    report = workdir / "report.md"
    report.write_text("\n".join(lines))
    return report
