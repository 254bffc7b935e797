"""ShardLoader: exact once-per-epoch coverage over ranks and workers, values, batch plans, resume
(same and different world size), corrupt shards, determinism."""

from __future__ import annotations

import io
import itertools
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from colearn_dist.archive import open_archive
from colearn_dist.loader import (
    CorruptShardError,
    ShardLoader,
    batches_yielded_per_reader,
    buffer_order,
    plan_epoch,
    shard_order,
    split_evenly,
)
from colearn_dist.manifest import load_manifest
from colearn_dist.shards import write_shards

from helpers import make_synthetic_archive

SPLITS = ("train", "val", "test")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Regression archive with NaNs in every float modality and a categorical one with missing codes;
    uneven shards (16 per shard: train 140 → 9 shards, the last one short)."""
    root = tmp_path_factory.mktemp("loader")
    archive = make_synthetic_archive(root / "a.zarr", n=200, with_val=True, nan_fraction=0.1, seed=3)
    write_shards(archive, root / "shards", samples_per_shard=16, workers=1, progress=False)
    arc = open_archive(archive)
    raw = {name: np.asarray(arc.array(name)[:]) for name in arc.modalities}
    return {
        "shards": root / "shards",
        "root": root,
        "archive": arc,
        "raw": raw,
        "target": np.asarray(arc.target[:]),
        "month": np.asarray(arc.month[:]),
        "ids": arc.ids,
    }


def _copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _ids(batches: list[dict[str, Any]]) -> list[int]:
    return [int(i) for b in batches for i in b["index"]]


def _same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["id"] == y["id"]
        assert torch.equal(x["target"], y["target"])
        for m in x["inputs"]:
            assert torch.equal(x["inputs"][m], y["inputs"][m])
            assert torch.equal(x["valid"][m], y["valid"][m])


# ------------------------------------------------------------------------------------ plan (pure)
@pytest.mark.parametrize("n", [1, 7, 15, 16, 17, 63, 64, 65, 100, 140, 1001])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_train_plan_equal_steps_no_small_batch(n: int, world: int, workers: int) -> None:
    b = 8
    if n < world:
        with pytest.raises(ValueError, match="at least one sample per rank"):
            plan_epoch(n, batch_size=b, world_size=world, workers=workers, plan="train")
        return
    ranks = plan_epoch(n, batch_size=b, world_size=world, workers=workers, plan="train")
    steps = {r.num_batches for r in ranks}
    assert steps == {max(1, n // (world * b))}, "every rank must take the same number of steps"
    # contiguous cover of the stream, rank sizes within 1
    assert ranks[0].start == 0 and ranks[-1].stop == n
    assert all(r1.stop == r2.start for r1, r2 in zip(ranks, ranks[1:]))
    assert max(r.stop - r.start for r in ranks) - min(r.stop - r.start for r in ranks) <= 1
    for r in ranks:
        sizes = r.batch_sizes
        assert sum(sizes) == r.stop - r.start
        assert max(sizes) - min(sizes) <= 1
        assert max(sizes) <= 2 * b
        if n >= world * b:
            assert min(sizes) >= b, "no batch smaller than batch_size when the split allows it"
        # workers: contiguous runs of whole batches, longer runs first, within 1
        readers = r.readers
        assert len(readers) == max(workers, 1)
        assert readers[0].start == r.start and readers[-1].stop == r.stop
        assert all(a.stop == c.start for a, c in zip(readers, readers[1:]))
        assert list(itertools.chain.from_iterable(x.batch_sizes for x in readers)) == list(sizes)
        runs = [len(x.batch_sizes) for x in readers]
        assert runs == sorted(runs, reverse=True) and max(runs) - min(runs) <= 1
        for x in readers:
            assert sum(x.batch_sizes) == x.stop - x.start


@pytest.mark.parametrize("n,world", [(0, 1), (5, 2), (16, 1), (17, 2), (100, 3)])
def test_eval_plan_full_batches_but_last(n: int, world: int) -> None:
    ranks = plan_epoch(n, batch_size=8, world_size=world, workers=2, plan="eval")
    assert sum(r.stop - r.start for r in ranks) == n
    for r in ranks:
        assert all(s == 8 for s in r.batch_sizes[:-1])
        if r.batch_sizes:
            assert 1 <= r.batch_sizes[-1] <= 8
        assert sum(r.batch_sizes) == r.stop - r.start


def test_plan_helpers() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(2, 4) == [1, 1, 0, 0]
    # consumer took 5 batches from 2 workers: worker 0 gave 0, 2, 4; worker 1 gave 1, 3
    assert batches_yielded_per_reader(5, 2) == [3, 2]
    assert batches_yielded_per_reader(0, 3) == [0, 0, 0]
    assert batches_yielded_per_reader(4, 1) == [4]
    assert shard_order(5, shuffle=False, seed=1, epoch=3) == [0, 1, 2, 3, 4]
    assert sorted(shard_order(9, shuffle=True, seed=1, epoch=3)) == list(range(9))
    assert shard_order(9, shuffle=True, seed=1, epoch=3) != shard_order(9, shuffle=True, seed=1, epoch=4)
    order = buffer_order(50, 10, seed=7)
    assert sorted(order.tolist()) == list(range(50)) and order.tolist() != list(range(50))
    assert buffer_order(50, 10, seed=7, limit=12).tolist() == order[:12].tolist()


# ------------------------------------------------------------------------------------ round trip
def _check_values(loader: ShardLoader, batches: list[dict[str, Any]], data: dict[str, Any]) -> None:
    """Every value equals the archive after de-normalisation; NaN (invalid) exactly where NaN."""
    index = np.concatenate([b["index"].numpy() for b in batches])
    ids = [i for b in batches for i in b["id"]]
    assert ids == [str(data["ids"][i]) for i in index]
    for name, raw in data["raw"].items():
        kind = loader.manifest.modalities[name]["kind"]
        got = np.concatenate([loader.denormalise(name, b["inputs"][name], b["valid"][name]) for b in batches])
        valid = np.concatenate([b["valid"][name].numpy() for b in batches])
        present = np.concatenate([b["present"][name].numpy() for b in batches])
        want = raw[index]
        if kind == "categorical":
            assert got.dtype == np.int64
            np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(valid, want != loader.manifest.modalities[name]["missing_value"])
        else:
            np.testing.assert_array_equal(valid, ~np.isnan(want))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # NaN compare equal to NaN
            inputs = np.concatenate([b["inputs"][name].numpy() for b in batches])
            assert np.all(inputs[~valid] == 0) and np.isfinite(inputs).all()
        np.testing.assert_array_equal(present, valid.reshape(len(index), -1).any(axis=1))
    target = np.concatenate([b["target"].numpy() for b in batches])
    assert target.dtype == np.float32
    np.testing.assert_array_equal(target, data["target"][index])
    month = np.concatenate([b["month"].numpy() for b in batches])
    assert month.dtype == np.int64
    np.testing.assert_array_equal(month, data["month"][index])


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (1, 2), (2, 2)])
def test_round_trip_every_sample_once(data: dict[str, Any], world: int, workers: int) -> None:
    split_codes = data["archive"].split
    manifest = load_manifest(data["shards"])
    for split in SPLITS:
        loaders = [
            ShardLoader(data["shards"], split, batch_size=8, rank=r, world_size=world, workers=workers, shuffle_buffer=24)
            for r in range(world)
        ]
        per_rank = [list(l) for l in loaders]
        for l, batches in zip(loaders, per_rank):
            assert len(batches) == len(l)
            _check_values(l, batches, data)
            assert l.position()["epoch"] == 1 and l.position()["batch"] == 0
        seen = Counter(i for batches in per_rank for i in _ids(batches))
        expected = set(np.flatnonzero(split_codes == SPLITS.index(split)).tolist()) if split != "val" else None
        assert all(c == 1 for c in seen.values()), "a sample was read twice"
        assert len(seen) == manifest.splits[split]["num_samples"] == loaders[0].num_samples
        if expected is not None:
            assert set(seen) == expected
        if split == "train":
            assert len({len(b) for b in per_rank}) == 1, "ranks must take the same number of steps"
            assert min(len(x["id"]) for b in per_rank for x in b) >= 8


def test_uneven_shards_fewer_than_readers(tmp_path: Path, data: dict[str, Any]) -> None:
    """3 train shards, 2 ranks × 2 workers = 4 readers: still every sample once, equal steps."""
    archive = make_synthetic_archive(tmp_path / "a.zarr", n=60, test_fraction=0.1, seed=5)
    write_shards(archive, tmp_path / "s", samples_per_shard=20, workers=1, val_fraction=0.1, progress=False)
    m = load_manifest(tmp_path / "s")
    assert len(m.splits["train"]["shards"]) == 3
    n = m.splits["train"]["num_samples"]
    loaders = [ShardLoader(tmp_path / "s", "train", batch_size=4, rank=r, world_size=2, workers=2) for r in range(2)]
    per_rank = [list(l) for l in loaders]
    assert [len(b) for b in per_rank] == [n // 8] * 2
    assert min(len(x["id"]) for b in per_rank for x in b) >= 4
    seen = Counter(i for b in per_rank for i in _ids(b))
    assert len(seen) == n and set(seen.values()) == {1}


@pytest.mark.parametrize("task", ["multiclass", "multilabel"])
def test_target_types(tmp_path: Path, task: str) -> None:
    archive = make_synthetic_archive(tmp_path / "a.zarr", n=60, task=task, seed=1)
    write_shards(archive, tmp_path / "s", samples_per_shard=20, workers=1, progress=False)
    loader = ShardLoader(tmp_path / "s", "test", batch_size=5, modalities=["dw", "s1"])
    batches = list(loader)
    assert list(batches[0]["inputs"]) == ["dw", "s1"]
    target = torch.cat([b["target"] for b in batches])
    want = np.asarray(open_archive(archive).target[:])[torch.cat([b["index"] for b in batches]).numpy()]
    if task == "multiclass":
        assert target.dtype == torch.int64 and target.ndim == 1
    else:
        assert target.dtype == torch.float32 and target.shape[1] == 3
    np.testing.assert_array_equal(target.numpy(), want)
    with pytest.raises(ValueError, match="unknown modalit"):
        ShardLoader(tmp_path / "s", "test", batch_size=5, modalities=["nope"])


# ------------------------------------------------------------------------------------ determinism
def test_deterministic_and_epochs_differ(data: dict[str, Any]) -> None:
    def run(seed: int, epochs: int = 2) -> list[list[dict[str, Any]]]:
        loader = ShardLoader(data["shards"], "train", batch_size=8, seed=seed, shuffle_buffer=32)
        return [list(loader) for _ in range(epochs)]

    a, b, c = run(0), run(0), run(1, epochs=1)
    _same_batches(a[0], b[0])
    _same_batches(a[1], b[1])
    assert _ids(a[0]) != _ids(a[1]) and sorted(_ids(a[0])) == sorted(_ids(a[1]))
    assert _ids(a[0]) != _ids(c[0])
    # no shuffling: manifest shard order, tar order, same every epoch
    plain = ShardLoader(data["shards"], "train", batch_size=8, shuffle=False)
    assert _ids(list(plain)) == _ids(list(plain))


def test_endless_runs_epochs_back_to_back(data: dict[str, Any]) -> None:
    loader = ShardLoader(data["shards"], "val", batch_size=8, endless=True, shuffle=True, shuffle_buffer=8)
    per_epoch = len(loader)
    got = list(itertools.islice(iter(loader), 2 * per_epoch + 1))
    assert loader.position()["epoch"] == 2 and loader.position()["batch"] == 1
    for e in range(2):
        epoch = _ids(got[e * per_epoch : (e + 1) * per_epoch])
        assert len(epoch) == len(set(epoch)) == loader.num_samples
    assert _ids(got[:per_epoch]) != _ids(got[per_epoch : 2 * per_epoch])


# ------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_same_config_yields_the_rest(data: dict[str, Any], workers: int) -> None:
    kw = dict(batch_size=8, workers=workers, shuffle_buffer=40, seed=2)
    full = ShardLoader(data["shards"], "train", **kw)
    full.set_position({"epoch": 1, "batch": 0})  # a shuffled epoch other than 0
    reference = list(full)
    assert full.position()["epoch"] == 2

    part = ShardLoader(data["shards"], "train", **kw)
    part.set_position({"epoch": 1, "batch": 0})
    it = iter(part)
    head = [next(it) for _ in range(5)]
    pos = part.position()
    assert pos["epoch"] == 1 and pos["batch"] == 5 and pos["samples"] == sum(len(b["id"]) for b in head)
    del it

    resumed = ShardLoader(data["shards"], "train", **kw)
    resumed.set_position(pos)
    rest = list(resumed)
    _same_batches(head + rest, reference)
    assert resumed.position() == {**full.position()}
    # the minimal form {"epoch", "batch"} means "k steps with this configuration"
    minimal = ShardLoader(data["shards"], "train", **kw)
    minimal.set_position({"epoch": 1, "batch": 5})
    _same_batches(list(minimal), rest)


def test_resume_with_other_workers_count(data: dict[str, Any]) -> None:
    a = ShardLoader(data["shards"], "train", batch_size=8, workers=2, shuffle_buffer=40)
    it = iter(a)
    head = [next(it) for _ in range(3)]
    del it
    b = ShardLoader(data["shards"], "train", batch_size=8, workers=0, shuffle_buffer=40)
    b.set_position(a.position())
    rest = list(b)
    seen = Counter(_ids(head) + _ids(rest))
    assert len(seen) == a.num_samples and set(seen.values()) == {1}
    assert b.position()["epoch"] == 1


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_with_other_world_size(data: dict[str, Any], before: int, after: int) -> None:
    """Stop mid-epoch with `before` ranks, resume with `after`: every sample exactly once."""
    kw = dict(batch_size=6, shuffle_buffer=30, seed=4)
    old = [ShardLoader(data["shards"], "train", rank=r, world_size=before, **kw) for r in range(before)]
    iters = [iter(l) for l in old]
    steps = 4
    head = [next(it) for _ in range(steps) for it in iters]
    positions = [l.position() for l in old]
    assert all(p == positions[0] for p in positions), "ranks in lockstep share one position"
    assert positions[0]["samples"] == sum(len(b["id"]) for b in head)
    del iters

    new = [ShardLoader(data["shards"], "train", rank=r, world_size=after, **kw) for r in range(after)]
    for l in new:
        l.set_position(positions[0])
    tails = [list(l) for l in new]
    assert len({len(t) for t in tails}) == 1, "equal steps after the resume too"
    assert min(len(b["id"]) for t in tails for b in t) >= 6
    seen = Counter(_ids(head) + [i for t in tails for i in _ids(t)])
    assert len(seen) == new[0].num_samples and set(seen.values()) == {1}
    for l in new:
        pos = l.position()
        assert pos["epoch"] == 1 and pos["batch"] == 0 and pos["legs"] == []

    # a second interruption in the resumed leg, then back to the original world size
    again = [ShardLoader(data["shards"], "train", rank=r, world_size=after, **kw) for r in range(after)]
    for l in again:
        l.set_position(positions[0])
    its = [iter(l) for l in again]
    mid = [next(it) for _ in range(2) for it in its]
    pos2 = again[0].position()
    assert len(pos2["legs"]) == 2 and pos2["batch"] == steps + 2
    del its
    last = [ShardLoader(data["shards"], "train", rank=r, world_size=before, **kw) for r in range(before)]
    for l in last:
        l.set_position(pos2)
    end = [b for l in last for b in l]
    seen = Counter(_ids(head) + _ids(mid) + _ids(end))
    assert len(seen) == last[0].num_samples and set(seen.values()) == {1}


def test_position_refuses_other_stream(data: dict[str, Any]) -> None:
    a = ShardLoader(data["shards"], "train", batch_size=8, seed=0)
    next(iter(a))
    b = ShardLoader(data["shards"], "train", batch_size=8, seed=1)
    with pytest.raises(ValueError, match="seed"):
        b.set_position(a.position())
    with pytest.raises(ValueError, match="steps"):
        a.set_position({"epoch": 0, "batch": 10_000})


# ------------------------------------------------------------------------------------ corruption
def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _break_member(path: Path) -> str:
    """Rewrite one sample's s1 member as garbage (a valid tar): only decoding can notice."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".s1.npy"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for m, payload in members:
            if m.name == victim:
                payload = b"not an npy file"
                m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    path.write_bytes(buf.getvalue())
    return victim.split(".")[0]


@pytest.mark.parametrize("verify", [True, False])
def test_corrupt_shard_error_names_it(tmp_path: Path, data: dict[str, Any], verify: bool) -> None:
    shards = _copy_shards(data["shards"], tmp_path / "s")
    bad = shards / load_manifest(shards).splits["train"]["shards"][2]["name"]
    _truncate(bad)
    loader = ShardLoader(shards, "train", batch_size=8, shuffle=False, verify=verify)
    with pytest.raises(CorruptShardError, match=bad.name):
        list(loader)
    # in a DataLoader worker the error still reaches the consumer, naming the shard
    loader = ShardLoader(shards, "train", batch_size=8, shuffle=False, verify=verify, workers=2)
    with pytest.raises(Exception, match=bad.name):
        list(loader)


def test_corrupt_member_error_names_shard_and_sample(tmp_path: Path, data: dict[str, Any]) -> None:
    shards = _copy_shards(data["shards"], tmp_path / "s")
    bad = shards / load_manifest(shards).splits["test"]["shards"][0]["name"]
    key = _break_member(bad)
    with pytest.raises(CorruptShardError, match=f"{bad.name}.*{key}"):
        list(ShardLoader(shards, "test", batch_size=8, verify=False))
    # with verification on, the checksum already gives it away
    with pytest.raises(CorruptShardError, match=f"{bad.name}.*sha256"):
        list(ShardLoader(shards, "test", batch_size=8))


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_shard_skip_warns_and_counts(tmp_path: Path, data: dict[str, Any], workers: int) -> None:
    shards = _copy_shards(data["shards"], tmp_path / "s")
    entries = load_manifest(shards).splits["train"]["shards"]
    truncated = shards / entries[1]["name"]
    _truncate(truncated)
    broken = shards / entries[4]["name"]
    _break_member(broken)
    loader = ShardLoader(shards, "train", batch_size=8, workers=workers, on_corrupt="skip", verify=False, shuffle_buffer=16)
    with pytest.warns(RuntimeWarning) as record:
        batches = list(loader)
    messages = [str(w.message) for w in record if "corrupt shard" in str(w.message)]
    assert sorted(m.split(":")[0] for m in messages) == sorted([str(truncated), str(broken)]), "once per shard"
    delivered = _ids(batches)
    assert len(delivered) == len(set(delivered))
    assert loader.skipped == sum(b["skipped"] for b in batches) > 1
    assert len(delivered) + loader.skipped == loader.num_samples
    assert set(loader.corrupt_shards) == {str(truncated), str(broken)}
    assert len(batches) == len(loader), "the plan (and equal step counts) survive skipped samples"


def test_skip_keeps_lockstep_with_an_emptied_batch(tmp_path: Path, data: dict[str, Any]) -> None:
    """A batch whose samples all sat in a corrupt shard is still yielded (empty), so ranks stay in step."""
    shards = _copy_shards(data["shards"], tmp_path / "s")
    bad = shards / load_manifest(shards).splits["train"]["shards"][1]["name"]
    _truncate(bad)
    loader = ShardLoader(shards, "train", batch_size=4, shuffle=False, on_corrupt="skip")  # verify: whole shard out
    with pytest.warns(RuntimeWarning, match="sha256"):
        batches = list(loader)
    assert len(batches) == len(loader)
    empty = [b for b in batches if not b["id"]]
    assert len(empty) == 4 and loader.skipped == 16
    b = empty[0]
    assert b["inputs"]["s2"].shape == (0, 6, 4) and b["present"]["s2"].shape == (0,)
    assert b["month"].shape == (0, 6) and b["target"].shape == (0,) and b["skipped"] == 4


# ------------------------------------------------------------------------------------ cache, read-ahead
def _identical(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    """Every key of every batch equal (values, masks, targets, months, indices, ids)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key, value in x.items():
            if isinstance(value, dict):
                assert value.keys() == y[key].keys()
                for m, t in value.items():
                    assert t.dtype == y[key][m].dtype and torch.equal(t, y[key][m]), (key, m)
            elif isinstance(value, torch.Tensor):
                assert value.dtype == y[key].dtype and torch.equal(value, y[key]), key
            else:
                assert value == y[key], key


@pytest.mark.parametrize("world,workers,shuffle", [(1, 0, True), (1, 2, True), (2, 2, True), (2, 0, False)])
def test_cache_yields_the_streaming_batches(data: dict[str, Any], world: int, workers: int, shuffle: bool) -> None:
    kw: dict[str, Any] = dict(batch_size=8, workers=workers, shuffle_buffer=24, shuffle=shuffle, seed=5, world_size=world)
    for r in range(world):
        stream = ShardLoader(data["shards"], "train", rank=r, **kw)
        cached = ShardLoader(data["shards"], "train", rank=r, cache_bytes=1 << 30, **kw)
        for _ in range(2):  # two epochs: another shard order and other buffer seeds
            _identical(list(stream), list(cached))
        assert cached.cached and not stream.cached
        assert cached.position() == stream.position()


@pytest.mark.parametrize("before,after", [(2, 1), (1, 1)])
def test_cache_resumes_like_the_stream(data: dict[str, Any], before: int, after: int) -> None:
    """Interrupted mid-epoch, resumed (other world size, other workers): the cached rest is the streamed rest."""
    kw: dict[str, Any] = dict(batch_size=6, shuffle_buffer=30, seed=4)
    old = [ShardLoader(data["shards"], "train", rank=r, world_size=before, workers=2, cache_bytes=1 << 30, **kw) for r in range(before)]
    iters = [iter(loader) for loader in old]
    for _ in range(3):
        for it in iters:
            next(it)
    position = old[0].position()
    del iters
    for r in range(after):
        stream = ShardLoader(data["shards"], "train", rank=r, world_size=after, **kw)
        cached = ShardLoader(data["shards"], "train", rank=r, world_size=after, cache_bytes=1 << 30, **kw)
        stream.set_position(position)
        cached.set_position(position)
        _identical(list(stream), list(cached))
        assert cached.cached


def test_cache_limit_and_prefetch(data: dict[str, Any]) -> None:
    kw: dict[str, Any] = dict(batch_size=8, shuffle_buffer=24, seed=1)
    reference = list(ShardLoader(data["shards"], "train", **kw))
    small = ShardLoader(data["shards"], "train", cache_bytes=ShardLoader(data["shards"], "train", **kw).cache_size() - 1, **kw)
    _identical(list(small), reference)
    assert not small.cached  # over the limit: streamed
    ahead = ShardLoader(data["shards"], "train", prefetch=3, **kw)
    _identical(list(ahead), reference)
    # stopping mid-epoch stops the reading thread; the next iteration continues exactly
    ahead = ShardLoader(data["shards"], "train", prefetch=3, **kw)
    it = iter(ahead)
    head = [next(it) for _ in range(4)]
    it.close()
    _identical(head + list(ahead), reference)
    with pytest.raises(ValueError, match="cache_bytes and prefetch"):
        ShardLoader(data["shards"], "train", prefetch=-1, **kw)


def test_prefetch_raises_reader_errors(tmp_path: Path, data: dict[str, Any]) -> None:
    shards = _copy_shards(data["shards"], tmp_path / "s")
    victim = shards / load_manifest(shards).splits["train"]["shards"][0]["name"]
    victim.write_bytes(victim.read_bytes()[:700])
    for kw in ({"prefetch": 2}, {"cache_bytes": 1 << 30}):
        with pytest.raises(CorruptShardError, match=victim.name):
            list(ShardLoader(shards, "train", batch_size=8, shuffle=False, **kw))


def test_latlon_reaches_the_batch_and_shards_without_it_still_load(synthetic_shards):
    import json

    manifest = synthetic_shards(n=96)
    latlon = open_archive(manifest.archive).latlon[:]
    batch = next(iter(ShardLoader(manifest.path, "train", batch_size=8, shuffle=False)))
    assert batch["latlon"].dtype == torch.float32 and batch["latlon"].shape == (8, 2)
    np.testing.assert_allclose(batch["latlon"].numpy(), latlon[batch["index"].numpy()].astype(np.float32))
    # an archive without latlon: no member, no key
    plain = synthetic_shards(n=96, latlon=False)
    assert not plain.has_latlon and "latlon" not in next(iter(ShardLoader(plain.path, "train", batch_size=8)))
    # a manifest of before latlon was carried (no "has_latlon" key) reads as shards without latlon
    file = plain.path / "manifest.json"
    data = json.loads(file.read_text())
    del data["has_latlon"]
    file.write_text(json.dumps(data))
    assert not load_manifest(plain.path).has_latlon
    assert "latlon" not in next(iter(ShardLoader(plain.path, "train", batch_size=8)))
