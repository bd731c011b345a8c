"""The execution policy: one explicit value decides how a model runs, resolved once, part of jit's cache key."""

import ast
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import jaxvgg
from jaxvgg import gemm
from jaxvgg import policy as policy_module
from jaxvgg.policy import CPU_COMPILER_OPTIONS, NATIVE, YNN_FUSION_OPTION, Policy, make_policy

PACKAGE = Path(jaxvgg.__file__).parent


def test_auto_resolves_once_from_the_backend(monkeypatch):
    monkeypatch.setattr(policy_module, "cpu_vendor", lambda: "GenuineIntel")
    cpu = make_policy("vgg11", backend="cpu", num_devices=1)
    assert cpu.forms == "cpu"
    assert cpu.gemm == ("mkl" if gemm.problem() is None else "xla")
    assert cpu.compiler_options("infer") == {YNN_FUSION_OPTION: ""} and cpu.compiler_options("train") is None
    for accelerator in ("gpu", "tpu"):
        assert make_policy("vgg11", backend=accelerator) == NATIVE  # lax.conv, XLA's dots, XLA's defaults
    assert make_policy("vgg11", backend="cpu", num_devices=2).gemm == "xla"  # no partitioning rule for MKL
    assert make_policy("vgg11", forms="native", backend="cpu") == NATIVE
    fast = make_policy("mnist_lenet", forms="fast", gemm_backend="xla", backend="cpu")
    assert (fast.forms, fast.gemm, fast.compiler_options("train")) == ("fast", "xla", {YNN_FUSION_OPTION: ""})


def test_auto_gemm_is_mkl_on_intel_cpus_only_and_always_under_the_fast_forms(monkeypatch):
    if gemm.problem() is not None:
        pytest.skip(gemm.problem())
    for vendor, cpu_gemm in (("GenuineIntel", "mkl"), ("AuthenticAMD", "xla"), ("", "xla")):
        monkeypatch.setattr(policy_module, "cpu_vendor", lambda vendor=vendor: vendor)
        assert make_policy("cifar_cnn", backend="cpu", num_devices=1).gemm == cpu_gemm, vendor
        assert make_policy("cifar_cnn", forms="fast", backend="cpu", num_devices=1).gemm == "mkl", vendor


def test_conv_and_pool_forms_of_each_policy():
    cpu, fast = Policy(forms="cpu"), Policy(forms="fast")
    assert cpu.conv_form(32 * 32, train=True) == "im2col"
    assert cpu.conv_form(32 * 32, train=False) == "lax"
    assert cpu.conv_form(2 * 2, train=False) == "im2col"  # VGG's small blocks
    assert cpu.conv_form(28 * 28, train=False, in_channels=1) == "direct"  # LeNet's conv1
    assert cpu.conv_form(28 * 28, train=True, in_channels=1) == "im2col"
    for train in (True, False):  # VGG's last block at 32x32 (2x2 maps, 3x3 taps), and its 4x4 block
        assert cpu.conv_form(4, train, 512, in_pixels=4, taps=9) == "toeplitz"
        assert cpu.conv_form(16, train, 256, in_pixels=16, taps=9) == "im2col"
    assert (cpu.pool_form(True), cpu.pool_form(False)) == ("reshape", "reduce_window")
    assert fast.conv_form(4096, train=False) == "im2col" and fast.pool_form(False) == "reshape"
    assert fast.conv_form(4096, train=False, in_channels=1) == "direct"
    for train in (True, False):
        assert NATIVE.conv_form(4, train, 512, in_pixels=4, taps=9) == "lax"
        assert NATIVE.pool_form(train) == "reduce_window"


def test_bad_choices_are_errors_that_name_the_value():
    with pytest.raises(ValueError, match="forms='fastest'"):
        Policy(forms="fastest")
    with pytest.raises(ValueError, match="gemm='cublas'"):
        make_policy(gemm_backend="cublas")
    with pytest.raises(ValueError, match="forms='winograd'"):
        make_policy(forms="winograd")
    with pytest.raises(ValueError, match="mode='eval'"):
        NATIVE.compiler_options("eval")
    with pytest.raises(ValueError, match="CPU only"):
        make_policy(gemm_backend="mkl", backend="gpu")


def test_forcing_mkl_without_the_library_says_how_to_build_it(monkeypatch):
    monkeypatch.setattr(gemm, "problem", lambda: f"{gemm.LIBRARY} is not built (bash scripts/build_gemm.sh)")
    with pytest.raises(RuntimeError, match="build_gemm.sh"):
        make_policy(gemm_backend="mkl", backend="cpu")
    assert make_policy(backend="cpu", num_devices=1).gemm == "xla"  # auto falls back


def test_policies_are_hashable_values_and_part_of_the_module():
    a, b = make_policy("vgg11", backend="cpu", num_devices=1), make_policy("vgg11", backend="cpu", num_devices=1)
    assert a == b and hash(a) == hash(b)
    assert {a: 1}[b] == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.forms = "native"
    model = jaxvgg.create_model("cifar_cnn", policy=a)
    assert model.policy is a and model != jaxvgg.create_model("cifar_cnn", policy=NATIVE)
    assert all(all(isinstance(pair, tuple) for pair in options) for options in CPU_COMPILER_OPTIONS.values())


def test_a_native_and_a_fast_policy_give_two_programs_in_one_process():
    """The same model with two policies traces to two programs; no environment variable is touched."""
    environ = dict(os.environ)
    variables = jaxvgg.init_params("cifar_cnn", jax.random.PRNGKey(0))
    x = jnp.zeros((2, 32, 32, 3))
    jaxprs = {}
    for policy in (NATIVE, Policy(forms="fast")):
        model = jaxvgg.create_model("cifar_cnn", policy=policy)
        step = jax.jit(lambda v, x, model=model: model.apply(v, x))
        jaxprs[policy.forms] = str(jax.make_jaxpr(step)(variables, x))
        step(variables, x)
    assert jaxprs["native"] != jaxprs["fast"]
    assert "conv_general_dilated" in jaxprs["native"] and "conv_general_dilated" not in jaxprs["fast"]
    assert "reduce_window_max" in jaxprs["native"] and "reduce_window_max" not in jaxprs["fast"]
    # the policy is a module attribute, so a jitted function of the module is traced once per policy
    traces = []

    def apply(model, v, x):
        traces.append(model.policy.forms)
        return model.apply(v, x)

    jitted = jax.jit(apply, static_argnums=0)
    for policy in (NATIVE, Policy(forms="fast"), NATIVE):
        jitted(jaxvgg.create_model("cifar_cnn", policy=policy), variables, x)
    assert traces == ["native", "fast"]
    assert dict(os.environ) == environ


def _imports(path: Path) -> set[str]:
    """The jaxvgg modules ``path`` imports (module level and inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxvgg"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            found |= {n for n in names if (PACKAGE / (n.split(".", 1)[1] + ".py")).exists()} or {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("jaxvgg")}
    return {name for name in found if name != "jaxvgg"}


def test_no_import_cycles_in_jaxvgg():
    graph = {f"jaxvgg.{p.stem}": _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                pytest.fail("import cycle: " + " -> ".join([*path, module, dep]))
            if dep not in state:
                visit(dep, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert "jaxvgg.models" not in graph["jaxvgg.gemm"] and not graph["jaxvgg.gemm"]  # the backend stands alone


@pytest.mark.parametrize("module", ["models", "layers", "policy", "gemm", "train", "parallel", "evaluation"])
def test_model_ops_gemm_and_train_code_read_no_environment(module):
    text = (PACKAGE / f"{module}.py").read_text()
    assert "os.environ" not in text and "getenv" not in text


def test_importing_the_library_changes_no_environment_variable():
    code = ("import os; before = dict(os.environ); import jaxvgg, jaxvgg.gemm, jaxvgg.benchmark; "
            "m = jaxvgg.create_model('mnist_lenet'); import jaxvgg.gemm as g; g.problem(); "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
