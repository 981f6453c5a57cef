"""Bottleneck sampling: counted cost, reproducibility, batch invariance, errors."""

import pytest
import torch

from fewstep import zoo
from fewstep.bottleneck import bottleneck_sample


@pytest.fixture(scope="module")
def unet():
    return zoo.load("unet_s")


def test_cost_and_shapes(unet):
    r = bottleneck_sample(unet, "ddim", 10, shape=(1, 8, 8), seeds="0-3", stages=(0.2, 0.6))
    assert r.samples.shape == (4, 1, 8, 8) and torch.isfinite(r.samples).all()
    # 2 full-res steps, 4 low-res steps + 1 low-res prediction, 4 full-res steps (the last denoises to 0)
    assert r.nfe == 2 + 4 + 1 + 4
    assert r.cost == pytest.approx(2 + 4 + 5 / 4)


def test_reproducible_and_batch_invariant(unet):
    a = bottleneck_sample(unet, "dpmpp_2m", 10, shape=(1, 8, 8), seeds="0-5").samples
    b = bottleneck_sample(unet, "dpmpp_2m", 10, shape=(1, 8, 8), seeds="0-5").samples
    c = bottleneck_sample(unet, "dpmpp_2m", 10, shape=(1, 8, 8), seeds="2-3").samples
    assert torch.equal(a, b)
    assert float((a[2:4] - c).abs().max()) < 1e-4


@pytest.mark.parametrize(("kw", "match"), [({"stages": (0.8, 0.2)}, "stages"), ({"factor": 3}, "factor"),
                                           ({"shift": 0.5}, "shift"), ({"stages": (0.01, 0.02)}, "too few")])
def test_errors(unet, kw, match):
    with pytest.raises(ValueError, match=match):
        bottleneck_sample(unet, "ddim", 10, shape=(1, 8, 8), **kw)
