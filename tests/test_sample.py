"""The loop: exact NFE counts, statelessness, thread safety, batch invariance, low-precision models, hooks."""

import threading

import pytest
import torch

from fewstep import SOLVERS, NFECounter, TrajectoryRecorder, make_solver, sample
from fewstep.grids import logsnr
from fewstep.models import ModelDenoiser
from fewstep.schedules import DiscreteVP
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

SCHED = DiscreteVP.named("linear")
DEN = AnalyticDenoiser(gaussian_mixture(dim=6, components=3, std=0.3), SCHED)
STOCHASTIC_KNOBS = {"ddim": {"eta": 1.0}, "euler": {"churn": 10.0}, "heun": {"churn": 10.0}}


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 7, 12])
@pytest.mark.parametrize("to_zero", [True, False])
def test_exact_nfe(name, steps, to_zero):
    solver = make_solver(name)
    counter = NFECounter()
    sample(DEN, solver, logsnr(SCHED, steps, to_zero=to_zero), shape=(6,), seeds=range(3), hooks=[counter])
    assert counter.nfe == solver.nfe(steps, to_zero=to_zero)
    expected_per_step = solver.nfe_schedule(steps, to_zero=to_zero)
    assert counter.per_step == expected_per_step


@pytest.mark.parametrize("name", list(SOLVERS))
def test_twice_and_in_two_threads_bit_identical(name):
    solver = make_solver(name, **STOCHASTIC_KNOBS.get(name, {}))

    def run():
        return sample(DEN, solver, 9, shape=(6,), seeds="0-15")

    first, second = run(), run()
    results = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, run())) for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for other in (second, results[0], results[1]):
        assert torch.equal(first, other)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde", "euler_maruyama", "heun", "unipc"])
def test_sample_k_identical_for_batch_sizes(name):
    solver = make_solver(name, **STOCHASTIC_KNOBS.get(name, {}))
    big = sample(DEN, solver, 8, shape=(6,), seeds=range(64), dtype=torch.float64)
    for batch in (1, 7):
        small = sample(DEN, solver, 8, shape=(6,), seeds=range(batch), dtype=torch.float64)
        assert torch.allclose(small, big[:batch], rtol=1e-12, atol=1e-12)
    # seed k alone gives sample k
    assert torch.allclose(sample(DEN, solver, 8, shape=(6,), seeds=[5], dtype=torch.float64), big[5:6],
                          rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_keeps_float32_state(dtype):
    class HalfNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=dtype))
            self.exact = DEN.as_model("eps")

        def forward(self, x, t):
            assert x.dtype == dtype
            return (self.exact(x.double(), t) * self.scale.double()).to(dtype)

    den = ModelDenoiser(HalfNet(), SCHED, prediction="eps")
    seen = []
    out = sample(den, "dpmpp_2m", 10, shape=(6,), seeds=range(4),
                 hooks=[type("H", (), {"on_step": lambda self, i, t, x: seen.append(x.dtype)})()])
    assert out.dtype == torch.float32 and set(seen) == {torch.float32}
    assert torch.isfinite(out).all()
    ref = sample(DEN, "dpmpp_2m", 10, shape=(6,), seeds=range(4))
    assert (out - ref).abs().max() < 0.1


def test_trajectory_recorder_and_explicit_grid():
    rec = TrajectoryRecorder()
    grid = logsnr(SCHED, 5)
    out = sample(DEN, "ddim", grid, shape=(6,), seeds=range(2), hooks=[rec])
    assert rec.times == grid.tolist()
    assert len(rec.states) == 6 and torch.equal(rec.states[-1], out)


def test_default_initial_noise_is_seeded_and_scaled():
    from fewstep.noise import SampleNoise
    from fewstep.schedules import EDM

    den = AnalyticDenoiser(gaussian_mixture(dim=6, components=3, std=0.3), EDM())
    rec = TrajectoryRecorder()
    sample(den, "ddim", 3, shape=(6,), seeds=[3, 4], dtype=torch.float64, hooks=[rec])
    z = SampleNoise([3, 4], (6,), dtype=torch.float64).draw()
    assert torch.allclose(rec.states[0], (1 + 80.0**2) ** 0.5 * z, rtol=1e-14)
