"""Hardening of the solver API and its neighbours: the order knob is not the declared order, presets refuse
overrides, SA-Solver's noise window is diffusers' rule, named beta tables are diffusers' bit for bit, the zoo never
imports the bench, and bad training lengths are refused."""

import inspect
import shutil
from pathlib import Path

import diffusers
import pytest
import torch

import fewstep
from fewstep import SOLVERS, make_solver
from fewstep.grids import trailing
from fewstep.models import schedule_from_config
from fewstep.schedules import DiscreteVP, LinearVP, NoiseSchedule
from fewstep.solvers import DPMSolver, ForwardValue, Step
from fewstep.zoo import AnalyticDenoiser, gaussian
from import_graph import imported_modules

# The order knob ---------------------------------------------------------------------------------------------------

ORDER_KNOB = ["dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "unipc", "deis", "ipndm", "hb", "ghvb", "f_ddim",
              "f_dpmsolver"]


def _cls(name: str) -> type:
    factory = SOLVERS[name]
    return getattr(factory, "cls", factory)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_no_constructor_knob_is_called_order(name):
    """``order`` is the declared convergence order (a read-only property) everywhere; no constructor takes it."""
    assert "order" not in inspect.signature(_cls(name)).parameters
    assert isinstance(make_solver(name).order, int)


@pytest.mark.parametrize("name", ORDER_KNOB)
def test_the_method_order_knob_is_solver_order(name):
    assert "solver_order" in inspect.signature(_cls(name)).parameters


@pytest.mark.parametrize("name", list(SOLVERS))
def test_passing_order_raises_a_clear_error(name):
    with pytest.raises(TypeError, match=rf"solver '{name}': 'order' is the declared convergence order \(read-only\)"):
        make_solver(name, order=2)


def test_order_error_names_the_knob_to_use():
    with pytest.raises(TypeError, match=r"choose the method's order with solver_order=\.\.\."):
        make_solver("unipc", order=2)
    with pytest.raises(TypeError, match="dpm_solver_1, dpm_solver_2, dpm_solver_3"):
        make_solver("dpm_solver_1", order=3)
    with pytest.raises(TypeError, match="predictor_order=.*corrector_order="):
        make_solver("sa_solver", order=3)


def test_solver_order_chooses_the_method_and_order_reports_convergence():
    unipc = make_solver("unipc", solver_order=2)
    assert unipc.solver_order == 2 and unipc.order == 3  # UniP-2 + UniC converges at order 3
    assert make_solver("unipc", solver_order=2, corrector=False).order == 2
    assert make_solver("deis", solver_order=2).order == 2
    assert make_solver("ipndm", solver_order=4).order == 2  # fixed AB weights: order 2 whatever the knob
    assert make_solver("ghvb", solver_order=3).solver_order == 3
    assert make_solver("hb", base="plms", solver_order=4, beta=1.0).order == 4
    for k in (1, 2, 3):
        s = make_solver(f"dpm_solver_{k}")
        assert s.order == k and s.nfe_per_step == k and s.name == f"dpm_solver_{k}"
    assert make_solver("f_ddim").solver_order == 1 and make_solver("f_dpmsolver").solver_order == 2


@pytest.mark.parametrize(("name", "value", "hint"), [
    ("dpm_solver_1", 3, "use 'dpm_solver_3' for solver_order=3"),
    ("dpm_solver_3", 1, "use 'dpm_solver_1' for solver_order=1"),
    ("dpm_solver_2", 2, "drop it"),
    ("f_ddim", 2, "use 'f_dpmsolver' for solver_order=2"),
    ("f_dpmsolver", 3, "'f_ddim' \\(solver_order=1\\), 'f_dpmsolver' \\(solver_order=2\\)"),
])
def test_presets_refuse_an_override_of_the_knob_they_fix(name, value, hint):
    with pytest.raises(TypeError, match=rf"solver '{name}': solver_order is fixed to \d by this entry.*{hint}"):
        make_solver(name, solver_order=value)


def test_presets_still_take_their_other_knobs_and_bad_choices_raise():
    with pytest.raises(TypeError, match="solver 'dpm_solver_2'.*eta"):
        make_solver("dpm_solver_2", eta=0.5)
    with pytest.raises(ValueError, match="solver_order must be one of"):
        DPMSolver(solver_order=4)
    with pytest.raises(ValueError, match="solver_order must be one of"):
        ForwardValue(solver_order=4)
    with pytest.raises(ValueError, match="solver_order must be one of"):
        make_solver("unipc", solver_order=4)


# SA-Solver's noise window -----------------------------------------------------------------------------------------

def _noisy_times(schedule: NoiseSchedule, grid: list[float]) -> list[float]:
    """Start times of the steps where fewstep's default SA-Solver adds noise: a step adds noise iff its output
    depends on the noise passed in (probed with zero and non-zero noise from the same state)."""
    den = AnalyticDenoiser(gaussian(dim=4), schedule)
    solver = make_solver("sa_solver")
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    state = solver.init(x)
    count, to_zero = len(grid) - 1, grid[-1] == 0.0
    noisy = []
    for i in range(count - int(to_zero)):
        step = Step.of(schedule, i, count, grid[i], grid[i + 1], to_zero=to_zero)
        quiet, next_state = solver.step(den, x, step, state, torch.zeros_like(x))
        loud, _ = solver.step(den, x, step, state, torch.ones_like(x))
        if not torch.equal(quiet, loud):
            noisy.append(grid[i])
        x, state = quiet, next_state
    return noisy


def _noisy_training_steps(schedule: DiscreteVP, grid: list[float]) -> set[int]:
    return {round(schedule.index(t)) for t in _noisy_times(schedule, grid)}


def _diffusers_noisy(timesteps: list[int]) -> set[int]:
    tau_func = diffusers.SASolverScheduler().tau_func  # the default: 1 iff 200 <= t <= 800
    return {t for t in timesteps if tau_func(torch.tensor(t)) != 0}


@pytest.mark.parametrize("steps", [10, 20])
def test_sa_solver_window_is_diffusers_tau_func_on_trailing_grids(steps):
    """Both the continuous trailing grid and the grid of diffusers' integer timesteps (as the diffusers parity
    tests and the scheduler integration build it): the old ``t / t_max in [0.2, 0.8]`` rule put noise on
    training step 199 (``t = 0.2``) of the latter, where diffusers puts none."""
    schedule = DiscreteVP.named("linear")
    scheduler = diffusers.SASolverScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    assert 199 in timesteps and 799 in timesteps
    continuous = trailing(schedule, steps).tolist()
    on_table = [schedule.time_of_index(t) for t in timesteps] + [0.0]
    for grid in (continuous, on_table):
        assert [round(schedule.index(t)) for t in grid[:-1]] == timesteps  # the same steps
        assert _noisy_training_steps(schedule, grid) == _diffusers_noisy(timesteps)


def test_sa_solver_window_edges_are_diffusers():
    """Training steps 200 and 800 are inside, 199 and 801 outside, as ``200 <= timestep <= 800``."""
    schedule = DiscreteVP.named("linear")
    timesteps = [999, 801, 800, 799, 500, 201, 200, 199, 100]
    grid = [schedule.time_of_index(t) for t in timesteps] + [0.0]
    assert _noisy_training_steps(schedule, grid) == _diffusers_noisy(timesteps) == {800, 799, 500, 201, 200}


def test_sa_solver_window_on_a_continuous_schedule_is_a_fraction_of_t_max():
    schedule = LinearVP()
    grid = [1.0, 0.85, 0.8, 0.5, 0.2, 0.15, 0.05, 0.0]
    assert _noisy_times(schedule, grid) == [0.8, 0.5, 0.2]


# Named beta tables ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1000, 37, 500, 4000])
@pytest.mark.parametrize(("name", "betas"), [("linear", {}), ("scaled_linear", {}), ("squaredcos_cap_v2", {}),
                                             ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012})])
def test_named_tables_are_diffusers_bit_for_bit(name, betas, n):
    ref = diffusers.DDPMScheduler(num_train_timesteps=n, beta_schedule=name, **betas).alphas_cumprod
    ours = torch.from_numpy(DiscreteVP.named(name, num_train_timesteps=n, **betas).alphas_cumprod)
    assert torch.equal(ours, ref.double())
    for cls in (diffusers.DDPMScheduler, diffusers.DDIMScheduler, diffusers.DPMSolverMultistepScheduler):
        config = cls(num_train_timesteps=n, beta_schedule=name, **betas).config
        schedule, _ = schedule_from_config(config)
        assert torch.equal(torch.from_numpy(schedule.alphas_cumprod), ref.double()), cls.__name__


# Import direction: bench uses zoo, never the reverse --------------------------------------------------------------

SRC = Path(fewstep.__file__).parent


def _imports(path: Path, root: Path = SRC) -> set[str]:
    """Every module ``path`` (a file of the ``fewstep`` package at ``root``) imports, at any depth (inside
    functions too), relative imports resolved; for ``from a import b`` both ``a`` and ``a.b`` (``b`` may be a
    module)."""
    return imported_modules(path, root)


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_import_scanner_sees_function_level_and_relative_imports(tmp_path):
    (tmp_path / "zoo").mkdir()
    probe = tmp_path / "zoo" / "probe.py"
    probe.write_text("def f():\n    from ..bench import metrics\n    import fewstep.bench.cards\n"
                     "    from . import train\n")
    found = _imports(probe, tmp_path)
    assert {"fewstep.bench.metrics", "fewstep.bench.cards", "fewstep.zoo.train"} <= found


def test_the_zoo_never_imports_the_bench():
    files = sorted((SRC / "zoo").rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(SRC)): sorted(m for m in _imports(f) if _under(m, "fewstep.bench"))
                 for f in files}
    assert not {k: v for k, v in offenders.items() if v}


def test_bench_metrics_does_not_import_zoo_train():
    found = _imports(SRC / "metrics.py")
    assert not [m for m in found if _under(m, "fewstep.zoo.train")]
    assert "fewstep.data.digits_tensor" in found


def test_data_module_depends_on_nothing_in_fewstep():
    assert not [m for m in _imports(SRC / "data.py") if _under(m, "fewstep")]


def test_card_evaluation_runs_on_the_bench_side(tmp_path):
    """``fewstep.bench.cards.evaluate`` (the FD in model cards) on a copy of a shipped model, a few steps."""
    from fewstep.bench.cards import evaluate
    from fewstep.zoo import WEIGHTS

    folder = tmp_path / "unet_s"
    shutil.copytree(WEIGHTS / "unet_s", folder)
    result = evaluate("unet_s", folder, steps=3, n=16)
    assert result["fd_samples"] == 16 and result["fd_1000_step"] > 0 and result["fd_floor"] > 0
    card = (folder / "card.json").read_text()
    assert '"fd_samples": 16' in card and '"name": "unet_s"' in card


# Training length --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("iters", [-1, 0, 2.5, True])
def test_train_refuses_bad_iters_before_doing_anything(iters, tmp_path):
    from fewstep.zoo.train import train

    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        train("unet_s", tmp_path, iters=iters)
    assert not any(tmp_path.iterdir())
