"""No false alarms, no silently wrong answers: defects found by probing the API as a careless user would."""

import math

import numpy as np
import pytest
import torch

from fewstep import make_solver, sample
from fewstep.cli import main
from fewstep.models.base import Denoiser
from fewstep.noise import MAX_SEEDS, parse_seeds
from fewstep.outputs import atomic_write, check_output_dir, check_output_file, mosaic
from fewstep.schedules import DiscreteVP, LinearVP
from fewstep.zoo import AnalyticDenoiser, gaussian


class Ones(Denoiser):
    """x0_hat = 1 everywhere: finite, and large enough in number to overflow a float16 sum."""

    def __init__(self) -> None:
        self.schedule = DiscreteVP.named("linear")

    def __call__(self, x: torch.Tensor, t: float, cond: object = None) -> torch.Tensor:
        return torch.ones_like(x)


def test_finite_float16_outputs_are_not_reported_as_nan():
    # 16 x 3 x 64 x 64 ones sum to 196608 > 65504, the largest float16.
    x = sample(Ones(), "ddim", 2, shape=(3, 64, 64), seeds="0-15", dtype=torch.float16)
    assert x.dtype == torch.float16 and bool(torch.isfinite(x).all())


def test_a_real_nan_is_still_caught_at_its_step():
    class NaNAtSecond(Ones):
        def __call__(self, x, t, cond=None):
            return torch.full_like(x, math.nan) if t < 0.7 else torch.ones_like(x)

    with pytest.raises(ValueError, match="NaN or inf at step 1"):
        sample(NaNAtSecond(), "ddim", [1.0, 0.6, 0.3, 0.0], shape=(2,), dtype=torch.float16)


def test_step_count_must_be_an_int():
    den = AnalyticDenoiser(gaussian(dim=3), LinearVP())
    with pytest.raises(TypeError, match="a step count must be an int, got 5.0"):
        sample(den, "ddim", 5.0, shape=(3,))
    with pytest.raises(TypeError, match="a step count must be an int"):
        sample(den, "ddim", torch.tensor(5.0), shape=(3,))


def test_absurd_step_counts_are_bounded_before_allocating():
    den = AnalyticDenoiser(gaussian(dim=3), LinearVP())
    with pytest.raises(ValueError, match="steps must be <= 100,000"):
        sample(den, "ddim", 10**12, shape=(3,))


def test_nan_time_is_named_before_the_network_runs():
    calls = []

    def net(x, t):
        calls.append(t)
        return x

    from fewstep.models import ModelDenoiser

    den = ModelDenoiser(net, DiscreteVP.named("linear"))
    with pytest.raises(ValueError, match="t=nan is outside"):
        den(torch.zeros(1, 2), math.nan)
    assert calls == []


@pytest.mark.parametrize("seeds,message", [
    ([-1], "non-negative integers"),
    ([1.7], "non-negative integers"),
    ([0, True], "non-negative integers"),
    ([2**63], "below 2\\*\\*63"),
    ("0-1000000000", "at most 1,000,000"),
    (MAX_SEEDS + 1, "at most 1,000,000"),
])
def test_api_seeds_are_checked_like_the_cli(seeds, message):
    with pytest.raises(ValueError, match=message):
        parse_seeds(seeds)
    den = AnalyticDenoiser(gaussian(dim=3), LinearVP())
    with pytest.raises(ValueError, match=message):
        sample(den, "ddim", 2, shape=(3,), seeds=seeds)


def test_seeds_accept_numpy_and_tensor_integers():
    assert parse_seeds(np.arange(3)) == [0, 1, 2]
    assert parse_seeds(torch.tensor([4, 2])) == [4, 2]
    assert parse_seeds(np.int64(2)) == [0, 1]


def test_mosaic_keeps_colour_and_refuses_latents():
    x = torch.zeros(2, 3, 4, 4)
    x[:, 0] = 1.0  # pure red
    img = mosaic(x, scale=1)
    assert img.shape == (1 * 5 + 1, 2 * 5 + 1, 3)  # one row of two 4x4 tiles with 1-pixel gutters
    assert tuple(img[1, 1]) == (255, 128, 128) and tuple(img[0, 0]) == (255, 255, 255)
    assert mosaic(torch.zeros(2, 1, 4, 4)).ndim == 2
    with pytest.raises(ValueError, match="save latents as .npz"):
        mosaic(torch.zeros(2, 4, 4, 4))


def test_rgb_model_is_saved_in_colour(tmp_path, capsys):
    import diffusers
    from PIL import Image

    from tiny_pipelines import unet2d

    unet = unet2d(3)
    unet.save_pretrained(tmp_path / "rgb" / "unet")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "rgb" / "scheduler")
    code = main(["sample", "--model", str(tmp_path / "rgb"), "--steps", "2", "--seeds", "0-3", "--quiet",
                 "--out", str(tmp_path / "x.png")])
    assert code == 0, capsys.readouterr().err
    img = np.asarray(Image.open(tmp_path / "x.png"))
    assert img.ndim == 3 and img.shape[2] == 3
    assert not (np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2]))


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x.bin", boom)
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    assert (tmp_path / "x.bin").read_bytes() == b"old"
    atomic_write(tmp_path / "x.bin", lambda f: f.write(b"new"))
    assert (tmp_path / "x.bin").read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_output_checks(tmp_path):
    (tmp_path / "f").write_text("")
    assert check_output_file(tmp_path / "a.npz", (".npz",)) == tmp_path / "a.npz"
    for bad, message in [(tmp_path / "a.txt", "must end in"), (tmp_path / "no" / "a.npz", "does not exist"),
                         (tmp_path / "f" / "a.npz", "is not a folder")]:
        with pytest.raises(ValueError, match=message):
            check_output_file(bad, (".npz",))
    with pytest.raises(ValueError, match="is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="not an existing folder"):
        check_output_dir(tmp_path / "no" / "deeper")
    assert check_output_dir(tmp_path / "new") == tmp_path / "new" and not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]  # the write probes left nothing behind


def test_make_solver_still_refuses_unknown_knobs():
    with pytest.raises(TypeError, match="etta"):
        make_solver("ddim", etta=1)


def test_trained_models_carry_verified_digests(tmp_path):
    import json
    import shutil

    from fewstep import zoo
    from fewstep.zoo.train import train

    folder = train("unet_s", tmp_path, iters=2, log_every=0)
    card = json.loads((folder / "card.json").read_text())
    assert set(card["sha256"]) == {"unet/diffusion_pytorch_model.safetensors"}
    zoo.load(folder)  # verified and loaded
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", folder / "unet" / "extra.safetensors")
    with pytest.raises(ValueError, match="holds weights its card does not list: unet/extra.safetensors"):
        zoo.load(folder)


def test_every_shipped_model_lists_its_digests():
    from fewstep import zoo

    for name in zoo.list_models():
        zoo.verify_digests(zoo.WEIGHTS / name)


def test_latent_model_says_it_writes_undecoded_latents(tmp_path, capsys):
    import diffusers

    from tiny_pipelines import unet2d

    unet2d(4).save_pretrained(tmp_path / "lat" / "unet")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "lat" / "scheduler")
    args = ["sample", "--model", str(tmp_path / "lat"), "--steps", "2", "--seeds", "0-1", "--quiet", "--out"]
    assert main([*args, str(tmp_path / "x.png")]) == 2
    assert "a PNG grid needs 1 or 3 channels" in capsys.readouterr().err
    assert main([*args, str(tmp_path / "x.npz")]) == 0
    assert "2 undecoded latents" in capsys.readouterr().out


def test_class_conditional_unet_takes_labels(tmp_path, capsys):
    import diffusers

    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, norm_num_groups=4, num_class_embeds=10)
    unet.save_pretrained(tmp_path / "cc" / "unet")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "cc" / "scheduler")
    args = ["sample", "--model", str(tmp_path / "cc"), "--steps", "2", "--seeds", "0-1", "--quiet"]
    assert main([*args, "--label", "3", "--out", str(tmp_path / "x.npz")]) == 0
    assert main([*args, "--label", "10", "--out", str(tmp_path / "x.npz")]) == 2
    assert "classes 0-9" in capsys.readouterr().err
