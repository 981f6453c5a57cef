"""The command line: help, listings, and one-line errors (exit code 2, no traceback) for bad input."""

import pytest

from fewstep.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_solvers_lists_the_registry(capsys):
    code, out, _ = run(capsys, "solvers")
    assert code == 0 and "dpmpp_3m_compat" in out and "UniPC: A Unified" in out


def test_demo_prints_a_table(capsys):
    code, out, _ = run(capsys, "demo", "--nfe", "4,8", "--seeds", "0-7", "--solvers", "ddim,dpmpp_2m")
    assert code == 0
    lines = [line for line in out.splitlines() if line.startswith(("ddim", "dpmpp_2m"))]
    assert len(lines) == 2 and all(len(line.split()) == 3 for line in lines)


@pytest.mark.parametrize("argv,message", [
    (["demo", "--solvers", "dpmpp2m"], "did you mean 'dpmpp_2m'"),
    (["sample", "--model", "unet_mm", "--out", "x.png"], "unknown model 'unet_mm'"),
    (["sample", "--model", "unet_m", "--solver", "unipcc", "--out", "x.png"], "did you mean 'unipc'"),
    (["sample", "--model", "unet_m", "--out", "x.jpg"], "must end in .png or .npz"),
    (["bench", "--models", "unet_m", "--solvers", "ddimm"], "did you mean 'ddim'"),
    (["report", "--db", "/nonexistent/r.sqlite", "--out", "x"], "no results database"),
])
def test_one_line_errors(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_seed_range_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--model", "unet_m", "--seeds", "9-2", "--out", "x.png"])
    assert exc.value.code == 2
    assert "bad seed range '9-2'" in capsys.readouterr().err


def test_db_not_writable(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(capsys, "bench", "--models", "unet_m", "--solvers", "ddim", "--steps", "2",
                       "--db", str(blocker / "db.sqlite"))
    assert code == 2 and "cannot open the results database" in err


def test_unreadable_and_pickled_checkpoints(capsys, tmp_path):
    import diffusers

    from tiny_pipelines import unet2d

    unet = unet2d(1)
    unet.save_pretrained(tmp_path / "corrupt" / "unet")
    diffusers.DDPMScheduler().save_pretrained(tmp_path / "corrupt" / "scheduler")
    (tmp_path / "corrupt" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a checkpoint")
    code, _, err = run(capsys, "sample", "--model", str(tmp_path / "corrupt"), "--out", str(tmp_path / "x.png"))
    assert code == 2 and "cannot load a UNet2DModel" in err and len(err.strip().splitlines()) == 1

    pickled = tmp_path / "pickled" / "unet"
    unet.save_pretrained(pickled, safe_serialization=False)
    code, _, err = run(capsys, "sample", "--model", str(tmp_path / "pickled"), "--out", str(tmp_path / "x.png"))
    assert code == 2 and "safetensors only, never pickles" in err


def test_sample_a_class_conditional_dit(capsys, tmp_path):
    code, out, _ = run(capsys, "sample", "--model", "dit_s", "--steps", "8", "--seeds", "0-3", "--label", "cycle",
                       "--cache", "block:threshold=0.1", "--quiet", "--out", str(tmp_path / "d.npz"))
    assert code == 0 and "4 samples, 8 NFE; cache reused" in out and "% of the network" in out
