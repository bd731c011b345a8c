"""Unit tests of the model registry, the adaptive pool and the converter (no torch needed)."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxvgg
from jaxvgg import convert, layers, models


def _random_state(name: str, seed: int = 0, **kw) -> dict[str, np.ndarray]:
    """A torch-layout state_dict with random values, built from the model's own shapes."""
    rng = np.random.default_rng(seed)
    shapes = convert.expected_param_shapes(name, **kw)
    return {convert.torch_key(p): rng.standard_normal(convert._torch_shape(p, s)).astype(np.float32)
            for p, s in shapes.items()}


def test_jaxvgg_imports_without_torch():
    code = "import sys; sys.modules['torch'] = None; import jaxvgg, jaxvgg.train, jaxvgg.optim; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="vgg11.*unknown model 'vgg12'|unknown model 'vgg12'.*vgg11"):
        jaxvgg.create_model("vgg12")


@pytest.mark.parametrize("name,kw", [("cifar_cnn", {}), ("mnist_lenet", {}), ("mnist_linear", {}),
                                     ("vgg11", {"input_shape": (32, 32, 3), "num_classes": 10})])
def test_round_trip_torch_flax_torch_is_bit_exact(name, kw):
    state = _random_state(name, **kw)
    back = jaxvgg.to_torch(name, jaxvgg.from_torch(name, state, **kw))
    assert set(back) == set(state)
    for k in state:
        assert np.array_equal(back[k], state[k]), k


def test_converter_names_a_renamed_key_and_a_wrong_shape_together():
    state = _random_state("cifar_cnn")
    state["conv_one.weight"] = state.pop("conv1.weight")
    state["fc2.weight"] = np.zeros((128, 128), np.float32)
    with pytest.raises(ValueError) as err:
        jaxvgg.from_torch("cifar_cnn", state)
    msg = str(err.value)
    assert "missing key 'conv1.weight' (expected shape (64, 3, 3, 3))" in msg
    assert "unexpected key 'conv_one.weight'" in msg
    assert "wrong shape for 'fc2.weight': expected (256, 128), found (128, 128)" in msg


def test_batchnorm_buffers_where_the_model_has_no_batchnorm_are_unexpected_keys():
    # as torch's strict load_state_dict; the *_bn models load them (tests/test_batchnorm.py)
    state = _random_state("mnist_linear")
    state["bn.num_batches_tracked"] = np.array(3)
    with pytest.raises(ValueError, match="unexpected key 'bn.num_batches_tracked'"):
        jaxvgg.from_torch("mnist_linear", state)
    state["bn.running_mean"] = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="unexpected key 'bn.running_mean'"):
        jaxvgg.from_torch("mnist_linear", state)


def test_vgg11_size_mismatch_hints_at_input_shape():
    state = _random_state("vgg11", input_shape=(32, 32, 3), num_classes=10)
    with pytest.raises(ValueError, match="input_shape=\\(32, 32, 3\\)"):
        jaxvgg.from_torch("vgg11", state, num_classes=10)


def test_conversion_copies_instead_of_aliasing_the_source_arrays():
    state = _random_state("mnist_linear")
    variables = jaxvgg.from_torch("mnist_linear", state)
    state["fc.bias"][:] = 123.0
    assert not np.any(np.asarray(variables["params"]["fc"]["bias"]) == 123.0)


def test_load_torch_state_dict_reads_npz_without_pickle(tmp_path):
    state = _random_state("mnist_lenet")
    np.savez(tmp_path / "w.npz", **state)
    loaded = jaxvgg.load_torch_state_dict(tmp_path / "w.npz")
    assert all(np.array_equal(loaded[k], state[k]) for k in state)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        jaxvgg.load_torch_state_dict(tmp_path / "missing.pth")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown state_dict format '.bin'"):
        jaxvgg.load_torch_state_dict(tmp_path / "w.bin")


def test_load_torch_state_dict_reads_pth_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    state = _random_state("mnist_linear")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "w.pth")
    loaded = jaxvgg.load_torch_state_dict(tmp_path / "w.pth")
    assert all(np.array_equal(loaded[k], state[k]) for k in state)

    # an arbitrary pickled object must be refused, not unpickled
    torch.save({"x": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only|Unsupported"):
        jaxvgg.load_torch_state_dict(tmp_path / "evil.pth")


class _Payload:
    """Stands for an arbitrary object a hostile .pth file could carry."""


def _torch_adaptive_avg_pool_reference(x: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """Direct loop over torch's bins [floor(i*in/out), ceil((i+1)*in/out))."""
    b, h, w, c = x.shape
    y = np.zeros((b, *out, c), np.float64)
    for i in range(out[0]):
        h0, h1 = (i * h) // out[0], -(-((i + 1) * h) // out[0])
        for j in range(out[1]):
            w0, w1 = (j * w) // out[1], -(-((j + 1) * w) // out[1])
            y[:, i, j] = x[:, h0:h1, w0:w1].mean(axis=(1, 2))
    return y


@pytest.mark.parametrize("hw", [(1, 1), (2, 2), (3, 5), (7, 7), (9, 14)])
def test_adaptive_avg_pool_matches_torch_bins(hw):
    x = np.random.default_rng(0).standard_normal((2, *hw, 3)).astype(np.float32)
    got = np.asarray(layers.adaptive_avg_pool(jnp.asarray(x), (7, 7)))
    np.testing.assert_allclose(got, _torch_adaptive_avg_pool_reference(x, (7, 7)), rtol=1e-6, atol=1e-6)


def test_vgg11_accepts_32_and_224_inputs_and_has_the_paper_head():
    model = jaxvgg.create_model("vgg11", num_classes=10)
    for size, flat in ((32, 512), (224, 25088)):
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
        assert shapes["params"]["classifier_0"]["kernel"].shape == (flat, 4096)


def test_dropout_is_off_by_default_and_on_in_training_mode():
    model = jaxvgg.create_model("vgg11", num_classes=10)
    x = jnp.ones((2, 32, 32, 3))
    variables = jaxvgg.init_params("vgg11", jax.random.key(0), 10, (32, 32, 3))
    assert np.array_equal(model.apply(variables, x), model.apply(variables, x))
    a = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    b = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)


def test_transfer_mask_freezes_everything_but_the_new_head():
    shapes = jax.eval_shape(lambda: jaxvgg.init_params("vgg16_transfer", jax.random.key(0), 100))
    mask = jaxvgg.trainable_mask("vgg16_transfer", shapes)
    trainable = {layer for layer, sub in mask["params"].items() if all(jax.tree_util.tree_leaves(sub))}
    assert trainable == {"classifier_6_0", "classifier_6_3"}


def test_log_prob_models_output_normalised_log_probabilities():
    for name in ("cifar_cnn", "mnist_linear", "mnist_lenet"):
        variables = jaxvgg.init_params(name, jax.random.key(0))
        x = jnp.ones((3, *models.get_spec(name).input_shape))
        out = jaxvgg.create_model(name).apply(variables, x)
        np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-5)
