"""Solvers and their registry: public names (the community's) -> factories.

:data:`SOLVERS` is the one list the CLI, the harness and the docs read.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fewstep.grids import suggest
from fewstep.solvers.base import Model, Solver, State, Step
from fewstep.solvers.bdia import BDIA
from fewstep.solvers.ddim import DDIM, DDPM
from fewstep.solvers.deis import DEIS, IPNDM
from fewstep.solvers.dpm_solver import (
    DPMSolver,
    DPMSolverPP2M,
    DPMSolverPP2MSDE,
    DPMSolverPP3M,
    DPMSolverPP3MCompat,
    DPMSolverPP3MSDE,
)
from fewstep.solvers.euler import Euler, EulerMaruyama, Heun
from fewstep.solvers.evodiff import EVODiff
from fewstep.solvers.forward_value import ForwardValue
from fewstep.solvers.momentum import GHVB, HeavyBall
from fewstep.solvers.sa_solver import SASolver
from fewstep.solvers.unipc import UniPC

__all__ = [
    "BDIA", "DDIM", "DDPM", "DEIS", "IPNDM", "SOLVERS", "DPMSolver", "DPMSolverPP2M", "DPMSolverPP2MSDE",
    "DPMSolverPP3M", "DPMSolverPP3MCompat", "DPMSolverPP3MSDE", "EVODiff", "Euler", "EulerMaruyama", "ForwardValue",
    "GHVB", "HeavyBall", "Heun", "Model", "SASolver", "Solver", "State", "Step", "UniPC", "make_solver",
]

class Preset:
    """A registry entry that is a solver class with some knobs fixed (``dpm_solver_3`` is
    ``DPMSolver(solver_order=3)``). Passing a fixed knob raises instead of silently overriding it: the entry's name
    promises the value."""

    def __init__(self, cls: type[Solver], **fixed: Any) -> None:
        self.cls = cls
        self.fixed = dict(fixed)

    def __call__(self, **knobs: Any) -> Solver:
        clash = sorted(self.fixed.keys() & knobs.keys())
        if clash:
            k = clash[0]
            family = {n: f.fixed for n, f in SOLVERS.items() if isinstance(f, Preset) and f.cls is self.cls}
            match = [n for n, fixed in family.items() if fixed == {**self.fixed, k: knobs[k]}]
            if knobs[k] == self.fixed[k]:
                hint = "; drop it"
            elif match:
                hint = f"; use {match[0]!r} for {k}={knobs[k]!r}"
            else:
                hint = "; the entries of this family are " + ", ".join(
                    f"{n!r} ({k}={fixed.get(k)!r})" for n, fixed in family.items())
            raise TypeError(f"{k} is fixed to {self.fixed[k]!r} by this entry and cannot be passed{hint}")
        return self.cls(**self.fixed, **knobs)

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.fixed.items())
        return f"Preset({self.cls.__name__}, {knobs})"


SOLVERS: dict[str, Callable[..., Solver]] = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "euler": Euler,
    "euler_maruyama": EulerMaruyama,
    "heun": Heun,
    "dpm_solver_1": Preset(DPMSolver, solver_order=1),
    "dpm_solver_2": Preset(DPMSolver, solver_order=2),
    "dpm_solver_3": Preset(DPMSolver, solver_order=3),
    "dpmpp_2m": DPMSolverPP2M,
    "dpmpp_3m": DPMSolverPP3M,
    "dpmpp_3m_compat": DPMSolverPP3MCompat,
    "dpmpp_2m_sde": DPMSolverPP2MSDE,
    "dpmpp_3m_sde": DPMSolverPP3MSDE,
    "unipc": UniPC,
    "deis": DEIS,
    "ipndm": IPNDM,
    "sa_solver": SASolver,
    "hb": HeavyBall,
    "ghvb": GHVB,
    "f_ddim": Preset(ForwardValue, solver_order=1),
    "f_dpmsolver": Preset(ForwardValue, solver_order=2),
    "evodiff": EVODiff,
    "bdia": BDIA,
}


def make_solver(name: str, **knobs: Any) -> Solver:
    """Build solver ``name`` with keyword knobs; unknown names and knobs raise with a hint.

    ``order`` is never a knob: it is the declared convergence order (``Solver.order``, read-only). Methods whose
    order can be chosen take ``solver_order`` (diffusers' name; SA-Solver: ``predictor_order``/``corrector_order``),
    and the entries that fix it (``dpm_solver_1/2/3``, ``f_ddim``, ``f_dpmsolver``) refuse it.
    """
    try:
        factory = SOLVERS[name]
    except KeyError:
        known = ", ".join(SOLVERS)
        raise ValueError(f"unknown solver {name!r}{suggest(name, SOLVERS)}; known solvers: {known}") from None
    if "order" in knobs:
        raise TypeError(f"solver {name!r}: 'order' is the declared convergence order (read-only); "
                        f"{_order_hint(factory)}")
    try:
        return factory(**knobs)
    except TypeError as err:
        raise TypeError(f"solver {name!r}: {err}") from None


def _order_hint(factory: Callable[..., Solver]) -> str:
    """How to choose the method's order of ``factory`` (the knob, or the registry entries that fix it)."""
    if isinstance(factory, Preset) and "solver_order" in factory.fixed:
        family = [n for n, f in SOLVERS.items() if isinstance(f, Preset) and f.cls is factory.cls]
        return f"this entry fixes the method's order; choose it by name: {', '.join(family)}"
    params = inspect.signature(factory).parameters
    if "solver_order" in params:
        return "choose the method's order with solver_order=..."
    if "predictor_order" in params:
        return "choose the method's orders with predictor_order=... and corrector_order=..."
    return "this solver has no knob for its order"
