"""Smoke test of `python -m experiments.benchmark` (tiny step counts; no speed is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from experiments import benchmark
from jaxvgg import gemm, models

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("backend", ["xla", "mkl"])
def test_flop_count_of_the_cifar_cnn(monkeypatch, backend):
    # the count reads XLA's dots and convs, and MKL's sgemm custom calls (jaxvgg.gemm)
    if backend == "mkl" and gemm._load() is not None:
        pytest.skip(gemm._load())
    monkeypatch.setenv(gemm.GEMM_ENV, backend)
    # MACs by hand: conv1 30*30*64*27, conv2 13*13*128*576, conv3 4*4*256*1152, fc 1024*128 + 128*256 + 256*10
    macs = 30 * 30 * 64 * 27 + 13 * 13 * 128 * 576 + 4 * 4 * 256 * 1152 + 1024 * 128 + 128 * 256 + 256 * 10
    model = models.create_model("cifar_cnn")
    variables = models.init_params("cifar_cnn", jax.random.PRNGKey(0))
    for conv_impl in ("lax", "im2col"):  # counted the same whichever form computes the convs
        model = models.create_model("cifar_cnn", conv_impl=conv_impl)
        jaxpr = jax.make_jaxpr(model.apply)(variables, jnp.zeros((3, 32, 32, 3)))
        assert benchmark.jaxpr_flops(jaxpr) == 3 * 2 * macs


def test_flop_count_of_lenet_includes_its_direct_first_conv(monkeypatch):
    # conv1 28*28*6*25, conv2 10*10*16*150, fc 400*120 + 120*84 + 84*10
    macs = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    monkeypatch.setenv(models.IMPL_ENV, "fast")  # conv1 is "direct" in inference: no conv or dot in its jaxpr
    case = benchmark.build_case("mnist_lenet", jax.random.PRNGKey(0))
    assert benchmark.model_flops(case, jnp.zeros((2, 28, 28, 1))) == 2 * 2 * macs


@pytest.mark.skipif(not (CIFAR / "cifar-10-binary.tar.gz").exists(), reason="needs ../shared/data")
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--models", "cifar_cnn,transfer_head", "--rounds", "2",
         "--steps", "1", "--train-batch", "16", "--infer-batch", "16", "--allocators", "current",
         "--epoch-limit", "256", "--data-dir", str(CIFAR), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["model"], r["mode"]) for r in rows] == [
        ("cifar_cnn", "train"), ("cifar_cnn", "infer"), ("transfer_head", "train"), ("transfer_head", "infer"),
        ("cifar_cnn", "epoch")]
    for r in rows[:4]:
        assert {"model", "mode", "jax_img_s", "torch_img_s", "ratio", "gflops", "compile_s"} <= set(r)
        assert r["jax_img_s"] > 0 and r["torch_img_s"] > 0 and len(r["jax_rounds"]) == 2
        assert r["ratio"] == pytest.approx(r["jax_img_s"] / r["torch_img_s"])
        assert r["output_max_abs_diff"] < 1e-5  # the two sides computed the same network
    assert rows[0]["mflop_per_img"] == pytest.approx(3 * rows[1]["mflop_per_img"])
    assert rows[4]["images"] == 256 and 0 < rows[4]["pipeline_fraction"] < 1
    assert "| cifar_cnn | train |" in proc.stdout
    # each step is compiled with its model's XLA:CPU options, and the table says which
    assert [r["xla_options"] for r in rows[:4]] == [{}, {}, {}, {models.YNN_FUSION_OPTION: ""}]
    labels = {line.split("|")[1].strip() + " " + line.split("|")[2].strip(): line.split("|")[5].strip()
              for line in proc.stdout.splitlines() if line.startswith(("| cifar_cnn |", "| transfer_head |"))}
    assert labels == {"cifar_cnn train": "default", "cifar_cnn infer": "default", "transfer_head train": "default",
                      "transfer_head infer": "YNNPACK off"}
    # the matrix products' backend (jaxvgg.gemm), in the rows and the table
    assert {r["gemm"] for r in rows[:4]} == {gemm.backend()}
    assert {line.split("|")[6].strip() for line in proc.stdout.splitlines()
            if line.startswith(("| cifar_cnn |", "| transfer_head |"))} == {gemm.backend()}
    # issue 5's targets, and whether the row's ratio meets them
    assert [r["target"] for r in rows[:4]] == [1.3, 1.2, None, 1.2]
    targets = [line.split("|")[10].strip() for line in proc.stdout.splitlines()
               if line.startswith(("| cifar_cnn |", "| transfer_head |"))]
    assert targets == [benchmark._target_label(r["target"], r["ratio"]) for r in rows[:4]]


def test_target_labels():
    assert benchmark._target_label(1.3, 1.31) == "≥ 1.3x met"
    assert benchmark._target_label(1.2, 1.19) == "≥ 1.2x not met"
    assert benchmark._target_label(None, 2.0) == "–"


def test_benchmark_rejects_unknown_models():
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--models", "resnet50"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "resnet50" in proc.stderr


def _compile_rows(torch_compile_works: bool, monkeypatch) -> list[dict]:
    import torch

    if not torch_compile_works:
        def broken(*args, **kwargs):
            raise RuntimeError("inductor: no working C++ compiler")
        monkeypatch.setattr(torch, "compile", broken)
    case = benchmark.build_case("transfer_head", jax.random.PRNGKey(0))
    rows = [benchmark.measure(case, mode, 8, 1, 2, say=lambda _: None, torch_compile=True)
            for mode in ("train", "infer")]
    for r in rows:
        r.update(allocator="current", peak_gflops_jax=100.0, peak_gflops_torch=100.0)
    return rows


def test_benchmark_reports_torch_compile_failure_and_still_measures_the_rest(monkeypatch):
    rows = _compile_rows(False, monkeypatch)
    for r in rows:
        assert r["torch_compile_img_s"] is None and "no working C++ compiler" in r["torch_compile_error"]
        assert r["jax_img_s"] > 0 and r["torch_img_s"] > 0 and "torch_compile_rounds" not in r
    text = benchmark.table(rows)
    assert "torch.compile img/s" in text and text.count("| failed | – |") == 2


@pytest.mark.slow  # inductor compiles for ~30 s here
def test_benchmark_times_torch_compile(monkeypatch):
    rows = _compile_rows(True, monkeypatch)
    for r in rows:
        assert r["torch_compile_img_s"] > 0 and len(r["torch_compile_rounds"]) == 2 and r["torch_compile_s"] > 0
        assert r["torch_compile_ratio"] == pytest.approx(r["jax_img_s"] / r["torch_compile_img_s"])
    assert "failed" not in benchmark.table(rows)
