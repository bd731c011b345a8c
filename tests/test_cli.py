"""Every experiment's command line: --help, and each bad value ends in one line `error: --flag: why (got VALUE)`
with exit status 2 before any data is read or anything compiled."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.common import run_cli

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["cifar_vgg", "cifar_cnn", "mnist", "lr_range", "vgga_transfer", "vgg16_transfer", "benchmark", "scaling",
           "conv_layers"]
# the allocator re-exec is the experiments' own business; off here, so each case starts Python once
ENV = {**os.environ, "JAXVGG_ALLOCATOR": "system", "PYTHONPATH": str(ROOT)}


def _run(module: str, *args: str, cwd: Path = ROOT, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = ENV if data_dir is None else {**ENV, "JAXVGG_DATA_DIR": str(data_dir)}
    return subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


# the options each command's --help must list (beside --help itself)
HELP_FLAGS = {
    "cifar_vgg": ("--data-dir", "--epochs", "--limit", "--workdir", "--seed", "--warmup", "--ema-decay", "--tta"),
    "cifar_cnn": ("--data-dir", "--epochs", "--limit", "--workdir", "--seed"),
    "mnist": ("--data-dir", "--limit", "--workdir", "--batch-size", "--epochs", "--lr", "--compare-half-lr"),
    "lr_range": ("--data-dir", "--limit", "--workdir", "--batch-size", "--min-lr", "--max-lr"),
    "vgga_transfer": ("--data-dir", "--epochs", "--limit", "--workdir", "--backbone"),
    "vgg16_transfer": ("--data-root", "--epochs", "--limit", "--workdir", "--weights"),
    "benchmark": ("--models", "--rounds", "--peak-size", "--json"),
    "scaling": ("--part", "--images"),
    "conv_layers": ("--model", "--image-size", "--batch-size", "--precision", "--rounds", "--json"),
}


@pytest.mark.parametrize("module", MODULES)
def test_every_command_has_help_listing_its_options(module):
    out = _run(module, "--help")
    assert out.returncode == 0, out.stderr
    for flag in HELP_FLAGS[module]:
        assert flag in out.stdout, flag


BAD_VALUES = [  # (module, flag, value, what the message must say)
    ("cifar_vgg", "--epochs", "-1", "must be >= 1"),
    ("cifar_vgg", "--epochs", "0", "must be >= 1"),
    ("cifar_vgg", "--batch-size", "0", "must be >= 1"),
    ("cifar_vgg", "--limit", "0", "must be >= 1"),
    ("cifar_vgg", "--hidden", "0", "must be >= 1"),
    ("cifar_vgg", "--lr", "-1", "finite number > 0"),
    ("cifar_vgg", "--lr", "nan", "finite number > 0"),
    ("cifar_vgg", "--lr", "inf", "finite number > 0"),
    ("cifar_vgg", "--momentum", "1.5", "must be in [0, 1)"),
    ("cifar_vgg", "--weight-decay", "-0.1", "must be in [0, inf)"),
    ("cifar_vgg", "--label-smoothing", "1", "must be in [0, 1)"),
    ("cifar_vgg", "--dropout", "-0.5", "must be in [0, 1)"),
    ("cifar_vgg", "--val-fraction", "0", "must be in (0, 1)"),
    ("cifar_vgg", "--val-fraction", "1", "must be in (0, 1)"),
    ("cifar_vgg", "--plateau-patience", "-2", "must be >= 0"),
    ("cifar_vgg", "--warmup", "1", "must be in [0, 1)"),
    ("cifar_vgg", "--ema-decay", "-0.1", "must be in [0, 1)"),
    ("cifar_vgg", "--tta", "3", "expected one of 0, 1, 2"),
    ("cifar_vgg", "--warmup", "0.3", "applies to --schedule cosine, not onecycle"),
    ("cifar_cnn", "--epochs", "0", "must be >= 1"),
    ("cifar_cnn", "--loss-window", "0", "must be >= 1"),
    ("mnist", "--lr", "0", "finite number > 0"),
    ("mnist", "--range-max-lr", "1e-6", "must exceed --range-min-lr"),
    ("mnist", "--batch-size", "-64", "must be >= 1"),
    ("lr_range", "--num-steps", "1", "must be >= 2"),
    ("lr_range", "--smoothing", "0", "must be in (0, 1]"),
    ("vgga_transfer", "--patience", "0", "must be >= 1"),
    ("vgga_transfer", "--lr", "-0.001", "finite number > 0"),
    ("vgg16_transfer", "--tta", "-1", "must be >= 0"),
    ("vgg16_transfer", "--load-size", "100", "must be >= 256"),
    ("cifar_vgg", "--precision", "fp16", "expected one of auto, fp32, bf16"),
    ("mnist", "--precision", "bfloat16", "expected one of auto, fp32, bf16"),
    ("cifar_vgg", "--model", "vgg12_bn", "vgg11, vgg11_bn, vgg13"),
    ("vgg16_transfer", "--arch", "resnet50", "vgg16, vgg16_bn"),
    ("benchmark", "--rounds", "0", "must be >= 1"),
    ("benchmark", "--models", "resnet50", "expected a comma list"),
    ("benchmark", "--peak-size", "8", "must be >= 16"),
    ("cifar_vgg", "--num-processes", "2", "needs --coordinator-address and --process-id too"),
    ("cifar_cnn", "--coordinator-address", "nohost", "expected HOST:PORT"),
    ("mnist", "--heartbeat-timeout", "0", "must be >= 1"),
    ("vgg16_transfer", "--workers", "-1", "must be >= 0"),
    ("scaling", "--images", "0", "must be >= 1"),
    ("conv_layers", "--steps", "0", "must be >= 1"),
    ("conv_layers", "--model", "vgg11_bn", "expected one of vgg11, vgg13"),
]


@pytest.mark.parametrize("module,flag,value,why", BAD_VALUES, ids=[f"{m}{f}={v}" for m, f, v, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_flag_and_exit_status_2(module, flag, value, why, tmp_path, monkeypatch,
                                                                   capsys):
    """In this process, through `run_cli` as each module's ``__main__`` calls it (the subprocess tests below
    and --help's run the real command lines)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JAXVGG_ALLOCATOR", "system")  # no re-exec
    # a data set read before the check would fail on this folder with another message
    monkeypatch.setenv("JAXVGG_DATA_DIR", str(tmp_path / "no-data-here"))
    workdir = [] if module in ("benchmark", "scaling", "conv_layers") else ["--workdir", str(tmp_path / "run")]
    main = importlib.import_module(f"experiments.{module}").main
    try:
        code = run_cli(main, [flag, value, *workdir])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0] == f"error: {flag}: {lines[0].split(': ', 2)[2]}" and why in lines[0], lines[0]
    assert lines[0].endswith(f"(got {value})"), lines[0]
    assert not (tmp_path / "run").exists()  # nothing was written


def test_a_workdir_with_another_run_is_refused_before_any_work(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"epochs": 3, "lr": 0.01}))
    out = _run("cifar_vgg", "--workdir", str(workdir), "--data-dir", str(tmp_path / "nothing-here"), cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: --workdir: holds a run with another config") and "lr" in out.stderr
    assert json.loads((workdir / "config.json").read_text()) == {"epochs": 3, "lr": 0.01}  # the earlier run is kept


def test_a_missing_data_set_is_one_line(tmp_path):
    out = _run("mnist", "--data-dir", str(tmp_path / "nowhere"), "--workdir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "nowhere" in out.stderr


@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "cifar-10-binary.tar.gz").exists(),
                    reason="needs ../shared/data")
def test_a_batch_larger_than_the_limited_training_split_is_one_line(tmp_path):
    out = _run("cifar_vgg", "--data-dir", str(ROOT.parent / "shared" / "data"), "--limit", "100", "--batch-size", "128",
               "--workdir", str(tmp_path / "run"), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip() == ("error: --batch-size: larger than the 90 training images "
                                  "(raise --limit or lower it) (got 128)")
