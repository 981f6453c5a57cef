"""fewstep: fast training-free sampling for pretrained diffusion models."""

from fewstep import grids, schedules
from fewstep.caching import calibrate_cache, disable_cache, enable_cache, make_cache
from fewstep.hooks import CostMeter, NFECounter, ProgressBar, Timer, TrajectoryRecorder
from fewstep.inversion import Inversion, invert, regenerate
from fewstep.models import ClassifierFreeGuidance, Denoiser, ModelDenoiser, from_diffusers
from fewstep.plan import Plan
from fewstep.quant import SCHEMES as QUANT_SCHEMES
from fewstep.quant import quantize
from fewstep.sample import sample
from fewstep.solvers import SOLVERS, Solver, make_solver
from fewstep.tuning import tune

__version__ = "0.1.0"

__all__ = [
    "QUANT_SCHEMES",
    "SOLVERS",
    "ClassifierFreeGuidance",
    "CostMeter",
    "Inversion",
    "Denoiser",
    "ModelDenoiser",
    "NFECounter",
    "Plan",
    "ProgressBar",
    "Solver",
    "Timer",
    "TrajectoryRecorder",
    "calibrate_cache",
    "disable_cache",
    "enable_cache",
    "from_diffusers",
    "grids",
    "invert",
    "make_cache",
    "make_solver",
    "quantize",
    "regenerate",
    "sample",
    "schedules",
    "tune",
]
