"""What every experiment shares: a typed, validated config read from the command line, its workdir,
the execution policy's defaults, and the CLI's error handling.

This is the CLI edge: the only place where environment variables choose defaults (``JAXVGG_IMPL``
and ``JAXVGG_GEMM`` for the policy, ``JAXVGG_ALLOCATOR`` for the process,
``JAXVGG_DATA_DIR`` for the data, SLURM's and Open MPI's variables for joining processes); the library
takes every such choice as an explicit value.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax

from jaxvgg import data, distributed, runtime
from jaxvgg.checkpoint import has_checkpoints, write_json
from jaxvgg.policy import PRECISIONS, Policy, make_policy, precision_name, resolve_precision
from jaxvgg.train import FitConfig

C = TypeVar("C")
IMPL_ENV = "JAXVGG_IMPL"  # default conv/pool forms: auto, native, cpu or fast
GEMM_ENV = "JAXVGG_GEMM"  # default matrix-product backend: auto, xla or mkl
CONV_ENV = "JAXVGG_CONV"  # default convolution backend: auto, xla or onednn


class ConfigError(ValueError):
    """A bad command-line value; `run_cli` prints ``error: --flag: why (got VALUE)`` and exits with 2."""

    def __init__(self, field: str, why: str, value: Any, flag: str | None = None):
        self.field, self.why = field, why
        self.flag = flag or "--" + field.replace("_", "-")
        super().__init__(f"{self.flag}: {why} (got {value})")


# --- value checks: a function of the value returning why it is bad, or None ---------------------

def at_least(low: float) -> Callable[[Any], str | None]:
    """The value (when given) is >= ``low``."""
    return lambda v: None if v is None or v >= low else f"must be >= {low}"


def positive_finite(v: Any) -> str | None:
    """The value (when given) is a finite number > 0."""
    return None if v is None or (math.isfinite(v) and v > 0) else "must be a finite number > 0"


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable:
    """The value (when given) lies in the interval, ``[`` or ``(`` at each end as asked."""
    text = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def check(v):
        if v is None:
            return None
        inside = math.isfinite(v) and (low < v if low_open else low <= v) and (v < high if high_open else v <= high)
        return None if inside else f"must be in {text}"

    return check


# Checks of the options every experiment names alike; a field's own metadata["check"] replaces these.
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "epochs": at_least(1), "batch_size": at_least(1), "eval_batch_size": at_least(1), "limit": at_least(1),
    "num_devices": at_least(1), "seed": at_least(0), "lr": positive_finite, "min_lr": positive_finite,
    "max_lr": positive_finite, "range_min_lr": positive_finite, "range_max_lr": positive_finite,
    "weight_decay": in_range(0, math.inf, high_open=True), "momentum": in_range(0, 1, high_open=True),
    "label_smoothing": in_range(0, 1, high_open=True), "dropout": in_range(0, 1, high_open=True),
    "val_fraction": in_range(0, 1, low_open=True, high_open=True), "patience": at_least(1),
    "plateau_patience": at_least(0), "tta": at_least(0), "steps": at_least(1), "num_steps": at_least(2),
    "range_steps": at_least(2), "rounds": at_least(1), "train_batch": at_least(1), "infer_batch": at_least(1),
    "epoch_limit": at_least(1), "tsne_points": at_least(0), "loss_window": at_least(1),
    "smoothing": in_range(0, 1, low_open=True), "diverge_factor": in_range(1, math.inf, low_open=True),
}


def validate(config: Any, given: dict[str, str] | None = None) -> None:
    """Raises `ConfigError` for the first field whose check fails (a field's own, else `CHECKS`').

    ``given``: the text typed for each option, which the error repeats (else the parsed value).
    """
    for f in dataclasses.fields(config):
        check = f.metadata.get("check", CHECKS.get(f.name))
        why = check(getattr(config, f.name)) if check is not None else None
        choices = f.metadata.get("choices")
        if not why and choices and getattr(config, f.name) not in choices:
            why = "expected one of " + ", ".join(map(str, choices))
        if why:
            raise ConfigError(f.name, why, (given or {}).get(f.name, getattr(config, f.name)))
    if hasattr(config, "check"):  # checks across fields, e.g. min_lr < max_lr
        try:
            config.check()
        except ConfigError as e:
            if e.field not in (given or {}):
                raise
            raise ConfigError(e.field, e.why, given[e.field]) from None


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _host_port(value: str | None) -> str | None:
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    return None if host and port.isdigit() and 0 < int(port) < 65536 else "expected HOST:PORT"


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins the others of a multi-process run (the ``--coordinator-address`` group).

    Not part of a run's config: the same run may be resumed with another number of processes.
    """

    coordinator_address: str | None = dataclasses.field(default=None, metadata={
        "help": "HOST:PORT where process 0 runs the coordinator (the same on every host); with --num-processes "
                "and --process-id: one process per host, jax.distributed. None of the three: a SLURM (srun) or "
                "Open MPI (mpirun) job is joined from its environment, else one process", "check": _host_port,
        "metavar": "HOST:PORT"})
    num_processes: int | None = dataclasses.field(default=None, metadata={
        "help": "processes in the run", "check": at_least(1), "metavar": "N"})
    process_id: int | None = dataclasses.field(default=None, metadata={
        "help": "this process's rank, 0 .. N-1", "check": at_least(0), "metavar": "I"})
    heartbeat_timeout: int = dataclasses.field(default=distributed.HEARTBEAT_TIMEOUT_S, metadata={
        "help": "seconds without a heartbeat after which a process counts as dead and the others end",
        "check": at_least(1), "metavar": "SECONDS"})

    def check(self) -> None:
        given = {f: getattr(self, f) is not None for f in ("coordinator_address", "num_processes", "process_id")}
        if any(given.values()) and not all(given.values()):
            first = next(f for f, g in given.items() if g)
            missing = " and ".join("--" + f.replace("_", "-") for f, g in given.items() if not g)
            raise ConfigError(first, f"needs {missing} too: give all three or none", getattr(self, first))
        if all(given.values()) and self.process_id >= self.num_processes:
            raise ConfigError("process_id", f"must be < --num-processes {self.num_processes}", self.process_id)

    def cluster(self) -> str | None:
        """The cluster JAX can read the three from when none is given: "slurm" inside ``srun``, "ompi"
        inside ``mpirun`` (the variables JAX's own detection looks for), else None."""
        if self.coordinator_address is not None:
            return None
        if all(v in os.environ for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                                         "SLURM_LOCALID")):
            return "slurm"
        return "ompi" if "OMPI_MCA_orte_hnp_uri" in os.environ else None


def join_processes(launch: Launch) -> None:
    """Joins the run's other processes (`jaxvgg.distributed.initialize`) when `Launch` says there are any;
    then only process 0 prints to standard output (errors still reach standard error from every process)."""
    cluster = launch.cluster()
    if launch.coordinator_address is None and cluster is None:
        return
    try:
        distributed.initialize(launch.coordinator_address, launch.num_processes, launch.process_id, cluster=cluster,
                               heartbeat_timeout_s=launch.heartbeat_timeout)
    except Exception as e:  # noqa: BLE001 -- jax raises RuntimeError/ValueError/XlaRuntimeError here
        what = launch.coordinator_address or f"the {cluster} job's coordinator"
        raise ConfigError("coordinator_address", f"could not join the other processes: "
                                                 f"{str(e).strip().splitlines()[0][:300]}", what) from None
    if not distributed.is_main_process():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the rest of this process


def parse_config(config_cls: type[C], argv: list[str] | None = None, description: str = "", *,
                 launch: bool = False) -> C:
    """Builds an argparse CLI from a dataclass (one ``--field-name`` per field) and returns the validated config.

    Field help comes from ``dataclasses.field(metadata={"help": ...})``; defaults are shown. Every value
    is checked (`validate`) before anything is loaded or compiled: a bad one raises `ConfigError`.

    launch: also take `Launch`'s options (a training experiment) and join the run's other processes
    (`join_processes`) before returning, so that nothing has touched a device yet.
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config_fields, given = {f.name for f in dataclasses.fields(config_cls)}, {}
    _add_fields(parser, config_cls, given)
    if launch:
        _add_fields(parser.add_argument_group("several processes (jax.distributed)"), Launch, given)
    values = vars(parser.parse_args(argv))
    if launch:
        processes = Launch(**{k: v for k, v in values.items() if k not in config_fields})
        validate(processes, given)
    config = config_cls(**{k: v for k, v in values.items() if k in config_fields})
    validate(config, given)
    if launch:
        join_processes(processes)
    return config


def _add_fields(parser: Any, config_cls: type, given: dict[str, str]) -> None:
    """One ``--field-name`` option per field of ``config_cls``; ``given`` collects the text typed for each."""
    hints = typing.get_type_hints(config_cls)

    def remembering(name: str, parse: Callable[[str], Any]) -> Callable[[str], Any]:
        def read(text: str) -> Any:
            given[name] = text
            return parse(text)

        read.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its own errors
        return read

    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if base is bool and not optional:
            parser.add_argument(flag, type=remembering(f.name, _parse_bool), default=f.default, metavar="BOOL",
                                help=help_text)
        else:
            parse = _optional(base) if optional else base
            choices = f.metadata.get("choices")  # checked by `validate`, so a bad one is one line too
            parser.add_argument(flag, type=remembering(f.name, parse), default=f.default, help=help_text,
                                metavar="{" + ",".join(map(str, choices)) + "}" if choices else f.metadata.get("metavar"))


def prepare_workdir(workdir: str | os.PathLike, config: Any, resume: bool, extra: dict | None = None) -> Path:
    """Creates ``workdir`` and saves the config (and ``extra``, e.g. the resolved policy) as config.json.

    Refuses to mix runs, before any work: without ``resume``, a workdir that holds checkpoints or another
    run's config is an error; with ``resume``, every option but resume/epochs/quiet must match the saved
    config. An option the saved config lacks (added to the experiment after that run began) matches when
    it has its default.
    """
    path = Path(workdir)
    new = json.loads(json.dumps(dataclasses.asdict(config)))  # as it reads back: tuples become lists
    saved = path / "config.json"
    if saved.exists():
        old = json.loads(saved.read_text())
        defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(config)
                                          if f.default is not dataclasses.MISSING}))
        old = {**defaults, **old}
        changed = {k for k in new if k not in ("resume", "epochs", "quiet") and old.get(k) != new[k]}
        if changed and resume:
            raise ConfigError("resume", f"{saved} holds another config: " + ", ".join(
                f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(changed)), "true")
        if changed:
            raise ConfigError("workdir", f"holds a run with another config ({', '.join(sorted(changed))} differ); "
                                         "choose another --workdir", str(workdir))
    if not resume and has_checkpoints(path / "checkpoints"):
        raise ConfigError("workdir", "holds the checkpoints of a run; pass --resume true to continue it or choose "
                                     "another --workdir", str(workdir))
    path.mkdir(parents=True, exist_ok=True)
    if distributed.is_main_process():  # every process checked; one writes
        write_json(saved, {**new, **(extra or {})}, sort_keys=True)
    return path


def precision_field() -> Any:
    """The ``--precision`` option every training experiment has (a dataclass field)."""
    return dataclasses.field(default="fp32", metadata={
        "help": "compute precision: fp32, bf16 (bfloat16 products with float32 sums, float32 weights, optimizer "
                "and loss), or auto (bf16 where the hardware multiplies bfloat16: AMX or AVX-512 BF16 CPUs, "
                "GPUs of compute capability >= 8.0, TPUs; else fp32)", "check": _precision_check})


def _precision_check(value: str) -> str | None:
    return None if value in ("auto", *PRECISIONS) else f"expected one of auto, {', '.join(PRECISIONS)}"


def default_policy(model: str | None, precision: str = "fp32") -> Policy:
    """The policy a command runs ``model`` with: ``precision`` (--precision), ``$JAXVGG_IMPL`` forms,
    ``$JAXVGG_GEMM`` and ``$JAXVGG_CONV`` backends (default auto), read here, once, before anything traces."""
    forms, gemm_backend, conv_backend = (os.environ.get(name, "auto") or "auto" for name in (IMPL_ENV, GEMM_ENV,
                                                                                             CONV_ENV))
    try:
        dtype = resolve_precision(precision)
    except ValueError as e:
        raise ConfigError("precision", str(e), precision) from None
    try:
        return make_policy(model, forms=forms, gemm_backend=gemm_backend, precision=dtype, conv_backend=conv_backend)
    except (ValueError, RuntimeError) as e:
        raise ConfigError("policy", f"{e} (with --precision {precision})" if dtype != "float32" else str(e),
                          f"{forms}, {gemm_backend}, {conv_backend}", flag=f"${IMPL_ENV}, ${GEMM_ENV}, ${CONV_ENV}"
                          ) from None


def policy_record(policy: Policy) -> dict:
    """The resolved policy (and its precision, fp32 or bf16) as config.json and summary.json keep them."""
    return {"policy": dataclasses.asdict(policy), "precision": precision_name(policy.dtype)}


def check_batch_size(batch_size: int, train: data.BatchSource) -> int:
    """Training steps per epoch (drop_last); a batch larger than the training split is a `ConfigError`."""
    steps = data.num_batches(len(train), batch_size, drop_last=True)
    if steps == 0:
        raise ConfigError("batch_size", f"larger than the {len(train)} training images (raise --limit or lower it)",
                          batch_size)
    return steps


def fit_config(config: Any, workdir: Path, **overrides: Any) -> FitConfig:
    """The `FitConfig` of an experiment's config: each field both name alike (epochs, batch_size, seed,
    resume, num_devices, quiet, eval_batch_size, ...), the workdir, then ``overrides`` for what the
    experiment names otherwise or decides itself (early stopping's patience, the plateau rule)."""
    names = {f.name for f in dataclasses.fields(config)}
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(FitConfig) if f.name in names}
    return FitConfig(**{**shared, "workdir": str(workdir), **overrides})


def run_cli(main: Callable[[list[str]], Any], argv: list[str]) -> int:
    """Runs an experiment's main; a bad option, a missing data set or an occupied workdir is one line, not a traceback.

    First re-executes the process with tcmalloc preloaded where it is installed (`jaxvgg.runtime`;
    ``JAXVGG_ALLOCATOR=system`` opts out).
    `ConfigError` (a bad option or workdir, raised before any work), a missing file and an occupied
    workdir end in one ``error: ...`` line and exit status 2; a lost process of a multi-process run
    (`jaxvgg.distributed.ProcessLostError`) in one line and status 1, at once.
    """
    try:
        runtime.reexec_with_fast_runtime()
        main(argv)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except distributed.ProcessLostError as e:
        # another process is gone: end now, without jax's exit barrier, which would wait for it in vain
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
    return 0


def split_train_val(train_all: data.Dataset, val_fraction: float, seed: int,
                    limit: int | None) -> tuple[data.Dataset, data.Dataset]:
    """`data.train_val_split`; too few images for a split is a `ConfigError` on --limit, which chose them."""
    try:
        return data.train_val_split(train_all, val_fraction, seed=seed)
    except ValueError as e:
        raise ConfigError("limit", str(e), limit) from None


def load_splits(name: str, data_dir: str | None, limit: int | None, val_fraction: float,
                seed: int) -> tuple[data.Dataset, data.Dataset, data.Dataset]:
    """(train, val, test) of "mnist" or "cifar10": at most ``limit`` train and test images, seeded random val split."""
    splits = data.load_dataset(name, data_dir)
    train_all, test = splits["train"], splits["test"]
    if limit is not None:
        train_all, test = train_all.take(min(limit, len(train_all))), test.take(min(limit, len(test)))
    train, val = split_train_val(train_all, val_fraction, seed, limit)
    print(f"{name}: {len(train)} train, {len(val)} validation, {len(test)} test images; "
          f"{jax.device_count()} {jax.default_backend()} device(s)")
    return train, val, test
