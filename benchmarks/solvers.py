"""Solver accuracy and overhead, fewstep next to diffusers 0.42, measured in one run.

Part 1 (accuracy): the exact denoiser of a 16-D, 6-component Gaussian mixture on the DDPM linear-beta schedule
(N = 1000). Each solver starts from the same 256 noise draws; the error is the RMSE at t = 0 against the exact
probability-flow endpoint (torchdiffeq dopri5, rtol 1e-10). fewstep runs on its logSNR grid (denoise to zero);
diffusers runs with pinned configs (trailing spacing, no clipping, final sigma 0). Heun's NFE is 2 steps - 1.
The measured order is the slope between 80 and 160 steps on the order-test problem of tests/test_orders.py
(3-D, 3-component mixture, std 0.5, linear VP-SDE, lam-uniform grid from lam = -5 to 4, no final jump); the
16-D mixture above is too sharp for its asymptotic regime to start below ~600 steps.

Part 2 (overhead): per-step solver overhead as a fraction of the time of one evaluation of a 1.06M-parameter
diffusers UNet2DModel (random weights; 3x32x32, blocks 32/64/64) at batch 64. The overhead is timed directly: the
whole loop (fewstep: grid scalars, output conversion, the finite/shape check, the update; diffusers:
scale_model_input + step) around a zero-cost network that returns a fixed tensor, median of repeats.

    python benchmarks/solvers.py [--repeats 30] [--skip-overhead]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings

import diffusers
import torch

from fewstep import make_solver, sample
from fewstep.grids import logsnr, make_grid
from fewstep.models import ModelDenoiser, schedule_from_config
from fewstep.schedules import LinearVP
from fewstep.zoo import AnalyticDenoiser, gaussian_mixture

warnings.filterwarnings("ignore")
CONFIG = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
NFES = [5, 8, 10, 20]
FEWSTEP = ["ddim", "euler", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_compat", "unipc", "deis",
           "ipndm"]
ORDER_KNOBS = {"dpmpp_2m": {"lower_order_final": False}, "dpmpp_3m": {"lower_order_final": False},
               "dpmpp_3m_compat": {"lower_order_final": False}, "unipc": {"lower_order_final": False},
               "deis": {"lower_order_final": False}}
DIFFUSERS = {
    "DDIM": (diffusers.DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=True)),
    "Euler": (diffusers.EulerDiscreteScheduler, {}),
    "Heun": (diffusers.HeunDiscreteScheduler, {}),
    "DPM++2M": (diffusers.DPMSolverMultistepScheduler, dict(solver_order=2)),
    "DPM++3M": (diffusers.DPMSolverMultistepScheduler, dict(solver_order=3)),
    "UniPC": (diffusers.UniPCMultistepScheduler, dict(solver_order=2)),
    "DEIS": (diffusers.DEISMultistepScheduler, dict(solver_order=3)),
}


def diffusers_loop(scheduler, net, x, steps):
    scheduler.set_timesteps(steps)
    x = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.step(net(scheduler.scale_model_input(x, t), t), t, x).prev_sample
    return x


def accuracy() -> None:
    schedule, _ = schedule_from_config({**CONFIG, "prediction_type": "epsilon"})
    exact = AnalyticDenoiser(gaussian_mixture(dim=16, components=6, std=0.2, seed=0), schedule)
    net = exact.as_model("eps")
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = exact.reference_data(x, schedule.t_max)
    vp = LinearVP()
    order_model = AnalyticDenoiser(gaussian_mixture(dim=3, components=3, std=0.5, seed=1), vp)
    lam_lo, lam_hi = vp.inverse_lam(-5.0), vp.inverse_lam(4.0)
    x_order = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref_order = order_model.reference(x_order, lam_lo, lam_hi)

    def err(out):
        return float(((out - ref) ** 2).mean().sqrt())

    print("## Error at t = 0 (RMSE vs exact PF-ODE endpoint), 256 samples\n")
    print("| solver | " + " | ".join(f"NFE {n}" for n in NFES) + " | measured order (declared) |")
    print("|---" * (len(NFES) + 2) + "|")
    for name in FEWSTEP:
        solver = make_solver(name)
        cells = []
        for nfe in NFES:
            steps = (nfe + 1) // 2 if name == "heun" else nfe // solver.nfe_per_step
            if name == "dpm_solver_2" and nfe % 2:
                cells.append("-")
                continue
            cells.append(f"{err(sample(exact, solver, logsnr(schedule, steps), x_init=x)):.2e}")
        o_solver = make_solver(name, **ORDER_KNOBS.get(name, {}))
        e = [float(((sample(order_model, o_solver, logsnr(vp, n, to_zero=False, t_start=lam_lo, t_end=lam_hi),
                            x_init=x_order) - ref_order) ** 2).mean().sqrt()) for n in (80, 160)]
        print(f"| fewstep `{name}` | " + " | ".join(cells) + f" | {math.log2(e[0] / e[1]):.2f} ({o_solver.order}) |")
    for label, (cls, extra) in DIFFUSERS.items():
        cells = []
        for nfe in NFES:
            steps = (nfe + 1) // 2 if label == "Heun" else nfe
            sch = cls(**CONFIG, timestep_spacing="trailing", **extra)
            cells.append(f"{err(diffusers_loop(sch, net, x, steps)):.2e}")
        print(f"| diffusers {label} | " + " | ".join(cells) + " | |")

    print("\n## Grid choice (same model and noise, error at t = 0)\n")
    print("| solver | grid | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
    print("|---|---" + "|---" * len(NFES) + "|")
    for name in ("ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm"):
        solver = make_solver(name)
        for grid_name in ("logsnr", "karras", "time_uniform", "time_quadratic"):
            cells = []
            for nfe in NFES:
                steps = (nfe + 1) // 2 if name == "heun" else nfe
                cells.append(f"{err(sample(exact, solver, make_grid(grid_name, schedule, steps), x_init=x)):.2e}")
            print(f"| `{name}` | {grid_name} | " + " | ".join(cells) + " |")


class FixedNet(torch.nn.Module):
    """A zero-cost stand-in returning a fixed tensor: a loop around it measures pure solver overhead."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.out = out

    def forward(self, x, t):
        return self.out


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad():
            fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def overhead(repeats: int) -> None:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
                                 layers_per_block=1, down_block_types=("DownBlock2D",) * 3,
                                 up_block_types=("UpBlock2D",) * 3, norm_num_groups=8).eval()
    params = sum(p.numel() for p in unet.parameters())
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.full((64,), 500.0)
    model_ms = _median_ms(lambda: unet(x, t), max(repeats, 5))
    net = FixedNet(unet(x, t).sample.detach())
    schedule, _ = schedule_from_config({**CONFIG, "prediction_type": "epsilon"})
    den = ModelDenoiser(net, schedule, prediction="eps", dtype=torch.float32)
    steps = 10
    print(f"\n## Solver overhead per step, batch 64, 3x32x32, {steps} steps, {torch.get_num_threads()} threads\n")
    print(f"Model: UNet2DModel {params / 1e6:.2f}M params, {model_ms:.1f} ms per evaluation (median). Overhead: "
          f"a whole loop around a zero-cost network returning a fixed tensor, median of {repeats} runs, per step.\n")
    print("| fewstep / diffusers | fewstep ms/step | % of model time | diffusers ms/step | % of model time |")
    print("|---|---|---|---|---|")
    pairs = [("ddim", "DDIM"), ("euler", "Euler"), ("heun", "Heun"), ("dpmpp_2m", "DPM++2M"),
             ("dpmpp_3m", "DPM++3M"), ("unipc", "UniPC"), ("deis", "DEIS")]
    for ours, theirs in pairs:
        solver = make_solver(ours)
        sch = DIFFUSERS[theirs][0](**CONFIG, timestep_spacing="trailing", **DIFFUSERS[theirs][1])
        sch.set_timesteps(steps)
        grid = [schedule.time_of_index(int(v)) for v in dict.fromkeys(sch.timesteps.tolist())]
        grid = grid + ([schedule.t_min] if theirs == "DEIS" else [0.0])
        ms_ours = _median_ms(lambda: sample(den, solver, grid, x_init=x), repeats) / steps  # noqa: B023
        ms_theirs = _median_ms(lambda: diffusers_loop(sch, net, x, steps), repeats) / steps  # noqa: B023
        per_eval = solver.nfe(steps, to_zero=True) / steps
        print(f"| {ours} / {theirs} | {ms_ours:.3f} | {100 * ms_ours / (per_eval * model_ms):.2f} % | "
              f"{ms_theirs:.3f} | {100 * ms_theirs / (per_eval * model_ms):.2f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    accuracy()
    if not args.skip_overhead:
        overhead(args.repeats)


if __name__ == "__main__":
    main()
