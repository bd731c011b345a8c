"""What every experiment shares: a typed config read from the command line, and its workdir."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import jax

from jaxvgg import data, runtime
from jaxvgg.checkpoint import write_json

C = TypeVar("C")


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


def parse_config(config_cls: type[C], argv: list[str] | None = None, description: str = "") -> C:
    """Builds an argparse CLI from a dataclass: one ``--field-name`` per field, its comment as help.

    Field help comes from ``dataclasses.field(metadata={"help": ...})``; defaults are shown.
    """
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        kind = hints[f.name]
        args = typing.get_args(kind)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), kind) if args else kind
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if base is bool and not optional:
            parser.add_argument(flag, type=_parse_bool, default=f.default, metavar="BOOL", help=help_text)
        else:
            parse = _optional(base) if optional else base
            parser.add_argument(flag, type=parse, default=f.default, help=help_text,
                                choices=f.metadata.get("choices"))
    return config_cls(**vars(parser.parse_args(argv)))


def prepare_workdir(workdir: str | os.PathLike, config: Any, resume: bool) -> Path:
    """Creates ``workdir`` and saves the resolved config as config.json (refusing to mix runs).

    With ``resume``, every option but resume/epochs/quiet must match the saved config. An option the
    saved config lacks (added to the experiment after that run began) matches when it has its default.
    """
    path = Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    new = json.loads(json.dumps(dataclasses.asdict(config)))  # as it reads back: tuples become lists
    saved = path / "config.json"
    if saved.exists() and resume:
        old = json.loads(saved.read_text())
        defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(config)
                                          if f.default is not dataclasses.MISSING}))
        old = {**defaults, **old}
        changed = {k for k in new if k not in ("resume", "epochs", "quiet") and old.get(k) != new[k]}
        if changed:
            raise ValueError(f"--resume with a different config than {saved}: "
                             + ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in sorted(changed)))
    write_json(saved, new, sort_keys=True)
    return path


def write_summary(workdir: Path, summary: dict) -> Path:
    """summary.json, written atomically."""
    return write_json(workdir / "summary.json", summary, allow_nan=False)


def run_cli(main: Callable[[list[str]], Any], argv: list[str]) -> int:
    """Runs an experiment's main; a missing data set or an occupied workdir is a message, not a traceback.

    First re-executes the process with tcmalloc preloaded where it is installed (`jaxvgg.runtime`;
    ``JAXVGG_ALLOCATOR=system`` opts out, ``JAXVGG_CPU_DEVICES=auto`` adds one XLA device per core).
    """
    runtime.reexec_with_fast_runtime()
    try:
        main(argv)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def load_splits(name: str, data_dir: str | None, limit: int | None, val_fraction: float,
                seed: int) -> tuple[Any, Any, Any]:
    """(train, val, test) of "mnist" or "cifar10": at most ``limit`` train and test images, seeded random val split."""
    splits = data.load_dataset(name, data_dir)
    train_all, test = splits["train"], splits["test"]
    if limit is not None:
        train_all, test = train_all.take(min(limit, len(train_all))), test.take(min(limit, len(test)))
    train, val = data.train_val_split(train_all, val_fraction, seed=seed)
    print(f"{name}: {len(train)} train, {len(val)} validation, {len(test)} test images; "
          f"{jax.device_count()} {jax.default_backend()} device(s)")
    return train, val, test
