"""Forward parity: parameter counts, every layer's output, and the final outputs, from the same weights."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxvgg
from parity_tests.common import Case, build_torch, convert, flax_activations, inputs, max_abs, torch_activations

# Parameter counts and where they come from.
PARAM_COUNTS = [
    # the CIFAR-10 tutorial CNN (seed 003): 1792 + 73,856 + 295,168 + 131,200 + 33,024 + 2,570
    (Case("cifar_cnn", 32, 32, 10), 537_610, 537_610),
    # MNIST lab linear baseline: 784 * 10 + 10
    (Case("mnist_linear", 28, 28, 10), 7_850, 7_850),
    # LeNet-5-like: 156 + 2,416 + 48,120 + 10,164 + 850
    (Case("mnist_lenet", 28, 28, 10), 61_706, 61_706),
    # torchvision docs, VGG11_Weights.IMAGENET1K_V1 "num_params": 132,863,336
    (Case("vgg11_torchvision", 224, 224, 1000), 132_863_336, 132_863_336),
    # torchvision docs, VGG16_Weights.IMAGENET1K_V1 "num_params": 138,357,544
    (Case("vgg16_torchvision", 224, 224, 1000), 138_357_544, 138_357_544),
    # the transfer tutorial (seed 004) prints 135,335,076 total / 1,074,532 trainable for 100 classes
    (Case("vgg16_transfer", 224, 224, 100), 135_335_076, 1_074_532),
    # torchvision docs, VGG{11,13,16,19}[_BN]_Weights.IMAGENET1K_V1 "num_params" (the BatchNorm variants)
    (Case("vgg11_bn_torchvision", 224, 224, 1000), 132_868_840, 132_868_840),
    (Case("vgg13_torchvision", 224, 224, 1000), 133_047_848, 133_047_848),
    (Case("vgg13_bn_torchvision", 224, 224, 1000), 133_053_736, 133_053_736),
    (Case("vgg16_bn_torchvision", 224, 224, 1000), 138_365_992, 138_365_992),
    (Case("vgg19_torchvision", 224, 224, 1000), 143_667_240, 143_667_240),
    (Case("vgg19_bn_torchvision", 224, 224, 1000), 143_678_248, 143_678_248),
    # VGG-A with BatchNorm at 32x32: VGG-A's 28,144,010 + 2 x (64 + 128 + 2 x 256 + 4 x 512) BN weights
    (Case("vgg11_bn", 32, 32, 10), 28_149_514, 28_149_514),
    # VGG-A at 32x32 with the paper's head on a 512-d flatten: 9,220,480 conv + 18,923,530 linear
    (Case("vgg11", 32, 32, 10), 28_144_010, 28_144_010),
    # VGG-A at 224 has torchvision vgg11's parameters (25,088-d flatten)
    (Case("vgg11", 224, 224, 1000), 132_863_336, 132_863_336),
]


@pytest.mark.parametrize("case,total,trainable", PARAM_COUNTS, ids=[c.id for c, _, _ in PARAM_COUNTS])
def test_parameter_counts_equal_the_cited_constants(case, total, trainable, record):
    torch_model = build_torch(case)
    # shapes only: no need to allocate 138 M parameters to count them
    variables = jax.eval_shape(lambda: jaxvgg.init_params(case.name, jax.random.key(0), case.num_classes,
                                                          case.input_shape))["params"]  # not BN's buffers
    mask = jaxvgg.trainable_mask(case.name, variables)
    flax_trainable = sum(int(np.prod(p.shape)) for p, m in zip(
        jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(mask)) if m)
    torch_total = sum(p.numel() for p in torch_model.parameters())
    torch_trainable = sum(p.numel() for p in torch_model.parameters() if p.requires_grad)
    assert (torch_total, torch_trainable) == (total, trainable)
    assert (jaxvgg.count_params(variables), flax_trainable) == (total, trainable)
    record(case.id, "parameter count", abs(jaxvgg.count_params(variables) - torch_total), "exact")


FORWARD = [
    Case("mnist_linear", 28, 28, 10, batch=4),
    Case("mnist_lenet", 28, 28, 10, batch=4),
    Case("cifar_cnn", 32, 32, 10, batch=4),
    Case("vgg11", 32, 32, 10),
    Case("vgg11", 224, 224, 1000, tol=1e-4),
    Case("vgg11_torchvision", 32, 32, 1000),
    Case("vgg11_torchvision", 224, 224, 1000, tol=1e-4),
    Case("vgg16_torchvision", 96, 160, 1000, tol=1e-4),
    Case("vgg16_torchvision", 224, 224, 1000, tol=1e-4),
    Case("vgg16_transfer", 224, 224, 100, tol=1e-4),
]
FORWARD_PARAMS = [pytest.param(c, id=c.id) for c in FORWARD]


@pytest.mark.parametrize("case", FORWARD_PARAMS)
def test_every_layer_and_the_output_match_torch(case, impl, record):
    torch_model = build_torch(case)
    x = inputs(case)
    torch_out, torch_acts = torch_activations(torch_model, x)
    flax_out, flax_acts = flax_activations(case, convert(case, torch_model), x, impl)

    assert flax_out.shape == torch_out.shape == (case.batch, case.num_classes)
    record(case.id, "outputs (eval)", max_abs(flax_out, torch_out), f"rtol=atol={case.tol:g}")
    np.testing.assert_allclose(flax_out, torch_out, rtol=case.tol, atol=case.tol)

    # every flax layer has a torch twin, and every torch layer with weights is compared
    assert set(flax_acts) <= set(torch_acts), sorted(set(flax_acts) - set(torch_acts))
    weighted = {k.rsplit(".", 1)[0].replace(".", "_") for k in torch_model.state_dict()}
    assert weighted <= set(flax_acts), sorted(weighted - set(flax_acts))
    worst = 0.0
    for name, act in flax_acts.items():
        assert act.shape == torch_acts[name].shape, (name, act.shape, torch_acts[name].shape)
        # scale the tolerance by the layer's magnitude: deep VGG activations reach O(10)
        scale = max(1.0, float(np.abs(torch_acts[name]).max()))
        np.testing.assert_allclose(act, torch_acts[name], rtol=case.tol, atol=case.tol * scale, err_msg=name)
        worst = max(worst, max_abs(act, torch_acts[name]) / scale)
    record(case.id, f"{len(flax_acts)} layer outputs, max |Δ| / max(1, max|act|)", worst,
           f"rtol={case.tol:g}, atol={case.tol:g}*max(1, max|act|)")
