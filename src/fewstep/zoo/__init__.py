"""Models to run on: exact analytic denoisers (trained models arrive with the model zoo)."""

from fewstep.zoo.analytic import AnalyticDenoiser, GaussianMixture, digits, gaussian, gaussian_mixture

__all__ = ["AnalyticDenoiser", "GaussianMixture", "digits", "gaussian", "gaussian_mixture"]
