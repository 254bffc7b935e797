"""The synthetic archive generator, and sharding an archive in parts that merge into one shard set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from colearn_dist.archive import open_archive
from colearn_dist.manifest import ShardError, load_manifest
from colearn_dist.shards import merge_shards, verify_shards, write_shards
from colearn_dist.synthetic import SENSORS, write_synthetic_archive

QUIET = {"workers": 1, "progress": False}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synthetic_archive(tmp_path_factory.mktemp("synth") / "s.zarr", 3000, chunk_size=256, block=1024, seed=3)


def _features(archive, rows, names):
    parts = []
    for m in names:
        x = np.asarray(archive.array(m)[:])[rows]
        parts.append(np.nan_to_num(x.reshape(len(rows), -1), nan=float(np.nanmean(x))))
    x = np.concatenate(parts, axis=1)
    return np.concatenate([(x - x.mean(0)) / (x.std(0) + 1e-9), np.ones((len(rows), 1))], axis=1)


def _r2(archive, names):
    """Held-out R² of a linear fit of the target on `names` (first 2000 rows fit, the rest scored)."""
    y = np.asarray(archive.target[:])
    fit, held = np.arange(2000), np.arange(2000, len(y))
    coef, *_ = np.linalg.lstsq(_features(archive, fit, names), y[fit], rcond=None)
    pred = _features(archive, held, names) @ coef
    return 1 - np.mean((pred - y[held]) ** 2) / np.var(y[held])


def test_archive_is_valid_and_needs_every_sensor(synth):
    archive = open_archive(synth)  # full validation, values included
    assert list(archive.modalities) == list(SENSORS)
    assert archive.array("s2").shape == (3000, 12, 12) and archive.array("srtm").shape == (3000, 2)
    assert archive.array("s1").chunks[0] == 256
    counts = archive.split_counts()
    assert counts["train"] > 2000 and counts["test"] > 400
    # The target depends on the shared factor and on every sensor's own factor: all sensors together
    # explain it better than any one, and each one explains part of it (the shared factor).
    each = {m: _r2(archive, [m]) for m in SENSORS}
    together = _r2(archive, list(SENSORS))
    assert all(0.05 < r2 < together - 0.05 for r2 in each.values()), (each, together)


def test_blocks_do_not_depend_on_the_archive_size(synth, tmp_path):
    small = open_archive(write_synthetic_archive(tmp_path / "small.zarr", 1500, chunk_size=256, block=1024, seed=3))
    big = open_archive(synth)
    for m in SENSORS:
        np.testing.assert_array_equal(np.asarray(small.array(m)[:1024]), np.asarray(big.array(m)[:1024]))
    np.testing.assert_array_equal(np.asarray(small.target[:1024]), np.asarray(big.target[:1024]))
    with pytest.raises(FileExistsError, match="exists"):
        write_synthetic_archive(tmp_path / "small.zarr", 10)


def test_unlabeled_archive_shards_and_cli(tmp_path):
    from colearn_dist.cli import main

    assert main(["synth", str(tmp_path / "u.zarr"), "--samples", "300", "--chunk-size", "64", "--unlabeled"]) == 0
    archive = open_archive(tmp_path / "u.zarr")
    assert np.isnan(np.asarray(archive.target[:])).all()
    m = write_shards(tmp_path / "u.zarr", tmp_path / "shards", samples_per_shard=50, val_fraction=0.0, **QUIET)
    assert m.target_stats == {"mean": 0.0, "std": 1.0}  # no target value: centred, unscaled


def test_parts_sharded_by_row_range_merge_into_the_whole(synth, tmp_path):
    whole = write_shards(synth, tmp_path / "whole", samples_per_shard=200, val_fraction=0.2, **QUIET)
    bounds = [0, 700, 1900, 3000]
    parts = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        # each part carves validation from the whole archive: together they carve what the whole run does
        part = write_shards(synth, tmp_path / f"part{i}", samples_per_shard=200, val_fraction=0.2, row_range=(a, b), **QUIET)
        assert part.rows == [a, b]
        parts.append(part.path)
    merged = merge_shards(tmp_path / "merged", parts)
    assert verify_shards(merged.path) == []
    assert load_manifest(merged.path).to_json() == merged.to_json()
    names = [s["name"] for split in merged.splits.values() for s in split["shards"]]
    assert len(names) == len(set(names)) and "train-p001-000000.tar" in names
    for split in ("train", "val", "test"):
        assert merged.split_size(split) == whole.split_size(split) > 0
    # Statistics from the parts' float64 sums: the whole archive's, to rounding of the summation order.
    for m, st in whole.stats.items():
        np.testing.assert_allclose(merged.stats[m]["mean"], st["mean"], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(merged.stats[m]["std"], st["std"], rtol=1e-10)
        np.testing.assert_array_equal(merged.train_sums["modalities"][m]["count"], whole.train_sums["modalities"][m]["count"])
    assert merged.target_stats["mean"] == pytest.approx(whole.target_stats["mean"], rel=1e-12)
    assert merged.target_stats["std"] == pytest.approx(whole.target_stats["std"], rel=1e-12)

    from colearn_dist.loader import ShardLoader

    for split in ("train", "val"):
        rows = sorted(int(i) for b in ShardLoader(merged.path, split, batch_size=500, shuffle=False) for i in b["index"])
        assert rows == sorted(int(i) for b in ShardLoader(whole.path, split, batch_size=500, shuffle=False) for i in b["index"])

    with pytest.raises(ShardError, match="overlap"):
        bad = write_shards(synth, tmp_path / "bad", samples_per_shard=200, val_fraction=0.0, row_range=(600, 800), **QUIET)
        merge_shards(tmp_path / "m2", [parts[0], bad.path])
    with pytest.raises(ShardError, match="not inside"):
        write_shards(synth, tmp_path / "x", row_range=(10, 4000), **QUIET)
    data = json.loads((parts[0] / "manifest.json").read_text())
    data.pop("train_sums")
    (parts[0] / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ShardError, match="train_sums"):
        merge_shards(tmp_path / "m3", parts)
