"""Importers: the bundled Presto tasks (with the NDVI defect proven and fixed) and the generic importer."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from colearn_dist.archive import ArchiveError, open_archive
from colearn_dist.importers import BUNDLED, IMPORTERS, bundled_path, import_generic, import_presto
from colearn_dist.importers.presto import BANDS, STACKED_FILE

EXPECTED_SPLITS = {"fuel_moisture": (1578, 735), "algae_blooms": (777, 345)}


def _raw(name: str) -> np.ndarray:
    return np.load(bundled_path(name) / STACKED_FILE)


def test_registry_and_bundled_paths():
    assert IMPORTERS["presto"] is import_presto and IMPORTERS["generic"] is import_generic
    for name, path in BUNDLED.items():
        assert bundled_path(name) == path and (path / STACKED_FILE).exists()
    assert (BUNDLED["fuel_moisture"].parent / "LICENSE").exists()
    with pytest.raises(KeyError, match="crop_type"):
        bundled_path("crop_type")


@pytest.mark.parametrize("name", ["fuel_moisture", "algae_blooms"])
def test_bundled_split_sizes_and_layout(presto_archive, name):
    a = open_archive(presto_archive(name))
    train, test = EXPECTED_SPLITS[name]
    assert a.split_counts() == {"train": train, "val": 0, "test": test}
    assert a.task == "regression"
    t = _raw(name).shape[1]
    n = train + test
    assert {m: a.array(m).shape for m in a.modalities} == {
        "s1": (n, t, 2),
        "s2": (n, t, 12),
        "era5": (n, t, 2),
        "srtm": (n, 2),
        "dw": (n, t),
    }
    assert a.modalities["s2"].bands[-1] == "NDVI" and a.modalities["s2"].bands[0] == "B2"
    assert a.modalities["era5"].units == ("K", "m")
    assert a.modalities["s1"].units == ("dB", "dB")
    assert a.modalities["srtm"].units == ("m", "degrees")
    # months: 0-based on disk, 1..12 in the archive, consecutive steps
    raw_month = np.load(bundled_path(name) / "month.npy")
    np.testing.assert_array_equal(a.month[:], raw_month + 1)
    # the test split is the stored geographic split
    np.testing.assert_array_equal(a.split == 2, np.load(bundled_path(name) / "is_test.npy") == 1)
    assert len(set(a.ids.tolist())) == n


def test_fuel_moisture_ids_groups_and_target(presto_archive):
    a = open_archive(presto_archive("fuel_moisture"))
    assert a.ids[0] == "fm00000" and a.ids[-1] == f"fm{a.num_samples - 1:05d}"
    np.testing.assert_array_equal(a.group, np.load(bundled_path("fuel_moisture") / "site.npy"))
    assert (a.target_name, a.target_unit) == ("live fuel moisture", "%")
    # sites never straddle the geographic train/test split
    assert not set(a.group[a.split == 0]) & set(a.group[a.split == 2])


def test_algae_ids_and_target(presto_archive):
    a = open_archive(presto_archive("algae_blooms"))
    np.testing.assert_array_equal(a.ids, np.load(bundled_path("algae_blooms") / "uid.npy"))
    # one sample per uid: grouped by 1° cell instead, and no test cell is also a train cell
    assert a.group[0].startswith("cell") and 50 < len(set(a.group)) < 200
    assert not set(a.group[a.split == 0]) & set(a.group[a.split == 2])
    assert (a.target_name, a.target_unit) == ("bloom severity", "1-5")
    assert set(np.unique(a.target[:]).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}


@pytest.mark.parametrize("name", ["fuel_moisture", "algae_blooms"])
def test_stored_ndvi_is_b7_b3_not_b8_b4(name):
    """The defect this importer fixes: Presto's NDVI column is (B7-B3)/(B7+B3).

    It holds in every cell except gap-filled ones (fractional S2 values, NDVI stored as 0): 16 cells
    in algae_blooms, none in fuel_moisture.
    """
    x = _raw(name)
    b = {band: x[..., i] for i, band in enumerate(BANDS)}
    stored = b["NDVI"]
    wrong = (b["B7"] - b["B3"]) / (b["B7"] + b["B3"])
    right = (b["B8"] - b["B4"]) / (b["B8"] + b["B4"])
    gap_filled = (x[..., 2:13] % 1 != 0).any(axis=-1)
    assert gap_filled.sum() == {"fuel_moisture": 0, "algae_blooms": 16}[name]
    assert np.all(stored[gap_filled] == 0)
    np.testing.assert_allclose(stored[~gap_filled], wrong[~gap_filled], rtol=0, atol=1e-12)
    assert np.abs(stored - right).max() > 0.3  # the intended NDVI is clearly different


@pytest.mark.parametrize("name", ["fuel_moisture", "algae_blooms"])
def test_ndvi_recomputed_from_b8_b4(presto_archive, name):
    a = open_archive(presto_archive(name))
    s2 = a.array("s2")[:]
    bands = a.modalities["s2"].bands
    b8, b4 = s2[..., bands.index("B8")].astype(np.float64), s2[..., bands.index("B4")].astype(np.float64)
    np.testing.assert_allclose(s2[..., -1], (b8 - b4) / (b8 + b4), atol=1e-6)
    raw = _raw(name)
    np.testing.assert_allclose(s2[..., :11], raw[..., 2:13].astype(np.float32))  # bands kept as stored
    assert -1 <= np.nanmin(s2[..., -1]) and np.nanmax(s2[..., -1]) <= 1


@pytest.mark.parametrize("name", ["fuel_moisture", "algae_blooms"])
def test_srtm_static_and_units_plausible(presto_archive, name):
    raw = _raw(name)
    elev_slope = raw[..., [BANDS.index("elevation"), BANDS.index("slope")]]
    assert np.all(elev_slope == elev_slope[:, :1])  # constant over time, so one static layer loses nothing
    a = open_archive(presto_archive(name))
    assert a.modalities["srtm"].kind == "static"
    np.testing.assert_allclose(a.array("srtm")[:], elev_slope[:, 0].astype(np.float32))
    era5 = a.array("era5")[:]
    assert 240 < era5[..., 0].min() and era5[..., 0].max() < 320  # kelvin, not Celsius
    assert 0 <= era5[..., 1].min() and era5[..., 1].max() < 0.1  # metres of precipitation
    assert a.array("s2")[..., :11].max() > 1000  # reflectance x 10000


@pytest.mark.parametrize("name", ["fuel_moisture", "algae_blooms"])
def test_dynamic_world_categorical(presto_archive, name):
    a = open_archive(presto_archive(name))
    spec = a.modalities["dw"]
    assert (spec.kind, spec.num_classes, spec.missing_value) == ("categorical", 10, 9)
    dw = a.array("dw")[:]
    assert dw.dtype == np.uint8 and dw.max() <= 9
    np.testing.assert_array_equal(dw, np.load(bundled_path(name) / "dynamic_world.npy"))


def _copy_bundled(tmp_path, name="fuel_moisture"):
    src = tmp_path / name
    shutil.copytree(bundled_path(name), src)
    return src


def test_presto_missing_file_names_file_key_and_shape(tmp_path):
    src = _copy_bundled(tmp_path)
    (src / "latlon.npy").unlink()
    with pytest.raises(ArchiveError, match=r"latlon\.npy: missing \(key 'latlon', expected shape \[N, 2\]\)"):
        import_presto(src, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()


def test_presto_wrong_shape_names_file_key_and_shape(tmp_path):
    src = _copy_bundled(tmp_path)
    x = np.load(src / STACKED_FILE)
    np.save(src / STACKED_FILE, x[..., :17])
    with pytest.raises(ArchiveError, match=r"s1_s2_era5_srtm\.npy: key 's1_s2_era5_srtm' has shape \[2313, 3, 17\], expected \[N, T, 18\]"):
        import_presto(src, tmp_path / "out.zarr")


def test_presto_sample_count_mismatch_names_both_files(tmp_path):
    src = _copy_bundled(tmp_path)
    np.save(src / "target.npy", np.load(src / "target.npy")[:-1])
    with pytest.raises(ArchiveError, match=r"target\.npy: key 'target' has N = 2312, but s1_s2_era5_srtm\.npy has N = 2313"):
        import_presto(src, tmp_path / "out.zarr")


def test_presto_unreadable_file_named(tmp_path):
    src = _copy_bundled(tmp_path)
    (src / "month.npy").write_bytes(b"not numpy")
    with pytest.raises(ArchiveError, match=r"month\.npy: cannot read key 'month'"):
        import_presto(src, tmp_path / "out.zarr")


def test_presto_unknown_layout(tmp_path):
    with pytest.raises(ArchiveError, match="neither site.npy"):
        import_presto(tmp_path, tmp_path / "out.zarr")


# ---------------------------------------------------------------- generic importer


def _generic_arrays(n=30, t=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "optical": rng.normal(size=(n, t, 3)).astype(np.float32),
        "radar": rng.normal(size=(n, t, 2)),
        "dem": rng.normal(size=(n, 2)),
        "landcover": rng.integers(0, 6, size=(n, t)),
        "target": rng.integers(0, 3, size=n),
        "split": np.array(["train"] * 20 + ["val"] * 4 + ["test"] * 6),
        "ids": np.array([f"x{i}" for i in range(n)]),
        "group": np.array([f"g{i % 5}" for i in range(n)]),
        "latlon": rng.uniform(-50, 50, size=(n, 2)),
        "month": np.tile(np.arange(1, t + 1), (n, 1)),
    }


def test_generic_from_npz(tmp_path):
    arrays = _generic_arrays()
    np.savez(tmp_path / "data.npz", **arrays)
    path = import_generic(tmp_path / "data.npz", tmp_path / "a.zarr", modalities=None, task="multiclass", class_names=("a", "b", "c"))
    a = open_archive(path)
    assert list(a.modalities) == ["optical", "radar", "dem", "landcover"]
    kinds = {m: s.kind for m, s in a.modalities.items()}
    assert kinds == {"optical": "series", "radar": "series", "dem": "static", "landcover": "categorical"}
    assert a.modalities["landcover"].num_classes == int(arrays["landcover"].max()) + 1
    assert a.array("radar").dtype == np.float32
    assert a.split_counts() == {"train": 20, "val": 4, "test": 6}
    np.testing.assert_array_equal(a.ids, arrays["ids"])
    np.testing.assert_array_equal(a.group, arrays["group"])
    np.testing.assert_array_equal(a.month[:], arrays["month"])
    np.testing.assert_array_equal(a.target[:], arrays["target"])
    assert a.class_names == ("a", "b", "c")


def test_generic_from_folder_subset_without_split_or_ids(tmp_path):
    arrays = _generic_arrays()
    src = tmp_path / "src"
    src.mkdir()
    for key in ("optical", "dem", "landcover"):
        np.save(src / f"{key}.npy", arrays[key])
    np.save(src / "y.npy", arrays["optical"][:, 0, 0].astype(np.float64))
    path = import_generic(src, tmp_path / "a.zarr", modalities=["optical", "dem"], task="regression", target_key="y")
    a = open_archive(path)
    assert list(a.modalities) == ["optical", "dem"]
    assert a.split_counts() == {"train": 30, "val": 0, "test": 0}
    assert a.ids.tolist() == [str(i) for i in range(30)]
    assert a.group is None and a.month is None
    assert a.target_name == "y"


def test_generic_sample_count_mismatch_names_file_and_key(tmp_path):
    arrays = _generic_arrays()
    arrays["dem"] = arrays["dem"][:-2]
    np.savez(tmp_path / "data.npz", **arrays)
    with pytest.raises(ArchiveError, match=r"data\.npz\['dem'\]: key 'dem' has shape \[28, 2\]: 28 samples, but 'target' has 30"):
        import_generic(tmp_path / "data.npz", tmp_path / "a.zarr", modalities=None, task="multiclass")
    assert not (tmp_path / "a.zarr").exists()


def test_generic_bad_file_named(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "target.npy", np.zeros(5))
    (src / "optical.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ArchiveError, match=r"optical\.npy: cannot read key 'optical'"):
        import_generic(src, tmp_path / "a.zarr", modalities=None, task="regression")


def test_generic_object_array_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "target.npy", np.zeros(3))
    np.save(src / "weird.npy", np.array([{"a": 1}, None, 3], dtype=object), allow_pickle=True)
    with pytest.raises(ArchiveError, match=r"weird\.npy: cannot read key 'weird'"):
        import_generic(src, tmp_path / "a.zarr", modalities=None, task="regression")


def test_generic_missing_key_and_bad_values(tmp_path):
    arrays = _generic_arrays()
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(ArchiveError, match=r"key 'sar' is missing"):
        import_generic(tmp_path / "d.npz", tmp_path / "a.zarr", modalities=["sar"], task="multiclass")
    with pytest.raises(ArchiveError, match=r"key 'label' is missing"):
        import_generic(tmp_path / "d.npz", tmp_path / "a.zarr", modalities=None, task="multiclass", target_key="label")
    bad = dict(arrays, split=np.array(["train"] * 29 + ["holdout"]))
    np.savez(tmp_path / "e.npz", **bad)
    with pytest.raises(ArchiveError, match=r"e\.npz\['split'\]: key 'split' has unknown values \['holdout'\]"):
        import_generic(tmp_path / "e.npz", tmp_path / "a.zarr", modalities=None, task="multiclass")
    bad = dict(arrays, dem=np.zeros(30))
    np.savez(tmp_path / "f.npz", **bad)
    with pytest.raises(ArchiveError, match=r"f\.npz\['dem'\]: key 'dem' has shape \[30\]"):
        import_generic(tmp_path / "f.npz", tmp_path / "a.zarr", modalities=None, task="multiclass")
    with pytest.raises(ArchiveError, match="task 'ranking'"):
        import_generic(tmp_path / "d.npz", tmp_path / "a.zarr", modalities=None, task="ranking")
    with pytest.raises(ArchiveError, match="expected a folder of .npy files or one .npz"):
        import_generic(tmp_path / "nothing.txt", tmp_path / "a.zarr", modalities=None, task="regression")


def _cube(n: int = 30, t: int = 5):
    """A datacube as an EO scientist holds one: pixel / time / band dims, datetime time axis, a radar
    variable stored as scaled int16 with a _FillValue, a static DEM, a land-cover layer with gaps."""
    import xarray as xr

    rng = np.random.default_rng(0)
    radar = rng.normal(-12, 3, size=(n, t, 2)).astype(np.float32)
    radar[0, 1, :] = np.nan  # a missing observation
    radar[2, :, 1] = np.nan  # a band missing for one pixel
    dem = rng.normal(300, 50, size=(n, 2)).astype(np.float32)
    lc = rng.integers(0, 4, size=(n, t)).astype(np.float64)
    lc[3, 2] = np.nan
    ds = xr.Dataset(
        {
            "radar": (("pixel", "time", "band"), radar, {"units": "dB", "sensor": "Sentinel-1 C-SAR", "processing_level": "GRD"}),
            "dem": (("pixel", "band2"), dem),
            "lc": (("pixel", "time"), lc),
            "target": (("pixel",), rng.normal(50, 10, n).astype(np.float32), {"units": "%"}),
            "split": (("pixel",), np.where(np.arange(n) < 24, "train", "test")),
        },
        coords={
            "pixel": [f"px{i}" for i in range(n)],
            "time": np.array([f"2021-{m:02d}-01" for m in range(3, 3 + t)], dtype="datetime64[ns]"),
            "band": ["VV", "VH"],
            "band2": ["elevation", "slope"],
            "lat": (("pixel",), rng.uniform(-10, 10, n)),
            "lon": (("pixel",), rng.uniform(20, 40, n)),
        },
    )
    encoding = {
        "radar": {"dtype": "int16", "scale_factor": 0.01, "add_offset": -10.0, "_FillValue": -32768},
        "lc": {"dtype": "int8", "_FillValue": -1},
    }
    return ds, encoding


@pytest.mark.parametrize("store", ["zarr", "netcdf"])
def test_xarray_cube_imports_with_decoding(tmp_path, store):
    """_FillValue → NaN (missing), scale/offset applied, bands from the coordinate, months from the
    datetime axis, lat/lon from the coordinates; the archive validates as any import."""
    from colearn_dist.importers import import_xarray

    ds, encoding = _cube()
    if store == "zarr":
        path = tmp_path / "cube.zarr"
        ds.to_zarr(path, encoding=encoding, consolidated=True)
    else:
        path = tmp_path / "cube.nc"
        ds.to_netcdf(path, encoding=encoding)
    out = import_xarray(path, tmp_path / "a.zarr", task="regression", sample_dim="pixel", modalities=["radar", "lc"])
    a = open_archive(out)
    radar = a.array("radar")[:]
    np.testing.assert_allclose(radar, np.round((ds["radar"].values + 10.0) / 0.01) * 0.01 - 10.0, atol=1e-4)  # int16 quantised
    assert np.isnan(radar[0, 1]).all() and np.isnan(radar[2, :, 1]).all() and np.isnan(radar).sum() == 2 + 5
    spec = a.modalities["radar"]
    assert spec.kind == "series" and spec.bands == ("VV", "VH") and spec.units == ("dB", "dB")
    assert (spec.sensor, spec.processing_level) == ("Sentinel-1 C-SAR", "GRD")
    lc = a.modalities["lc"]
    assert lc.kind == "categorical" and lc.missing_value == lc.num_classes - 1
    assert a.array("lc")[3, 2] == lc.missing_value and (a.array("lc")[:] == lc.missing_value).sum() == 1
    np.testing.assert_array_equal(a.month[:], np.tile(np.arange(3, 8), (30, 1)))
    np.testing.assert_allclose(a.latlon[:], np.stack([ds["lat"].values, ds["lon"].values], axis=1))
    assert list(a.ids[:3]) == ["px0", "px1", "px2"] and a.split_counts() == {"train": 24, "val": 0, "test": 6}
    assert a.target_unit == "%"


def test_xarray_cube_sensor_per_group_and_bad_flags(tmp_path):
    """One group per sensor (the group's variable named like it); dims that do not match the flags
    and an unknown variable are one-line errors naming the dimension / variable."""
    import xarray as xr

    from colearn_dist.importers import import_xarray

    ds, _ = _cube()
    path = tmp_path / "cube.zarr"
    ds[["target", "split"]].to_zarr(path, consolidated=False)
    ds[["radar"]].rename(radar="s1").to_zarr(path, group="s1", consolidated=False)
    ds[["dem"]].to_zarr(path, group="dem", consolidated=False)
    out = import_xarray(path, tmp_path / "a.zarr", task="regression", sample_dim="pixel", band_dim="band", modalities=["s1"])
    assert open_archive(out).modalities["s1"].bands == ("VV", "VH")
    with pytest.raises(ArchiveError, match=r"variable 'dem' has dims \['pixel', 'band2'\]; dimension 'band2' is none of"):
        import_xarray(path, tmp_path / "b.zarr", task="regression", sample_dim="pixel", modalities=["dem"])
    with pytest.raises(ArchiveError, match=r"variable 's1' has no dimension 'sample' \(--sample-dim\)"):
        import_xarray(path, tmp_path / "b.zarr", task="regression", modalities=["s1"])
    with pytest.raises(ArchiveError, match=r"no variable or group 'optical'"):
        import_xarray(path, tmp_path / "b.zarr", task="regression", sample_dim="pixel", modalities=["optical"])
    assert not (tmp_path / "b.zarr").exists()  # nothing written on bad input
    assert isinstance(xr.open_datatree(path, engine="zarr"), xr.DataTree)


def test_cli_imports_a_cube(tmp_path, capsys):
    from colearn_dist.cli import main

    ds, encoding = _cube()
    ds.to_netcdf(tmp_path / "cube.nc", encoding=encoding)
    args = ["import", "xarray", str(tmp_path / "cube.nc"), str(tmp_path / "a.zarr"), "--sample-dim", "pixel", "--modalities", "radar,lc"]
    assert main(args) == 0
    assert "30 samples" in capsys.readouterr().out
    assert list(open_archive(tmp_path / "a.zarr").modalities) == ["radar", "lc"]
