"""Smoke test of `python -m experiments.benchmark` (tiny step counts; no speed is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jaxvgg import benchmark, gemm, models
from jaxvgg.policy import YNN_FUSION_OPTION, Policy, make_policy

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data"


@pytest.mark.parametrize("backend", ["xla", "mkl"])
def test_flop_count_of_the_cifar_cnn(backend):
    # the count reads XLA's dots and convs, and MKL's sgemm custom calls (jaxvgg.gemm)
    if backend == "mkl" and gemm.problem() is not None:
        pytest.skip(gemm.problem())
    # MACs by hand: conv1 30*30*64*27, conv2 13*13*128*576, conv3 4*4*256*1152, fc 1024*128 + 128*256 + 256*10
    macs = 30 * 30 * 64 * 27 + 13 * 13 * 128 * 576 + 4 * 4 * 256 * 1152 + 1024 * 128 + 128 * 256 + 256 * 10
    variables = models.init_params("cifar_cnn", jax.random.PRNGKey(0))
    for forms in ("native", "fast"):  # counted the same whichever form computes the convs
        model = models.create_model("cifar_cnn", policy=Policy(forms=forms, gemm=backend))
        jaxpr = jax.make_jaxpr(model.apply)(variables, jnp.zeros((3, 32, 32, 3)))
        assert benchmark.jaxpr_flops(jaxpr) == 3 * 2 * macs


def test_flop_count_of_lenet_includes_its_direct_first_conv():
    # conv1 28*28*6*25, conv2 10*10*16*150, fc 400*120 + 120*84 + 84*10
    macs = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    # conv1 is "direct" in inference under the fast policy: no conv or dot in its jaxpr
    case = benchmark.build_case("mnist_lenet", jax.random.PRNGKey(0), Policy(forms="fast"))
    # XLA's count (cost_analysis) adds the element-wise ops: biases, ReLUs, pools, log-softmax
    assert benchmark.model_flops(case, jnp.zeros((2, 28, 28, 1))) == pytest.approx(2 * 2 * macs, rel=0.03)


@pytest.mark.parametrize("backend", ["xla", "mkl"])
def test_program_flops_counts_xla_s_ops_and_mkl_s_custom_calls_alike(backend):
    if backend == "mkl" and gemm.problem() is not None:
        pytest.skip(gemm.problem())
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    assert benchmark.program_flops(lambda a, b: gemm.matmul(a, b, backend), a, b) == pytest.approx(2 * 64 * 32 * 16)


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
    assert [r["xla_options"] for r in rows[:4]] == [{}, {}, {}, {YNN_FUSION_OPTION: ""}]
    labels = {line.split("|")[1].strip() + " " + line.split("|")[2].strip(): line.split("|")[5].strip()
              for line in proc.stdout.splitlines() if line.startswith(("| cifar_cnn |", "| transfer_head |"))}
    assert labels == {"cifar_cnn train": "default", "cifar_cnn infer": "default", "transfer_head train": "default",
                      "transfer_head infer": "YNNPACK off"}
    # the matrix products' backend (the auto policy's), in the rows and the table
    expected_gemm = make_policy("cifar_cnn").gemm
    assert {r["gemm"] for r in rows[:4]} == {expected_gemm} and {r["forms"] for r in rows[:4]} == {"cpu"}
    assert {line.split("|")[6].strip() for line in proc.stdout.splitlines()
            if line.startswith(("| cifar_cnn |", "| transfer_head |"))} == {expected_gemm}


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
