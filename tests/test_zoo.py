"""The shipped models: load offline, the right parameterisations, and digits the classifier recognises."""


import pytest
import torch

from fewstep import sample
from fewstep.metrics import DigitsFD
from fewstep.schedules import DiscreteVP, RectifiedFlow
from fewstep.zoo import WEIGHTS, list_models, load, load_classifier
from fewstep.zoo.train import classifier_split

DIFFUSION = {"unet_s": "eps", "unet_m": "eps", "unet_l": "eps", "unet_v": "v", "unet_flow": "flow", "unet_mr": "eps",
             "dit_s": "eps"}


@pytest.fixture(scope="module")
def fd():
    return DigitsFD()


def test_cards_and_sizes():
    cards = list_models()
    assert set(DIFFUSION) | {"classifier"} <= set(cards)
    params = [cards[n]["params"] for n in ("unet_s", "unet_m", "unet_l")]
    assert params[0] < params[1] < params[2] and params[2] / params[0] > 10
    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total <= 30 * 2**20, total


@pytest.mark.parametrize("name", list(DIFFUSION))
def test_loads_offline_with_its_parameterisation(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    den = load(name)
    assert den.prediction == DIFFUSION[name]
    assert isinstance(den.schedule, RectifiedFlow if name == "unet_flow" else DiscreteVP)


def test_classifier_accuracy_on_held_out_digits():
    _, (x, y) = classifier_split()
    with torch.no_grad():
        acc = float((load_classifier()(x).argmax(1) == y).float().mean())
    assert acc >= 0.95


@pytest.mark.parametrize("name", list(DIFFUSION))
def test_100_step_samples_are_digits(name, fd):
    """FD of 100-step DPM-Solver++(2M) sampling within 2x the real-vs-real floor at the same N (both measured)."""
    n = 512
    cond = {"class_labels": torch.arange(n) % 10} if name == "dit_s" else None  # the DiT samples classes
    x = sample(load(name), "dpmpp_2m", 100, shape=(1, 8, 8), seeds=range(n), grid="time_uniform", cond=cond)
    value, floor = fd(x), fd.floor(n)
    assert value <= 2.0 * floor, (name, value, floor)
    confidence = fd.classify(x).max(1).values.mean()
    assert confidence > 0.9
