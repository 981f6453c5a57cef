"""``fewstep generate`` and ``fewstep.pipelines`` on a tiny real StableDiffusionPipeline saved to disk: from a
prompt to an RGB grid, seeds that name images, the scheduler's call count, safetensors only, one-line errors."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from fewstep.cli import main  # noqa: E402
from fewstep.pipelines import generate, load_pipeline, use_fewstep  # noqa: E402


def test_generate_writes_an_rgb_grid(sd_folder, tmp_path, capsys):
    from PIL import Image

    code = main(["generate", "--pipeline", str(sd_folder), "--prompt", "a red fox", "--solver", "unipc",
                 "--steps", "4", "--seeds", "0-3", "--quiet", "--out", str(tmp_path / "fox.png")])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "4 images, unipc on the diffusers grid, 4 network calls" in out.out
    img = np.asarray(Image.open(tmp_path / "fox.png"))
    assert img.shape == (2 * 17 + 1, 2 * 17 + 1, 3)  # 2 x 2 tiles of 16 x 16 with 1-pixel gutters, RGB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.png"]


def test_generate_with_a_cache(sd_folder, tmp_path, capsys):
    """The cache acts on the pipeline's own U-Net; without reuse the latents are those of the uncached run."""
    argv = ["generate", "--pipeline", str(sd_folder), "--prompt", "a cat", "--solver", "ddim", "--steps", "6",
            "--seeds", "0-1", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "plain.npz")]) == 0
    assert main([*argv, "--cache", "deepcache:interval=1", "--out", str(tmp_path / "exact.npz")]) == 0
    assert main([*argv, "--cache", "taylorseer:interval=3", "--out", str(tmp_path / "ts.npz")]) == 0
    out = capsys.readouterr().out
    assert "cache taylorseer:interval=3 reused 3 of 6 evaluations" in out
    with np.load(tmp_path / "plain.npz") as a, np.load(tmp_path / "exact.npz") as b, np.load(tmp_path / "ts.npz") as c:
        assert np.array_equal(a["latents"], b["latents"]) and not np.array_equal(a["latents"], c["latents"])
    assert main([*argv, "--cache", "auto:target_error=0.3:method=taylorseer", "--out", str(tmp_path / "a.npz")]) == 0
    assert "cache auto:target_error=0.3:method=taylorseer -> taylorseer:" in capsys.readouterr().out


def test_seed_k_is_the_same_image_in_any_batch(sd_folder):
    pipe = load_pipeline(sd_folder)
    use_fewstep(pipe, "dpmpp_2m", "time_quadratic")
    four, calls = generate(pipe, "a cat", seeds=[5, 6, 7, 8], steps=4, latents=True, progress=False)
    one, _ = generate(pipe, "a cat", seeds=[7], steps=4, latents=True, progress=False)
    assert calls == 4 and four.shape == (4, 4, 8, 8)
    # the noise is per seed; the network's float32 kernels differ with the batch size by ~1e-6 relative
    assert float((four[2] - one[0]).abs().max() / one.abs().max()) < 1e-5


def test_npz_keeps_latents(sd_folder, tmp_path, capsys):
    code = main(["generate", "--pipeline", str(sd_folder), "--prompt", "a cat", "--solver", "heun",
                 "--grid", "karras", "--steps", "3", "--seeds", "0-1", "--quiet", "--out", str(tmp_path / "x.npz")])
    assert code == 0, capsys.readouterr().err
    with np.load(tmp_path / "x.npz") as f:
        assert f["latents"].shape == (2, 4, 8, 8) and int(f["network_calls"]) == 5 and list(f["seeds"]) == [0, 1]


def test_pickled_component_is_refused(sd_folder, tmp_path):
    import shutil

    import transformers

    bad = tmp_path / "sd"
    shutil.copytree(sd_folder, bad)
    text = transformers.CLIPTextModel.from_pretrained(bad / "text_encoder")
    (bad / "text_encoder" / "model.safetensors").unlink()
    torch.save(text.state_dict(), bad / "text_encoder" / "pytorch_model.bin")  # the pickle transformers would read
    with pytest.raises(ValueError, match="cannot load the pipeline"):
        load_pipeline(bad)


@pytest.mark.parametrize("argv,message", [
    (["--pipeline", "nowhere", "--prompt", "x", "--out", "x.png"], "not a diffusers pipeline folder"),
    (["--prompt", "x", "--solver", "unipcc", "--out", "x.png"], "did you mean 'unipc'"),
    (["--prompt", "x", "--out", "nodir/x.png"], "does not exist"),
    (["--prompt", "x", "--height", "20", "--out", "x.png"], "multiple of 8"),
    (["--prompt", "x", "--solver", "f_ddim", "--out", "x.png"], "run it with fewstep.sample"),
    (["--prompt", "x", "--cache", "auto:target_error=-0.05", "--out", "x.png"], "target_error must be"),
    (["--prompt", "x", "--cache", "deepcach", "--out", "x.png"], "unknown cache 'deepcach'"),
    (["--prompt", "x", "--cache", "block:threshold=0.1", "--out", "x.png"], "for a UNet2DConditionModel use"),
])
def test_generate_errors(sd_folder, tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    if "--pipeline" not in argv:
        argv = ["--pipeline", str(sd_folder), *argv]
    code = main(["generate", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_generate_device_is_checked_before_work(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--pipeline", "x", "--prompt", "x", "--device", "cuda", "--out", "x.png"])
    assert exc.value.code == 2 and "no CUDA device" in capsys.readouterr().err
