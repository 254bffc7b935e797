"""The archive format: round trip, and every validation failure names the array at fault."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from colearn_dist.archive import (
    SPLIT_CODES,
    ArchiveError,
    ModalitySpec,
    describe,
    modality_key,
    nan_safe_mean_std,
    open_archive,
    write_archive,
)


def _replace(path: Path, key: str, data: np.ndarray, attrs: dict | None = None) -> None:
    """Swap one array of a written archive, keeping its attributes (simulates a hand-edited archive);
    "modalities/<name>" means the modality's array (inside its group)."""
    root = zarr.open_group(str(path), mode="r+")
    if key.startswith("modalities/"):
        key = modality_key(root, key.split("/")[1])
    old_attrs = dict(root[key].attrs) if key in root else {}
    del root[key]
    arr = root.create_array(key, data=data)
    arr.attrs.update(attrs if attrs is not None else old_attrs)


def test_round_trip(synthetic_archive):
    path = synthetic_archive(n=50, task="multiclass", num_classes=4, with_val=True)
    a = open_archive(path)
    assert a.num_samples == 50 and a.task == "multiclass"
    assert list(a.modalities) == ["s1", "s2", "srtm", "dw"]
    assert a.modalities["dw"].num_classes == 5 and a.modalities["dw"].missing_value == 4
    assert a.array("s2").shape == (50, 6, 4) and a.array("s2").dtype == np.float32
    assert a.array("srtm").shape == (50, 2)
    assert a.class_names == ("class0", "class1", "class2", "class3")
    counts = a.split_counts()
    assert sum(counts.values()) == 50 and counts["val"] > 0 and counts["test"] > 0
    assert a.month is not None and 1 <= a.month[:].min() and a.month[:].max() <= 12
    assert a.group is not None and len(a.ids) == 50
    assert "50 samples" in describe(a)


def test_write_refuses_existing_without_overwrite(synthetic_archive, tmp_path):
    path = synthetic_archive(n=20, path=tmp_path / "a.zarr")
    with pytest.raises(ArchiveError, match="already exists"):
        synthetic_archive(n=20, path=path)
    synthetic_archive(n=30, path=path, overwrite=True)
    assert open_archive(path).num_samples == 30


def test_sample_count_mismatch_names_array(synthetic_archive):
    path = synthetic_archive(n=40)
    _replace(path, "modalities/s2", np.zeros((39, 6, 4), dtype=np.float32))
    with pytest.raises(ArchiveError, match=r"'modalities/s2/s2' has 39 samples, 'split' has 40"):
        open_archive(path)


def test_unknown_split_codes_name_split(synthetic_archive):
    path = synthetic_archive(n=40)
    split = np.zeros(40, dtype=np.uint8)
    split[3] = 7
    _replace(path, "split", split)
    with pytest.raises(ArchiveError, match=r"array 'split' has unknown codes \[7\]"):
        open_archive(path)


def test_unknown_split_names_rejected_on_write(tmp_path):
    x = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ArchiveError, match=r"array 'split' has unknown values \['validation'\]"):
        write_archive(
            tmp_path / "a.zarr",
            {"s": (x, ModalitySpec("s", "static", ("a", "b", "c")))},
            target=np.zeros(4),
            task="regression",
            split=np.array(["train", "validation", "test", "train"]),
            ids=np.arange(4),
        )


def test_wrong_dtype_names_array(synthetic_archive):
    path = synthetic_archive(n=40)
    _replace(path, "modalities/s1", np.zeros((40, 6, 2), dtype=np.float64))
    with pytest.raises(ArchiveError, match=r"'modalities/s1/s1' has dtype float64, expected float32"):
        open_archive(path)


def test_float_categorical_names_array(synthetic_archive):
    path = synthetic_archive(n=40)
    _replace(path, "modalities/dw", np.zeros((40, 6), dtype=np.float32))
    with pytest.raises(ArchiveError, match=r"'modalities/dw/dw' \(categorical\) has dtype float32"):
        open_archive(path)


def test_all_nan_band_names_array_and_band(synthetic_archive):
    path = synthetic_archive(n=40)
    x = open_archive(path).array("s2")[:]
    x[..., 2] = np.nan
    _replace(path, "modalities/s2", x)
    with pytest.raises(ArchiveError, match=r"'modalities/s2/s2' has all-NaN band\(s\) \['B8'\]"):
        open_archive(path)
    assert open_archive(path, check_values=False).num_samples == 40  # the scan is what finds it


def test_categorical_code_out_of_range_names_array(synthetic_archive):
    path = synthetic_archive(n=40)
    codes = open_archive(path).array("dw")[:]  # 5 classes, 4 = missing: 0..4 are fine
    assert codes.max() <= 4
    codes[7, 2] = 6
    _replace(path, "modalities/dw", codes)
    with pytest.raises(
        ArchiveError, match=r"'modalities/dw/dw' \(categorical\) has code 6 outside \[0, 4\] that is not its missing_value \(4\)"
    ):
        open_archive(path)


def test_class_ids_checked_chunk_by_chunk(synthetic_archive):
    path = synthetic_archive(n=40, task="multiclass", num_classes=4)
    target = open_archive(path).target[:]
    target[-1] = 9  # in the last chunk only
    root = zarr.open_group(str(path), mode="r+")
    del root["target"]
    root.create_array("target", data=target, chunks=(8,))
    with pytest.raises(ArchiveError, match=r"array 'target' has class ids outside \[0, 3\]"):
        open_archive(path)


def test_infinite_value_names_array(synthetic_archive):
    path = synthetic_archive(n=40)
    x = open_archive(path).array("srtm")[:]
    x[5, 1] = np.inf
    _replace(path, "modalities/srtm", x)
    with pytest.raises(ArchiveError, match=r"'modalities/srtm/srtm' has infinite values"):
        open_archive(path)


def test_duplicate_ids_name_ids(synthetic_archive):
    path = synthetic_archive(n=40)
    root = zarr.open_group(str(path), mode="r+")
    ids = np.array([f"s{i}" for i in range(40)])
    ids[7] = ids[8]
    del root["ids"]
    root.create_array("ids", shape=ids.shape, dtype=str)[:] = ids
    with pytest.raises(ArchiveError, match=r"array 'ids' has duplicate sample ids"):
        open_archive(path)


def _write_ids(path: Path, ids: np.ndarray, chunk: int) -> None:
    root = zarr.open_group(str(path), mode="r+")
    del root["ids"]
    root.create_array("ids", shape=ids.shape, dtype=str, chunks=(chunk,))[:] = ids


def test_open_reads_no_ids_or_groups_until_asked(synthetic_archive, monkeypatch):
    """Opening must not materialise per-sample strings (10^8 of them in a continental archive)."""
    import colearn_dist.archive as archive_module

    path = synthetic_archive(n=60, groups=5)
    reads = []
    real = archive_module._read_strings
    monkeypatch.setattr(archive_module, "_read_strings", lambda arr: reads.append(arr.name) or real(arr))
    a = open_archive(path)
    assert reads == [] and a._ids is None and a._group is None and a.has_group
    ids = a.ids
    assert a._ids is ids and a._group is None and len(ids) == 60 and ids.dtype.kind == "U"
    assert a.ids is ids  # cached: read once
    group = a.group
    assert a._group is group and group.dtype.kind == "U" and len(group) == 60
    assert len(reads) == 2
    codes, names = a.group_codes()
    assert codes.dtype == np.int32 and codes.shape == (60,)
    assert names == list(dict.fromkeys(group.tolist()))  # first-appearance order
    np.testing.assert_array_equal(np.array(names)[codes], group)


def test_no_group_array(synthetic_archive):
    path = synthetic_archive(n=30)
    del zarr.open_group(str(path), mode="r+")["group"]
    a = open_archive(path)
    assert a.group is None and not a.has_group
    with pytest.raises(ArchiveError, match=r"array 'group' is missing"):
        a.group_codes()


def test_duplicate_ids_found_across_chunks(synthetic_archive, monkeypatch):
    import colearn_dist.archive as archive_module

    monkeypatch.setattr(archive_module, "_STRING_BATCH", 3)  # many batches and chunks
    path = synthetic_archive(n=40)
    ids = np.array([f"s{i}" for i in range(40)])
    ids[35] = ids[2]  # in different chunks
    _write_ids(path, ids, chunk=8)
    with pytest.raises(ArchiveError, match=r"array 'ids' has duplicate sample ids \(e.g. 's2'\)"):
        open_archive(path)
    ids[35] = "s35"
    _write_ids(path, ids, chunk=8)
    assert open_archive(path).num_samples == 40


def test_hash_collisions_are_not_duplicates(synthetic_archive, monkeypatch):
    """Distinct ids whose hashes collide are accepted; real duplicates among them are still found."""
    import colearn_dist.archive as archive_module

    monkeypatch.setattr(archive_module, "_id_hashes", lambda values: np.array([len(v) % 2 for v in values], dtype=np.int64))
    path = synthetic_archive(n=40)
    ids = np.array([f"s{i}" for i in range(40)])  # every id collides with about half the others
    _write_ids(path, ids, chunk=16)
    assert open_archive(path).num_samples == 40
    ids[39] = ids[11]
    _write_ids(path, ids, chunk=16)
    with pytest.raises(ArchiveError, match=r"duplicate sample ids \(e.g. 's11'\)"):
        open_archive(path)


@pytest.mark.parametrize("key", ["target", "split", "ids"])
def test_missing_required_array_named(synthetic_archive, key):
    path = synthetic_archive(n=30)
    del zarr.open_group(str(path), mode="r+")[key]
    with pytest.raises(ArchiveError, match=rf"array '{key}' is missing"):
        open_archive(path)


def test_missing_modality_array_named(synthetic_archive):
    path = synthetic_archive(n=30)
    del zarr.open_group(str(path), mode="r+")["modalities/srtm"]
    with pytest.raises(ArchiveError, match=r"array 'modalities/srtm' is missing"):
        open_archive(path)


def test_band_count_mismatch_named(synthetic_archive):
    path = synthetic_archive(n=30)
    _replace(path, "modalities/s1", np.zeros((30, 6, 3), dtype=np.float32))
    with pytest.raises(ArchiveError, match=r"'modalities/s1/s1' has 3 bands but attribute 'bands' names 2"):
        open_archive(path)


def test_month_out_of_range_named(synthetic_archive):
    path = synthetic_archive(n=30)
    _replace(path, "month", np.zeros((30, 6), dtype=np.int64))
    with pytest.raises(ArchiveError, match=r"array 'month' has values outside 1..12"):
        open_archive(path)


def test_class_ids_out_of_range(synthetic_archive):
    path = synthetic_archive(n=30, task="multiclass", num_classes=3)
    _replace(path, "target", np.full(30, 5, dtype=np.int64))
    with pytest.raises(ArchiveError, match=r"array 'target' has class ids outside \[0, 2\]"):
        open_archive(path)


def test_not_an_archive(tmp_path):
    with pytest.raises(ArchiveError, match="no such archive"):
        open_archive(tmp_path / "nope.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["format"] = "something"
    with pytest.raises(ArchiveError, match="attribute 'format'"):
        open_archive(tmp_path / "other.zarr")


def test_split_codes_are_the_documented_ones():
    assert SPLIT_CODES == {"train": 0, "val": 1, "test": 2}


def test_nan_safe_mean_std_matches_numpy_and_floors_constant_bands():
    rng = np.random.default_rng(0)
    x = rng.normal(5, 3, size=(1000, 3))
    x[:, 2] = 7.0
    mean, std = nan_safe_mean_std(x.sum(0), (x * x).sum(0), np.full(3, 1000.0))
    np.testing.assert_allclose(mean, x.mean(0))
    np.testing.assert_allclose(std[:2], x.std(0)[:2], rtol=1e-9)
    assert std[2] == 1.0


@pytest.mark.parametrize("name", ["fuel_moisture", "algae_blooms"])
def test_every_bundled_archive_opens_with_xarray(presto_archive, name):
    """Each modality group is a labelled DataArray: dims sample / time / band, band names, ids,
    months and lat/lon as coordinates; values are the archive's (NaN stays NaN)."""
    import xarray as xr

    from colearn_dist.importers import BUNDLED

    assert set(BUNDLED) == {"fuel_moisture", "algae_blooms"}
    path = presto_archive(name)
    a = open_archive(path)
    assert a.attrs["version"] == 2
    for m, spec in a.modalities.items():
        da = xr.open_zarr(path, group=f"modalities/{m}", consolidated=False)[m]
        raw = a.array(m)[:]
        assert da.dims == {"series": ("sample", "time", "band"), "static": ("sample", "band"), "categorical": ("sample", "time")}[spec.kind]
        assert list(da["sample"].values) == list(a.ids)
        if spec.kind != "categorical":
            assert list(da["band"].values) == list(spec.bands)
            np.testing.assert_array_equal(da.values, raw)  # NaN where the archive has NaN
        else:  # xarray masks the declared missing code (CF missing_value) as NaN
            np.testing.assert_array_equal(np.isnan(da.values), raw == spec.missing_value)
        if spec.kind != "static":
            np.testing.assert_array_equal(da["month"].values, a.month[:])
        if a.latlon is not None:
            np.testing.assert_array_equal(np.stack([da["lat"].values, da["lon"].values], axis=1), a.latlon[:])
    assert a.modalities["s1"].sensor == "Sentinel-1 C-SAR" and a.modalities["s1"].processing_level == "GRD"
    root = xr.open_zarr(path, consolidated=False)
    assert root["target"].dims == ("sample",) and root["month"].dims == ("sample", "time")


def test_version_1_archives_still_open(synthetic_archive, tmp_path):
    """An archive of the first layout (bare modality arrays, no dimension names) reads as before."""
    from colearn_dist.shards import write_shards

    path = synthetic_archive(n=40)
    new = open_archive(path)
    root = zarr.open_group(str(path), mode="r+")
    for m, spec in new.modalities.items():
        data = new.array(m)[:]
        del root[f"modalities/{m}"]
        root.create_array(f"modalities/{m}", data=data).attrs.update(spec.attrs())
    root.attrs["version"] = 1
    old = open_archive(path)
    assert old.modalities == new.modalities
    np.testing.assert_array_equal(old.array("s2")[:], new.array("s2")[:])
    assert write_shards(path, tmp_path / "shards", samples_per_shard=16, workers=1, progress=False).modalities["s2"]["shape"] == [6, 4]
    root.attrs["version"] = 3
    with pytest.raises(ArchiveError, match=r"attribute 'version' is 3; this colearn_dist reads archive versions 1..2"):
        open_archive(path)
