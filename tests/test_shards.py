"""Shard folders: streaming moments equal the in-memory ones, a run writes whole shards, resumes where it stopped,
refuses another run's folder, and the FD of a folder is the FD of its samples at once."""

import json

import numpy as np
import pytest
import torch

from fewstep.plan import Plan
from fewstep.shards import ShardFolder, StreamingMoments, read_shards, run_shards


def test_streaming_moments_equal_numpy_at_once():
    g = np.random.default_rng(0)
    rows = 3.0 + g.standard_normal((1000, 6)) * np.array([1, 2, 0.1, 5, 1, 1e-3])  # a large mean, mixed scales
    moments = StreamingMoments()
    for chunk in np.array_split(rows, [7, 8, 300, 301, 999]):
        moments.add(chunk)
    mean, cov = moments.stats()
    np.testing.assert_allclose(mean, rows.mean(0), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(cov, np.cov(rows, rowvar=False), rtol=1e-11, atol=1e-15)
    assert moments.n == 1000
    with pytest.raises(ValueError, match="rows of 5 features after rows of 6"):
        moments.add(rows[:3, :5])
    with pytest.raises(ValueError, match="at least 2 rows"):
        StreamingMoments().stats()


@pytest.fixture(scope="module")
def sampler():
    return Plan(model="unet_s", solver="dpmpp_2m", steps=4).build()


def test_a_run_writes_whole_shards_and_resumes(tmp_path, sampler):
    seeds = list(range(10, 21))  # 11 seeds: 4 shards of 3 (the last of 2)
    run = {"plan": sampler.plan.to_dict()}
    shards = ShardFolder(tmp_path / "out", seeds, 3, run)
    assert shards.prepare() == 0 and shards.count == 4
    assert run_shards(sampler, shards) == (4, 4)
    got = list(read_shards(tmp_path / "out"))
    assert [s.tolist() for s, _ in got] == [[10, 11, 12], [13, 14, 15], [16, 17, 18], [19, 20]]
    whole = sampler.sample(seeds=seeds, batch_size=3)
    assert torch.equal(torch.from_numpy(np.concatenate([x for _, x in got])), whole)
    # an interrupted run: shard 2 missing, shard 1 torn by someone else; the rerun writes exactly those two
    shards.path(2).unlink()
    shards.path(1).write_bytes(b"not an npz")
    before = {i: shards.path(i).stat().st_mtime_ns for i in (0, 3)}
    again = ShardFolder(tmp_path / "out", seeds, 3, run)
    assert again.prepare() == 2 and again.pending() == [1, 2]
    assert run_shards(sampler, again) == (2, 4)
    assert {i: shards.path(i).stat().st_mtime_ns for i in (0, 3)} == before
    assert torch.equal(torch.from_numpy(np.concatenate([x for _, x in read_shards(tmp_path / "out")])), whole)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json", "shard_00000.npz", "shard_00001.npz", "shard_00002.npz", "shard_00003.npz"]


def test_ranks_split_the_shards(tmp_path, sampler):
    shards = ShardFolder(tmp_path / "out", list(range(7)), 2, {"plan": sampler.plan.to_dict()})
    shards.prepare()
    assert shards.pending(0, 2) == [0, 2] and shards.pending(1, 2) == [1, 3]
    assert shards.pending(2, 3) == [2]


def test_another_runs_folder_is_refused(tmp_path, sampler):
    ShardFolder(tmp_path / "out", list(range(4)), 2, {"plan": "a"}).prepare()
    for other in (ShardFolder(tmp_path / "out", list(range(4)), 2, {"plan": "b"}),
                  ShardFolder(tmp_path / "out", list(range(5)), 2, {"plan": "a"}),
                  ShardFolder(tmp_path / "out", list(range(4)), 4, {"plan": "a"})):
        with pytest.raises(ValueError, match="holds the shards of another run"):
            other.prepare()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and has no manifest.json"):
        ShardFolder(tmp_path / "busy", [0], 1, {}).prepare()
    (tmp_path / "out" / "manifest.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable shard manifest"):
        ShardFolder(tmp_path / "out", list(range(4)), 2, {"plan": "a"}).prepare()


def test_incomplete_folders_are_not_read(tmp_path, sampler):
    shards = ShardFolder(tmp_path / "out", list(range(4)), 2, {})
    shards.prepare()
    with pytest.raises(ValueError, match="incomplete: 2 of 2 shards missing"):
        list(read_shards(tmp_path / "out"))
    with pytest.raises(ValueError, match="not a shard folder"):
        list(read_shards(tmp_path / "nothing"))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["format"] == "fewstep.shards/1"


def test_the_fd_of_a_folder_is_the_fd_of_its_samples(tmp_path, sampler):
    from fewstep.metrics import DigitsFD, frechet_distance

    seeds = list(range(70))
    shards = ShardFolder(tmp_path / "out", seeds, 16, {})
    shards.prepare()
    run_shards(sampler, shards)
    fd = DigitsFD()
    streamed, n = fd.of_shards(tmp_path / "out")
    # the features of each shard as the stream computes them: the classifier's float32 features of one sample can
    # differ in the last bits with the batch it is in (threaded kernels), which is not what the stream is tested for
    feats = np.concatenate([fd.features(torch.from_numpy(x)) for _, x in read_shards(tmp_path / "out")])
    at_once = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), fd.mu_b, fd.cov_b)
    assert n == 70 and streamed == pytest.approx(at_once, rel=1e-9)


def test_a_manifest_being_written_by_another_rank_is_awaited_not_refused(tmp_path):
    """Under torchrun one rank may see the folder while another is writing the manifest: the folder then holds
    only the manifest's temporary file, which is no foreign content (this refused the run, "not a shard folder")."""
    import threading
    import time

    from fewstep.shards import MANIFEST

    folder = ShardFolder(tmp_path / "out", list(range(4)), 2, {"plan": "a"})
    (tmp_path / "out").mkdir()
    temp = tmp_path / "out" / f".{MANIFEST}.x1y2.tmp"
    temp.write_text("")

    def other_rank():
        time.sleep(0.3)
        (tmp_path / "out" / MANIFEST).write_text(json.dumps(folder.manifest()) + "\n")
        temp.unlink()

    writer = threading.Thread(target=other_rank)
    writer.start()
    try:
        assert folder.prepare() == 0
    finally:
        writer.join()
    with pytest.raises(ValueError, match="holds the shards of another run"):
        ShardFolder(tmp_path / "out", list(range(4)), 2, {"plan": "b"}).prepare()
