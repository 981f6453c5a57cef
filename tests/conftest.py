import math

import pytest
import torch

from fewstep.schedules import LinearVP
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a - b).abs().max() / b.abs().max())


def rmse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


def slopes(steps: list[int], errors: list[float]) -> list[float]:
    """Local convergence orders between consecutive step counts."""
    return [
        math.log(errors[i] / errors[i + 1]) / math.log(steps[i + 1] / steps[i]) for i in range(len(steps) - 1)
    ]


@pytest.fixture(scope="session")
def gmm_problem():
    """3-component mixture in 3-D on the linear VP-SDE, lam from -5 to 4, 64 fixed starting points."""
    sched = LinearVP()
    den = AnalyticDenoiser(gaussian_mixture(dim=3, components=3, std=0.5, seed=1), sched)
    t0, t1 = sched.inverse_lam(-5.0), sched.inverse_lam(4.0)
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return den, t0, t1, x, den.reference(x, t0, t1)


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A tiny random-weight StableDiffusionPipeline saved to disk (tests/tiny_pipelines.py), shared read-only by the
    tests that load it: copy it before changing anything in it."""
    pytest.importorskip("transformers")
    from tiny_pipelines import stable_diffusion

    return stable_diffusion(tmp_path_factory.mktemp("pipes") / "sd")
