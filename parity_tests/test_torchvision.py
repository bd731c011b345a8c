"""Against real torchvision models (not only torch_ref): their state_dicts convert unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

import jaxvgg  # noqa: E402
from parity_tests.common import Case, flax_activations, inputs, max_abs, to_nchw  # noqa: E402

CASES = [
    (Case("vgg11_torchvision", 32, 32, 1000, tol=1e-5), torchvision.models.vgg11),
    (Case("vgg11_torchvision", 224, 224, 1000, tol=1e-4), torchvision.models.vgg11),
    # non-square: the features end at 3x5, which the adaptive pool spreads over overlapping 7x7 bins
    (Case("vgg16_torchvision", 96, 160, 1000, tol=1e-4), torchvision.models.vgg16),
]


@pytest.mark.parametrize("case,factory", CASES, ids=[c.id for c, _ in CASES])
def test_torchvision_state_dict_gives_the_same_outputs(case, factory, impl, record):
    torch.manual_seed(0)
    tv_model = factory(weights=None).eval()
    variables = jaxvgg.from_torch(case.name, tv_model.state_dict())
    x = inputs(case)
    with torch.no_grad():
        expected = tv_model(to_nchw(x)).numpy()
    got, _ = flax_activations(case, variables, x, impl)
    record(case.id, "outputs vs torchvision.models", max_abs(got, expected), f"rtol=atol={case.tol:g}")
    np.testing.assert_allclose(got, expected, rtol=case.tol, atol=case.tol)


def test_torchvision_vgg16_round_trip_is_bit_exact(record):
    torch.manual_seed(0)
    state = {k: v.numpy() for k, v in torchvision.models.vgg16(weights=None).state_dict().items()}
    back = jaxvgg.to_torch("vgg16_torchvision", jaxvgg.from_torch("vgg16_torchvision", state))
    assert set(back) == set(state)
    worst = max(max_abs(back[k], state[k]) for k in state)
    record("vgg16_torchvision", "torch -> flax -> torch round trip", worst, "bit-exact")
    for k in state:
        assert back[k].dtype == state[k].dtype and np.array_equal(back[k], state[k]), k
