"""Solvers and their registry: public names (the community's) -> factories.

:data:`SOLVERS` is the one list the CLI, the harness and the docs read.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
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

SOLVERS: dict[str, Callable[..., Solver]] = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "euler": Euler,
    "euler_maruyama": EulerMaruyama,
    "heun": Heun,
    "dpm_solver_1": partial(DPMSolver, order=1),
    "dpm_solver_2": partial(DPMSolver, order=2),
    "dpm_solver_3": partial(DPMSolver, order=3),
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
    "f_ddim": partial(ForwardValue, order=1),
    "f_dpmsolver": partial(ForwardValue, order=2),
    "evodiff": EVODiff,
    "bdia": BDIA,
}


def make_solver(name: str, **knobs: Any) -> Solver:
    """Build solver ``name`` with keyword knobs; unknown names and knobs raise with a hint."""
    try:
        factory = SOLVERS[name]
    except KeyError:
        known = ", ".join(SOLVERS)
        raise ValueError(f"unknown solver {name!r}{suggest(name, SOLVERS)}; known solvers: {known}") from None
    try:
        return factory(**knobs)
    except TypeError as err:
        raise TypeError(f"solver {name!r}: {err}") from None
