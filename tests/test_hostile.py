"""The command line as a hostile or careless user meets it: bad input gets exit code 2 and one line on stderr,
never a traceback, before any work, and no file or database is created or modified.

Every case runs ``python -m fewstep`` as a real subprocess in a scratch folder whose whole content (names and
sha256 of every file) is compared before and after.
"""

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fewstep.zoo import WEIGHTS

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` -> sha256 of its bytes ('dir' for folders)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def fewstep(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "fewstep", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def refused(cwd: Path, *argv: str, message: str) -> None:
    """Run and assert: exit 2, the one line on stderr holds ``message``, nothing in ``cwd`` changed."""
    before = snapshot(cwd)
    proc = fewstep(cwd, *argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert message in lines[0], lines[0]
    assert snapshot(cwd) == before, "a refused command changed files"


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory) -> Path:
    """A tiny random-weight diffusers UNet2DModel pipeline folder (``unet/`` + ``scheduler/``), safetensors."""
    import diffusers

    folder = tmp_path_factory.mktemp("tiny")
    from tiny_pipelines import unet2d

    unet = unet2d(1)
    unet.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler().save_pretrained(folder / "scheduler")
    unet.save_pretrained(folder / "pickled_unet", safe_serialization=False)
    return folder


def copy_model(src: Path, dst: Path, *, pickled: bool = False) -> Path:
    shutil.copytree(src / "scheduler", dst / "scheduler")
    shutil.copytree(src / ("pickled_unet" if pickled else "unet"), dst / "unet")
    return dst


# ---------------------------------------------------------------- output paths


@pytest.mark.parametrize("out,message", [
    ("nodir/x.npz", "folder nodir does not exist"),
    ("afile/x.png", "afile is not a folder"),
    ("adir.png", "is a folder"),
    ("x.jpg", "must end in .png or .npz"),
])
def test_sample_bad_output_path_refused_before_sampling(tmp_path, out, message):
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "adir.png").mkdir()
    refused(tmp_path, "sample", "--model", "unet_s", "--steps", "2", "--seeds", "0-3", "--quiet", "--out", out,
            message=message)


@pytest.mark.skipif(ROOT_USER, reason="root writes into read-only folders")
def test_sample_read_only_folder_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        refused(tmp_path, "sample", "--model", "unet_s", "--steps", "2", "--quiet", "--out", "ro/x.npz",
                message="not writable")
    finally:
        ro.chmod(0o755)


def test_sample_writes_whole_files_only(tmp_path):
    """A good run leaves exactly the output (no temporary file beside it), readable, RGB when the model is."""
    proc = fewstep(tmp_path, "sample", "--model", "unet_s", "--steps", "2", "--seeds", "0-3", "--quiet",
                   "--out", "x.npz")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.npz"]
    import numpy as np

    with np.load(tmp_path / "x.npz") as f:
        assert f["samples"].shape == (4, 1, 8, 8) and list(f["seeds"]) == [0, 1, 2, 3]


# ---------------------------------------------------------------- bounded, validated options


@pytest.mark.parametrize("argv,message", [
    (["sample", "--model", "dit_s", "--label", "99", "--out", "x.png"], "--label 99 is out of range"),
    (["sample", "--model", "dit_s", "--label", "seven", "--out", "x.png"],
     "integer class, a list or range of them, or 'cycle'"),
    (["sample", "--model", "unet_s", "--label", "3", "--out", "x.png"], "needs a class-conditional model"),
    (["sample", "--model", "unet_s", "--steps", "1000000000000", "--out", "x.png"], "at most 100,000 steps"),
    (["sample", "--model", "unet_s", "--seeds", "0-1000000000", "--out", "x.png"], "at most 1,000,000"),
    (["sample", "--model", "unet_s", "--seeds", "-1", "--out", "x.png"], "bad seed range"),
    (["bench", "--models", "unet_s", "--steps", "1000000000000", "--db", "r.sqlite"], "at most 100,000"),
    (["zoo", "train", "unet_s", "--iters", "-1", "--out", "new"], "expected a positive integer"),
    (["zoo", "train", "unet_s", "--iters", "0", "--out", "new"], "expected a positive integer"),
    (["demo", "--nfe", "5,0"], "expected positive integers"),
    (["sample", "--model", "unet_s", "--out"], "expected one argument"),
])
def test_bad_options(tmp_path, argv, message):
    refused(tmp_path, *argv, message=message)


# ---------------------------------------------------------------- model folders


def test_pickle_beside_a_stray_safetensors_is_never_loaded(tmp_path, tiny_unet):
    """diffusers falls back to a pickled .bin when the safetensors file it wants is missing; any other
    ``*.safetensors`` file in the folder used to satisfy fewstep's check."""
    model = copy_model(tiny_unet, tmp_path / "m", pickled=True)
    (model / "unet" / "notes.safetensors").write_bytes(b"")
    refused(tmp_path, "sample", "--model", "m", "--out", "x.png", message="safetensors only, never pickles")


def test_sharded_index_naming_a_pickle_is_refused(tmp_path, tiny_unet):
    model = copy_model(tiny_unet, tmp_path / "m", pickled=True)
    index = {"metadata": {}, "weight_map": {"conv_in.weight": "diffusion_pytorch_model.bin"}}
    (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    refused(tmp_path, "sample", "--model", "m", "--out", "x.png", message="non-safetensors shards")


def test_checkpoint_missing_a_tensor_is_refused(tmp_path, tiny_unet):
    from safetensors.torch import load_file, save_file

    model = copy_model(tiny_unet, tmp_path / "m")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["conv_out.weight"]
    save_file(tensors, str(weights))
    refused(tmp_path, "sample", "--model", "m", "--out", "x.png", message="missing keys (conv_out.weight)")


def test_checkpoint_with_a_wrong_shape_is_refused(tmp_path, tiny_unet):
    import torch
    from safetensors.torch import load_file, save_file

    model = copy_model(tiny_unet, tmp_path / "m")
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_out.bias"] = torch.zeros(3)
    save_file(tensors, str(weights))
    refused(tmp_path, "sample", "--model", "m", "--out", "x.png", message="cannot load a UNet2DModel")


@pytest.mark.parametrize("which", ["unet/config.json", "scheduler/scheduler_config.json"])
def test_config_that_is_not_json_names_the_file(tmp_path, tiny_unet, which):
    model = copy_model(tiny_unet, tmp_path / "m")
    (model / which).write_text("{not json")
    refused(tmp_path, "sample", "--model", "m", "--out", "x.png", message=f"{which} is not valid JSON")


def test_modified_zoo_weights_fail_their_digest(tmp_path):
    model = tmp_path / "unet_s"
    shutil.copytree(WEIGHTS / "unet_s", model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: still a valid safetensors file
    weights.write_bytes(bytes(data))
    refused(tmp_path, "sample", "--model", "unet_s", "--out", "x.png", message="does not match the sha256")


# ---------------------------------------------------------------- results databases


def foreign_db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT);"
                       "INSERT INTO customers (name) VALUES ('kept');")
    conn.commit()
    conn.close()


def test_bench_refuses_and_never_alters_a_foreign_database(tmp_path):
    foreign_db(tmp_path / "other.sqlite")
    refused(tmp_path, "bench", "--models", "unet_s", "--solvers", "ddim", "--steps", "2", "--seeds", "0-3",
            "--db", "other.sqlite", message="other.sqlite")
    refused(tmp_path, "report", "--db", "other.sqlite", "--out", "rep", message="other.sqlite")


def test_bench_refuses_a_file_that_is_not_sqlite(tmp_path):
    (tmp_path / "notes.sqlite").write_text("these are my notes, not a database\n" * 20)
    refused(tmp_path, "bench", "--models", "unet_s", "--solvers", "ddim", "--steps", "2", "--seeds", "0-3",
            "--db", "notes.sqlite", message="notes.sqlite")


def test_bench_bad_report_folder_refused_before_running(tmp_path):
    (tmp_path / "afile").write_text("keep me")
    refused(tmp_path, "bench", "--models", "unet_s", "--solvers", "ddim", "--steps", "2", "--seeds", "0-3",
            "--db", "r.sqlite", "--report", "afile", message="afile is a file")


def test_report_bad_output_folder(tmp_path):
    refused(tmp_path, "report", "--db", "missing.sqlite", "--out", "rep", message="no results database")


def test_bench_diffusers_peer_that_cannot_run_a_flow_model(tmp_path):
    refused(tmp_path, "bench", "--models", "unet_flow", "--solvers", "ddim", "--steps", "2", "--seeds", "0-3",
            "--diffusers", "DDIM", "--db", "r.sqlite", message="DDIM")
