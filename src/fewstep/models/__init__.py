"""Denoisers: pretrained networks adapted to ``x0_hat = denoiser(x, t, cond)``, and wrappers around them."""

from fewstep.models.adapter import PREDICTIONS, ModelDenoiser, native_time_default
from fewstep.models.base import Cond, Denoiser, Run
from fewstep.models.diffusers import from_diffusers, schedule_from_config
from fewstep.models.guidance import ClassifierFreeGuidance

__all__ = [
    "PREDICTIONS",
    "ClassifierFreeGuidance",
    "Cond",
    "Denoiser",
    "ModelDenoiser",
    "Run",
    "from_diffusers",
    "native_time_default",
    "schedule_from_config",
]
