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
@pytest.mark.slow  # the CI budget on the Zen 3 EPYC (43 s); the benchmark's pieces and --help stay in CI
def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", "--models", "cifar_cnn,transfer_head", "--rounds", "2",
         "--steps", "1", "--train-batch", "16", "--infer-batch", "16", "--allocators", "current",
         "--epoch-limit", "256", "--peak-size", "256", "--data-dir", str(CIFAR), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    # per model, per precision, per mode; then the epoch
    assert [(r["model"], r["precision"], r["mode"]) for r in rows] == [
        (model, precision, mode) for model in ("cifar_cnn", "transfer_head") for precision in ("fp32", "bf16")
        for mode in ("train", "infer")] + [("cifar_cnn", "fp32", "epoch")]
    measured, epoch = rows[:8], rows[8]
    for r in measured:
        assert {"model", "mode", "precision", "jax_img_s", "torch_img_s", "ratio", "gflops", "compile_s"} <= set(r)
        assert r["jax_img_s"] > 0 and r["torch_img_s"] > 0 and len(r["jax_rounds"]) == 2
        assert r["ratio"] == pytest.approx(r["jax_img_s"] / r["torch_img_s"])
        # the two sides computed the same network: to float32's rounding, or bfloat16's (jax bf16 vs torch autocast)
        assert r["output_max_abs_diff"] < (1e-5 if r["precision"] == "fp32" else 0.1), r
    for r in rows:  # both precisions' peaks in every row, and "% of peak" against the row's own
        peaks = [r[f"peak_gflops_{f}_{p}"] for f in ("jax", "torch") for p in ("fp32", "bf16")]
        assert all(0 < v < float("inf") for v in peaks), r
        assert r["peak_gflops_jax"] == r[f"peak_gflops_jax_{r['precision']}"]
        assert r["peak_gflops_torch"] == r[f"peak_gflops_torch_{r['precision']}"]
    # the same FLOPs in either precision (counted in the native float32 program)
    assert {r["mflop_per_img"] for r in measured[0:4:2]} == {measured[0]["mflop_per_img"]}
    assert measured[0]["mflop_per_img"] == pytest.approx(3 * measured[1]["mflop_per_img"])
    assert epoch["images"] == 256 and 0 < epoch["pipeline_fraction"] < 1
    assert "| cifar_cnn | train | fp32 |" in proc.stdout and "| cifar_cnn | train | bf16 |" in proc.stdout
    assert "float32 matmul peak, 256^3" in proc.stdout and "bfloat16 (bf16 x bf16 -> f32) matmul peak, 256^3" in proc.stdout
    assert {r["peak_size"] for r in rows} == {256}
    # each step is compiled with its model's XLA:CPU options, and the table says which; bf16 drops them
    assert [r["xla_options"] for r in measured] == [{}, {}, {}, {}, {}, {YNN_FUSION_OPTION: ""}, {}, {}]
    table_rows = [line.split("|") for line in proc.stdout.splitlines()
                  if line.startswith(("| cifar_cnn |", "| transfer_head |"))]
    labels = {" ".join(cell.strip() for cell in cells[1:4]): cells[6].strip() for cells in table_rows}
    assert labels == {"cifar_cnn train fp32": "default", "cifar_cnn infer fp32": "default",
                      "cifar_cnn train bf16": "default", "cifar_cnn infer bf16": "default",
                      "transfer_head train fp32": "default", "transfer_head infer fp32": "YNNPACK off",
                      "transfer_head train bf16": "default", "transfer_head infer bf16": "default"}
    # the matrix products' backend (the auto policy's in float32, XLA's dots in bfloat16), in the rows and the table
    expected_gemm = make_policy("cifar_cnn").gemm
    assert {r["gemm"] for r in measured if r["precision"] == "fp32"} == {expected_gemm}
    assert {r["gemm"] for r in measured if r["precision"] == "bf16"} == {"xla"}
    assert {r["forms"] for r in measured} == {"cpu"}
    assert {cells[3].strip() + " " + cells[7].strip() for cells in table_rows} == {f"fp32 {expected_gemm}", "bf16 xla"}


def test_benchmark_rejects_unknown_models():
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--models", "resnet50"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "resnet50" in proc.stderr


def test_benchmark_rejects_unknown_precisions_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "experiments.benchmark", "--precisions", "fp32,fp16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "error: --precisions: expected a comma list from fp32, bf16 (got fp32,fp16)"


def test_a_bf16_case_computes_in_bfloat16_and_agrees_with_torch_autocast():
    case = benchmark.build_case("cifar_cnn", jax.random.PRNGKey(0))
    bf16 = benchmark.with_precision(case, "bf16")
    assert bf16.precision == "bf16" and bf16.jax_model.policy.dtype == "bfloat16"
    assert bf16.params is case.params and bf16.torch_model is case.torch_model  # the same weights
    assert case.jax_model.policy.dtype == "float32"  # the float32 case is left as it was
    diff = benchmark.forward_max_abs_diff(bf16)
    print(f"cifar_cnn bf16 (jax bf16 policy vs torch autocast) log-probs: max |Δ| {diff:.3g}")
    assert diff < 0.1  # bfloat16's 8-bit mantissa through 5 layers; float32 agrees to ~1e-6
    assert benchmark.forward_max_abs_diff(benchmark.with_precision(bf16, "fp32")) < 1e-5
    with pytest.raises(ValueError, match="fp16"):
        benchmark.with_precision(case, "fp16")


def test_the_bf16_matmul_peak_is_measured_in_both_frameworks():
    peak = benchmark.matmul_peak(n=256, repeats=2, precision="bf16")
    assert set(peak) == {"jax", "torch"} and all(0 < v < float("inf") for v in peak.values()), peak


def test_the_table_sets_each_row_against_its_own_precision_s_peak():
    row = {"model": "cifar_cnn", "mode": "train", "allocator": "current", "jax_devices": 1, "xla_options": {},
           "gemm": "xla", "jax_img_s": 100.0, "torch_img_s": 50.0, "ratio": 2.0, "ratio_min": 1.9, "ratio_max": 2.1,
           "gflops": 100.0, "torch_gflops": 50.0, "compile_s": 1.0, "peak_gflops_jax_fp32": 200.0,
           "peak_gflops_torch_fp32": 150.0, "peak_gflops_jax_bf16": 400.0, "peak_gflops_torch_bf16": 300.0}
    rows = [{**row, "precision": "fp32", "peak_gflops_jax": 200.0, "peak_gflops_torch": 150.0},
            {**row, "precision": "bf16", "peak_gflops_jax": 400.0, "peak_gflops_torch": 300.0}]
    text = benchmark.table(rows)
    lines = [line.split("|") for line in text.splitlines() if line.startswith("| cifar_cnn |")]
    assert [(cells[3].strip(), cells[12].strip()) for cells in lines] == [("fp32", "50 %"), ("bf16", "25 %")]
    assert "float32 matmul peak, 2048^3 (current): jax 200, torch 150 GFLOP/s." in text
    assert "bfloat16 (bf16 x bf16 -> f32) matmul peak, 2048^3 (current): jax 400, torch 300 GFLOP/s." in text


def _compile_rows(torch_compile_works: bool, monkeypatch, precision: str = "fp32") -> list[dict]:
    import torch

    if not torch_compile_works:
        def broken(*args, **kwargs):
            raise RuntimeError("inductor: no working C++ compiler")
        monkeypatch.setattr(torch, "compile", broken)
    case = benchmark.with_precision(benchmark.build_case("transfer_head", jax.random.PRNGKey(0)), precision)
    rows = [benchmark.measure(case, mode, 8, 1, 2, say=lambda _: None, torch_compile=True)
            for mode in ("train", "infer")]
    assert {r["precision"] for r in rows} == {precision}
    for r in rows:
        r.update(allocator="current", peak_gflops_jax=100.0, peak_gflops_torch=100.0)
    return rows


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_benchmark_reports_torch_compile_failure_and_still_measures_the_rest(monkeypatch, precision):
    rows = _compile_rows(False, monkeypatch, precision)
    for r in rows:
        assert r["torch_compile_img_s"] is None and "no working C++ compiler" in r["torch_compile_error"]
        assert r["jax_img_s"] > 0 and r["torch_img_s"] > 0 and "torch_compile_rounds" not in r
    text = benchmark.table(rows)
    assert "torch.compile img/s" in text and text.count("| failed | – |") == 2


@pytest.mark.slow  # inductor compiles for ~30 s here, per precision
@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: the compiled model called under autocast
def test_benchmark_times_torch_compile(monkeypatch, precision):
    rows = _compile_rows(True, monkeypatch, precision)
    for r in rows:
        assert r["torch_compile_img_s"] > 0 and len(r["torch_compile_rounds"]) == 2 and r["torch_compile_s"] > 0
        assert r["torch_compile_ratio"] == pytest.approx(r["jax_img_s"] / r["torch_compile_img_s"])
    assert "failed" not in benchmark.table(rows)
