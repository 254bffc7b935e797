"""The sharder: format, determinism, splits, statistics, verification, and readability by WebDataset / tar."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from colearn_dist.archive import SPLIT_CODES, open_archive
from colearn_dist.manifest import FORMAT, MANIFEST_NAME, Manifest, ShardError, load_manifest
from colearn_dist.shards import (
    sample_key,
    verify_shards,
    write_shards,
)

from helpers import shard_paths

QUIET = {"progress": False}


def _read_samples(out: Path) -> dict[str, dict[str, dict[str, bytes]]]:
    """split -> key -> member extension -> raw bytes, read with tarfile (no WebDataset)."""
    m = load_manifest(out)
    result: dict[str, dict[str, dict[str, bytes]]] = {}
    for split in ("train", "val", "test"):
        samples: dict[str, dict[str, bytes]] = {}
        for path in shard_paths(m, split):
            with tarfile.open(path) as tar:
                for info in tar:
                    key, _, ext = info.name.partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(info).read()
        result[split] = samples
    return result


def _npy(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.fixture
def archive(synthetic_archive):
    # 300 samples, zarr chunks of 64 rows, 12 groups, no val split (the sharder carves one)
    return synthetic_archive(n=300, groups=12, seed=1)


def test_same_seed_byte_identical_and_worker_count_irrelevant(archive, tmp_path):
    opts = dict(samples_per_shard=16, shuffle_window=48, **QUIET)
    a = write_shards(archive, tmp_path / "a", seed=3, workers=1, **opts)
    write_shards(archive, tmp_path / "b", seed=3, workers=2, **opts)
    write_shards(archive, tmp_path / "c", seed=4, workers=1, **opts)
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert len(shard_paths(a, "train")) > 3  # several windows, so the parallel path really splits work
    assert files_a == files_b
    assert files_a[MANIFEST_NAME] != files_c[MANIFEST_NAME]
    common = set(files_a) & set(files_c) - {MANIFEST_NAME}
    assert any(files_a[n] != files_c[n] for n in common)


def test_every_row_once_and_members_match_archive(archive, tmp_path):
    m = write_shards(archive, tmp_path / "s", samples_per_shard=16, shuffle_window=40, seed=0, **QUIET)
    a = open_archive(archive)
    samples = _read_samples(tmp_path / "s")
    keys = [k for split in samples.values() for k in split]
    assert sorted(keys) == [sample_key(i) for i in range(a.num_samples)]  # each row exactly once
    assert {s: len(v) for s, v in samples.items()} == {s: m.split_size(s) for s in samples}
    s2, dw, month, target, latlon = a.array("s2")[:], a.array("dw")[:], a.month[:], a.target[:], a.latlon[:]
    assert m.has_latlon
    for split, by_key in samples.items():
        for key, members in by_key.items():
            row = int(key)
            expected = {"s1.npy", "s2.npy", "srtm.npy", "dw.npy", "target.npy", "month.npy", "latlon.npy", "meta.json"}
            assert set(members) == expected
            np.testing.assert_array_equal(_npy(members["latlon.npy"]), latlon[row])
            meta = json.loads(members["meta.json"])
            assert meta == {"id": a.ids[row], "index": row, "group": a.group[row], "split": split}
            np.testing.assert_array_equal(_npy(members["s2.npy"]), s2[row])  # NaNs in the same places
            x = _npy(members["dw.npy"])
            assert x.dtype == np.uint8 and x.shape == (6,)
            np.testing.assert_array_equal(x, dw[row])
            t = _npy(members["target.npy"])
            assert t.shape == () and t.dtype == np.float32 and t == target[row]
            np.testing.assert_array_equal(_npy(members["month.npy"]), month[row])
            # the member is exactly what np.save writes for that array
            buf = io.BytesIO()
            np.save(buf, s2[row])
            assert members["s2.npy"] == buf.getvalue()
    # the archive's test split is kept as is
    assert sorted(int(k) for k in samples["test"]) == a.split_indices("test").tolist()


def test_shuffled_across_shards_and_window_layout(archive, tmp_path):
    m = write_shards(archive, tmp_path / "s", samples_per_shard=16, shuffle_window=50, **QUIET)
    n_train = m.split_size("train")
    sizes = m.shard_sizes("train")
    assert sum(sizes) == n_train and max(sizes) == 16
    # windows of 50 -> shards of 16, 16, 16, 2 per full window: short shards only at window ends
    assert sizes.count(2) == n_train // 50
    keys = [int(k) for k in _read_samples(tmp_path / "s")["train"]]
    rank = {row: i for i, row in enumerate(sorted(keys))}  # position in the split's sorted rows
    first = keys[:16]
    assert first != sorted(first)
    # a shard draws from its whole window, not from 16 consecutive rows, and windows come in permuted order
    assert max(rank[k] for k in first) - min(rank[k] for k in first) > 16
    starts = np.cumsum([0] + sizes[:-1])
    window_of_shard = [rank[keys[i]] // 50 for i in starts]
    assert window_of_shard != sorted(window_of_shard)


def test_val_carved_by_group(archive, tmp_path):
    m = write_shards(archive, tmp_path / "s", val_fraction=0.2, seed=5, **QUIET)
    a = open_archive(archive)
    samples = _read_samples(tmp_path / "s")
    groups = {s: {json.loads(v["meta.json"])["group"] for v in samples[s].values()} for s in samples}
    assert groups["val"] and not groups["train"] & groups["val"]
    n_train_archive = int((a.split == SPLIT_CODES["train"]).sum())
    assert m.split_size("train") + m.split_size("val") == n_train_archive
    assert abs(m.split_size("val") - 0.2 * n_train_archive) < 0.1 * n_train_archive
    assert m.val_split == {"source": "carved", "by": "group", "fraction": 0.2, "num_groups": len(groups["val"])}
    assert m.split_size("test") == int((a.split == SPLIT_CODES["test"]).sum())


def test_parent_reads_no_per_sample_strings(archive, tmp_path, monkeypatch):
    """The sharder's parent carves val from group codes and the window tasks read ids / groups
    themselves: a whole-array string read (Archive.ids / .group) would make it grow with the archive."""
    import colearn_dist.archive as archive_module

    expected = write_shards(archive, tmp_path / "ref", samples_per_shard=16, shuffle_window=40, seed=5, **QUIET)

    def refuse(arr):
        raise AssertionError(f"read all of {arr.name}")

    monkeypatch.setattr(archive_module, "_read_strings", refuse)
    m = write_shards(archive, tmp_path / "s", samples_per_shard=16, shuffle_window=40, seed=5, **QUIET)
    assert m.val_split["by"] == "group" and m.val_split["source"] == "carved"
    assert _files(tmp_path / "s") == _files(tmp_path / "ref") and expected.splits == m.splits
    monkeypatch.undo()
    a = open_archive(archive)
    for by_key in _read_samples(tmp_path / "s").values():
        for key, members in by_key.items():
            meta = json.loads(members["meta.json"])
            assert meta["id"] == a.ids[int(key)] and meta["group"] == a.group[int(key)]


def test_val_carved_randomly_without_groups(synthetic_archive, tmp_path):
    archive = synthetic_archive(n=200, groups=0)
    m = write_shards(archive, tmp_path / "s", val_fraction=0.15, **QUIET)
    n_train_archive = int((open_archive(archive).split == 0).sum())
    assert m.split_size("val") == round(0.15 * n_train_archive)
    assert m.val_split["by"] == "random"


def test_existing_val_kept_and_zero_fraction(synthetic_archive, tmp_path):
    archive = synthetic_archive(n=200, with_val=True)
    a = open_archive(archive)
    m = write_shards(archive, tmp_path / "s", **QUIET)
    assert m.val_split["source"] == "archive"
    assert m.split_size("val") == a.split_counts()["val"]
    m0 = write_shards(synthetic_archive(n=100), tmp_path / "z", val_fraction=0.0, **QUIET)
    assert m0.split_size("val") == 0 and m0.splits["val"]["shards"] == [] and shard_paths(m0, "val") == []


def test_stats_equal_numpy_on_train_rows(archive, tmp_path):
    m = write_shards(archive, tmp_path / "s", samples_per_shard=16, shuffle_window=40, workers=2, **QUIET)
    a = open_archive(archive)
    train_rows = sorted(int(k) for k in _read_samples(tmp_path / "s")["train"])
    assert set(m.stats) == {"s1", "s2", "srtm"}  # no stats for categorical dw
    for name in m.stats:
        x = a.array(name)[:][train_rows].astype(np.float64)
        x = x.reshape(-1, x.shape[-1])
        assert np.isnan(x).any() or name == "srtm"
        np.testing.assert_allclose(m.stats[name]["mean"], np.nanmean(x, axis=0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(m.stats[name]["std"], np.nanstd(x, axis=0), rtol=1e-7)
    t = a.target[:][train_rows].astype(np.float64)
    assert m.target_stats["mean"] == pytest.approx(t.mean(), rel=1e-9)
    assert m.target_stats["std"] == pytest.approx(t.std(), rel=1e-7)


@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_target_stats_classification(synthetic_archive, tmp_path, task):
    archive = synthetic_archive(n=150, task=task, num_classes=4, groups=0)
    m = write_shards(archive, tmp_path / "s", samples_per_shard=32, **QUIET)
    a = open_archive(archive)
    train_rows = sorted(int(k) for k in _read_samples(tmp_path / "s")["train"])
    y = a.target[:][train_rows]
    if task == "multilabel":
        assert m.target_shape == [4]
        assert m.target_stats == {"positive_counts": y.sum(axis=0).tolist(), "num_samples": len(train_rows)}
        member = _read_samples(tmp_path / "s")["train"][sample_key(train_rows[0])]["target.npy"]
        assert _npy(member).dtype == np.uint8 and _npy(member).shape == (4,)
    else:
        k = 2 if task == "binary" else 4
        assert m.target_shape == []
        assert m.target_stats == {"class_counts": np.bincount(y, minlength=k).tolist()}
        assert len(m.class_names) == k


def test_manifest_fields(archive, tmp_path):
    m = write_shards(archive, tmp_path / "s", samples_per_shard=32, seed=7, **QUIET)
    data = json.loads((tmp_path / "s" / MANIFEST_NAME).read_text())
    assert list(data) == [
        "format", "version", "archive", "seed", "samples_per_shard", "shuffle_window", "task", "class_names", "target_name",
        "target_unit", "target_shape", "modalities", "has_month", "has_latlon", "stats", "target_stats", "val_split", "splits", "train_sums", "rows",
    ]  # fmt: skip
    assert data["format"] == FORMAT and data["version"] == 1 and data["seed"] == 7
    assert data["shuffle_window"] == 16 * 32
    assert data["archive"] == str(Path(archive).resolve())
    assert data["task"] == "regression" and data["target_shape"] == [] and data["has_month"] is True and data["has_latlon"] is True
    assert data["target_name"] == "synthetic target" and data["target_unit"] == "u"
    assert data["modalities"]["s2"] == {
        "kind": "series", "shape": [6, 4], "dtype": "float32", "bands": ["B2", "B4", "B8", "NDVI"],
        "units": ["", "", "", ""], "time_step": "month", "num_classes": None, "missing_value": None,
    }  # fmt: skip
    assert data["modalities"]["srtm"]["shape"] == [2] and data["modalities"]["srtm"]["kind"] == "static"
    assert data["modalities"]["dw"] == {
        "kind": "categorical", "shape": [6], "dtype": "uint8", "bands": ["dynamic_world"], "units": [""],
        "time_step": "month", "num_classes": 5, "missing_value": 4,
    }  # fmt: skip
    assert set(data["splits"]) == {"train", "val", "test"}
    for split, info in data["splits"].items():
        assert [s["name"] for s in info["shards"]] == [f"{split}-{k:06d}.tar" for k in range(len(info["shards"]))]
        assert info["num_samples"] == sum(s["num_samples"] for s in info["shards"])
        assert all(len(s["sha256"]) == 64 for s in info["shards"])
    loaded = load_manifest(tmp_path / "s")
    assert isinstance(loaded, Manifest) and loaded.to_json() == m.to_json() == data
    assert loaded.path == tmp_path / "s"
    assert load_manifest(tmp_path / "s" / MANIFEST_NAME).seed == 7
    assert shard_paths(loaded, "train")[0] == tmp_path / "s" / "train-000000.tar"
    with pytest.raises(ShardError, match="no split 'dev'"):
        loaded.split_size("dev")
    assert "train" in loaded.summary()


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ShardError, match=r"manifest.json: no shard manifest"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ShardError, match=r"key 'format' is 'something-else', expected 'colearn-shards'"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ShardError, match="not readable JSON"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({"format": FORMAT, "version": 1, "task": "binary"}))
    with pytest.raises(ShardError, match=r"missing key\(s\) \['class_names'"):
        load_manifest(tmp_path)


def test_refuses_existing_shards_unless_overwrite(archive, tmp_path):
    write_shards(archive, tmp_path / "s", samples_per_shard=64, **QUIET)
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="already holds shards"):
        write_shards(archive, tmp_path / "s", samples_per_shard=64, **QUIET)
    m = write_shards(archive, tmp_path / "s", samples_per_shard=1000, overwrite=True, **QUIET)
    assert sorted(p.name for p in (tmp_path / "s").glob("*.tar")) == ["test-000000.tar", "train-000000.tar", "val-000000.tar"]
    assert (tmp_path / "s" / "notes.txt").exists()  # only our own files are removed
    assert verify_shards(tmp_path / "s") == [] and m.samples_per_shard == 1000


def test_bad_arguments(archive, tmp_path):
    with pytest.raises(ShardError, match="samples_per_shard"):
        write_shards(archive, tmp_path / "s", samples_per_shard=0, **QUIET)
    with pytest.raises(ShardError, match="val_fraction"):
        write_shards(archive, tmp_path / "s", val_fraction=1.0, **QUIET)


def test_verify_catches_corruption(archive, tmp_path):
    out = tmp_path / "s"
    m = write_shards(archive, out, samples_per_shard=32, **QUIET)
    assert verify_shards(out) == []
    first, second = shard_paths(m, "train")[:2]
    data = bytearray(first.read_bytes())
    data[700] ^= 0xFF  # inside the first member's payload
    first.write_bytes(bytes(data))
    problems = verify_shards(out)
    assert len(problems) == 1 and first.name in problems[0] and "sha256" in problems[0]

    second.write_bytes(second.read_bytes()[: 512 * 40])  # truncated mid-archive
    problems = verify_shards(out)
    assert any(second.name in p and "sha256" in p for p in problems)
    assert any(second.name in p and ("samples" in p or "tar" in p) for p in problems)

    test_shard = shard_paths(m, "test")[0]
    test_shard.unlink()
    assert any(test_shard.name in p and "missing" in p for p in verify_shards(out))

    (out / "train-999999.tar").write_bytes(b"")
    assert any("not listed" in p for p in verify_shards(out))
    assert "no shard manifest" in verify_shards(tmp_path / "elsewhere")[0]


def test_verify_catches_repeated_key(archive, tmp_path):
    out = tmp_path / "s"
    m = write_shards(archive, out, samples_per_shard=32, **QUIET)
    src = shard_paths(m, "train")[0]
    dst = shard_paths(m, "train")[1]
    dst.write_bytes(src.read_bytes())
    problems = verify_shards(out)
    assert any("also appears in" in p for p in problems)


def test_webdataset_and_tar_read_our_shards(archive, tmp_path):
    import webdataset as wds

    m = write_shards(archive, tmp_path / "s", samples_per_shard=32, **QUIET)
    urls = [str(p) for p in shard_paths(m, "train")]
    a = open_archive(archive)
    s1 = a.array("s1")[:]
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode())
    assert len(decoded) == m.split_size("train")
    sample = decoded[0]
    row = int(sample["__key__"])
    assert sample["meta.json"]["index"] == row
    np.testing.assert_array_equal(sample["s1.npy"], s1[row])
    assert sample["target.npy"].shape == () and sample["dw.npy"].dtype == np.uint8
    raw = next(iter(wds.WebDataset(urls[:1], shardshuffle=False)))
    assert isinstance(raw["s1.npy"], bytes)
    np.testing.assert_array_equal(_npy(raw["s1.npy"]), s1[int(raw["__key__"])])

    listing = subprocess.run(["tar", "-tvf", urls[0]], check=True, capture_output=True, text=True).stdout.splitlines()
    assert len(listing) == 32 * 8  # members: 4 modalities, target, month, latlon, meta
    assert all(line.startswith("-rw-r--r-- 0/0") and "1970-01-01" in line for line in listing)
    names = [line.split()[-1] for line in listing]
    members = ("s1.npy", "s2.npy", "srtm.npy", "dw.npy", "target.npy", "month.npy", "latlon.npy", "meta.json")
    assert names[:8] == [f"{names[0][:10]}.{e}" for e in members]


def test_bundled_fuel_moisture_shards(presto_archive, tmp_path):
    m = write_shards(presto_archive("fuel_moisture"), tmp_path / "s", workers=2, **QUIET)
    assert m.split_size("train") + m.split_size("val") == 1578 and m.split_size("test") == 735
    assert m.val_split["by"] == "group"
    assert set(m.modalities) == {"s1", "s2", "era5", "srtm", "dw"}
    assert m.target_name == "live fuel moisture" and m.target_unit == "%"
    assert verify_shards(tmp_path / "s") == []


def test_take_reads_sparse_rows_across_blocks(tmp_path):
    """A window of a sparse split spans many zarr chunks and several read blocks."""
    import zarr

    from colearn_dist.shards import _take

    data = np.arange(20000 * 3, dtype=np.float32).reshape(20000, 3)
    arr = zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array("x", data=data, chunks=(1000, 3))
    rows = np.sort(np.random.default_rng(0).choice(20000, size=700, replace=False))
    np.testing.assert_array_equal(_take(arr, rows), data[rows])
    np.testing.assert_array_equal(_take(arr, np.array([0, 8191, 8192, 19999])), data[[0, 8191, 8192, 19999]])
    assert _take(arr, np.array([], dtype=np.int64)).shape == (0, 3)


def test_split_rows_equal_flatnonzero_slices(monkeypatch):
    """The parent finds a window's rows block by block; same rows as slicing the whole index array."""
    from colearn_dist import shards

    rng = np.random.default_rng(0)
    for n, block in [(1000, 64), (1000, 7), (5, 4), (300, 1000)]:
        monkeypatch.setattr(shards, "_BLOCK", block)
        split = rng.integers(0, 3, n).astype(np.uint8)
        split[rng.random(n) < 0.5] = 0
        for code in range(3):
            rows, ends = np.flatnonzero(split == code), shards._block_ends(split, code)
            for start in range(0, len(rows) + 1, 7):
                for stop in {start, start + 1, start + 40, len(rows)}:
                    stop = min(stop, len(rows))
                    np.testing.assert_array_equal(shards._split_rows(split, code, ends, start, stop), rows[start:stop])


def test_manifest_entries_are_validated_on_load(archive, tmp_path):
    """An entry without sha256 would turn integrity checks off; counts that do not add up would
    train on part of the split or crash deep in the loader. Each is named on load (and by verify)."""
    out = tmp_path / "s"
    write_shards(archive, out, samples_per_shard=32, **QUIET)
    good = json.loads((out / MANIFEST_NAME).read_text())
    first = good["splits"]["train"]["shards"][0]["name"]

    def broken(edit) -> str:
        data = json.loads(json.dumps(good))
        edit(data)
        (out / MANIFEST_NAME).write_text(json.dumps(data))
        with pytest.raises(ShardError) as exc:
            load_manifest(out)
        assert verify_shards(out) == [str(exc.value)]  # verify reports it, no KeyError
        return str(exc.value)

    def drop_sha(d):
        del d["splits"]["train"]["shards"][0]["sha256"]

    def recount(d):
        d["splits"]["train"]["shards"][1]["num_samples"] -= 3

    def escape(d):
        d["splits"]["test"]["shards"][0]["name"] = "../../etc/passwd"

    assert f"splits.train.shards[0] ({first}): 'sha256' must be" in broken(drop_sha)
    assert "splits.train: its shards hold" in broken(recount) and "'num_samples' says" in broken(recount)
    assert "'name' must be a file name inside the shard folder" in broken(escape)
    (out / MANIFEST_NAME).write_text(json.dumps(good))
    assert verify_shards(out) == []


def test_a_band_without_any_train_value_is_refused(synthetic_archive, tmp_path):
    from colearn_dist.archive import write_archive

    from helpers import make_synthetic_arrays

    arrays = make_synthetic_arrays(n=120, groups=0, modalities={"s1": ("series", ("VV", "VH"), {}), "s2": ("series", ("B2", "B4"), {})})
    mods = arrays.pop("modalities")
    x, spec = mods["s2"]
    x[arrays["split"] == 0, :, 1] = np.nan  # B4 only has values outside train
    path = write_archive(tmp_path / "a.zarr", {**mods, "s2": (x, spec)}, **arrays)
    with pytest.raises(ShardError, match=r"modality 's2': band\(s\) \['B4'\] have no valid value in the train split"):
        write_shards(path, tmp_path / "s", samples_per_shard=32, **QUIET)
    assert not list((tmp_path / "s").glob("*.tar")) and not (tmp_path / "s" / MANIFEST_NAME).exists()
