"""Denoisers: pretrained networks adapted to ``x0_hat = denoiser(x, t, cond)``, and wrappers around them."""

from fewstep.models.adapter import PREDICTIONS, ModelDenoiser, native_time_default
from fewstep.models.base import Cond, Denoiser, Run
from fewstep.models.diffusers import from_diffusers, schedule_from_config
from fewstep.models.families import FAMILIES, ModelFamily, family_of
from fewstep.models.guidance import ClassifierFreeGuidance
from fewstep.models.scheduler_config import diffusers_grid, dynamic_shift, native_time_from_config, time_from_native

__all__ = [
    "FAMILIES",
    "PREDICTIONS",
    "ClassifierFreeGuidance",
    "Cond",
    "Denoiser",
    "ModelDenoiser",
    "ModelFamily",
    "Run",
    "diffusers_grid",
    "dynamic_shift",
    "family_of",
    "from_diffusers",
    "native_time_default",
    "native_time_from_config",
    "schedule_from_config",
    "time_from_native",
]
