"""Denoiser adapters: every prediction type, guidance, diffusers models loaded offline from a local folder."""

import os

import pytest
import torch
from tests.conftest import rel_err

from fewstep import ClassifierFreeGuidance, from_diffusers, sample
from fewstep.models import ModelDenoiser
from fewstep.schedules import EDM, CosineVP, DiscreteVP, LinearVP, RectifiedFlow
from fewstep.zoo import AnalyticDenoiser, digits, gaussian_mixture

DATA = gaussian_mixture(dim=5, components=3, std=0.4)


@pytest.mark.parametrize("schedule", [DiscreteVP.named("scaled_linear", beta_start=0.00085, beta_end=0.012),
                                      DiscreteVP.named("squaredcos_cap_v2"), LinearVP(), CosineVP(), EDM()])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score"])
def test_prediction_types_recover_x0(schedule, prediction):
    exact = AnalyticDenoiser(DATA, schedule)
    den = ModelDenoiser(exact.as_model(prediction), schedule, prediction=prediction)
    x = torch.randn(4, 5, dtype=torch.float64)
    for t in (schedule.t_min * 3, 0.5 * (schedule.t_min + schedule.t_max), schedule.t_max):
        xt = x * (schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2) ** 0.5
        assert rel_err(den(xt, t), exact(xt, t)) < 1e-9


def test_flow_prediction():
    sched = RectifiedFlow()
    exact = AnalyticDenoiser(DATA, sched)
    den = ModelDenoiser(exact.as_model("flow"), sched, prediction="flow")
    x = torch.randn(4, 5, dtype=torch.float64)
    assert rel_err(den(x, 0.7), exact(x, 0.7)) < 1e-12
    assert rel_err(sample(den, "dpmpp_2m", 10, x_init=x), sample(exact, "dpmpp_2m", 10, x_init=x)) < 1e-9


def test_classifier_free_guidance():
    sched = LinearVP()

    class Inner(AnalyticDenoiser):
        def __call__(self, x, t, cond=None):
            return super().__call__(x, t) + (0.0 if cond is None else cond["shift"])

    inner = Inner(DATA, sched)
    x = torch.randn(3, 5, dtype=torch.float64)
    base = inner(x, 0.5)
    cfg = ClassifierFreeGuidance(inner, 3.0)
    assert torch.allclose(cfg(x, 0.5, {"shift": 0.1}), base + 0.3)
    assert torch.equal(ClassifierFreeGuidance(inner, 1.0)(x, 0.5, {"shift": 0.1}), inner(x, 0.5, {"shift": 0.1}))


def test_digits_ideal_denoiser_returns_training_points_at_low_noise():
    data = digits()
    sched = DiscreteVP.named("linear")
    den = AnalyticDenoiser(data, sched)
    x0 = data.means[:4].reshape(4, 1, 8, 8)
    t = sched.t_min
    xt = sched.alpha(t) * x0 + sched.sigma(t) * torch.randn_like(x0) * 0.1
    assert torch.allclose(den(xt, t), x0, atol=1e-6)


def test_from_diffusers_local_folder_offline(tmp_path, monkeypatch):
    import diffusers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    unet.save_pretrained(tmp_path / "unet")
    scheduler.save_pretrained(tmp_path / "scheduler")
    den = from_diffusers(os.fspath(tmp_path))
    assert den.prediction == "v" and isinstance(den.schedule, DiscreteVP)
    x = torch.randn(2, 1, 8, 8)
    t = den.schedule.time_of_index(500)
    with torch.no_grad():
        v = unet(x, torch.full((2,), 500.0)).sample
    a, s = den.schedule.alpha(t), den.schedule.sigma(t)
    assert torch.allclose(den(x, t), a * x - s * v, atol=1e-5)
    out = sample(den, "unipc", 5, shape=(1, 8, 8), seeds=range(2))
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    # the same with the model and scheduler objects
    assert torch.allclose(from_diffusers(unet, scheduler)(x, t), den(x, t))


def test_from_diffusers_errors(tmp_path):
    with pytest.raises(ValueError, match="no diffusers model folder"):
        from_diffusers(os.fspath(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        from_diffusers(os.fspath(tmp_path))
