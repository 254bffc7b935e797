"""Benchmark importers (LFMC, CropHarvest, TreeSatAI-TS, MDiCo netCDF) on small files written here in each
dataset's own layout, and the image modality through archive → shards → loader → model."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from colearn_dist.archive import SPLIT_CODES, ArchiveError, ModalitySpec, open_archive, write_archive
from colearn_dist.cli import main as cli_main
from colearn_dist.config import EncoderConfig, ModelConfig, ObjectiveConfig, load_config
from colearn_dist.encoders import ImageCNN, build_encoder
from colearn_dist.importers import (
    IMPORTERS,
    import_cropharvest,
    import_lfmc,
    import_mdico_netcdf,
    import_treesatai,
)
from colearn_dist.importers.presto import BANDS
from colearn_dist.importers.treesatai import GENERA
from colearn_dist.manifest import Modality, modality_inputs

REPO = Path(__file__).resolve().parent.parent


def test_registry_has_the_benchmarks():
    assert {"lfmc", "cropharvest", "treesatai", "mdico_netcdf"} <= set(IMPORTERS)
    assert IMPORTERS["lfmc"] is import_lfmc and IMPORTERS["mdico_netcdf"] is import_mdico_netcdf


# ------------------------------------------------------------------------------------------------ LFMC
S1 = ["vv", "vh", "vh_vv"]
OPTICAL = ["red", "green", "blue", "swir", "nir", "ndvi", "ndwi", "nirv"]
STATIC = ["slope", "elevation", "canopy_height", "forest_cover", "silt", "sand", "clay"]


def lfmc_rows(n_sites: int = 12, per_site: int = 5, seed: int = 0) -> tuple[list[str], list[list[str]]]:
    """Rao et al.'s layout: an unnamed index, site, date, lat/lon, percent(t), name(t-k) features (statics
    repeated at every lag, as in the published table). Feature value = 100·feature + 10·lag + row/1000,
    so a test can tell columns and lags apart."""
    rng = np.random.default_rng(seed)
    feats = S1 + OPTICAL + STATIC
    header = ["", "site", "date", "latitude", "longitude", "percent(t)"]
    header += [f"{f}(t)" if k == 0 else f"{f}(t-{k})" for f in feats for k in range(4)]
    rows = []
    for s in range(n_sites):
        for _ in range(per_site):
            i = len(rows)
            month = 1 + (i % 12)
            row = [
                str(i),
                f"site{s}",
                f"2018-{month:02d}-15",
                f"{35 + s * 0.1:.3f}",
                f"{-120 - s * 0.1:.3f}",
                f"{rng.uniform(50, 200):.2f}",
            ]
            for fi, f in enumerate(feats):
                for k in range(4):
                    value = 100 * fi + 10 * k + i / 1000 if f not in STATIC else 100 * fi + s
                    row.append(f"{value:.4f}")
            rows.append(row)
    return header, rows


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def lfmc_csv(tmp_path):
    header, rows = lfmc_rows()
    rows.append(list(rows[3]))  # two exact duplicates (the published table has ~30)
    rows.append(list(rows[7]))
    return write_csv(tmp_path / "training_features.csv", header, rows)


def test_lfmc_default_layout_order_and_duplicates(tmp_path, lfmc_csv, capsys):
    a = open_archive(import_lfmc(lfmc_csv, tmp_path / "lfmc.zarr"))
    assert "removed 2 duplicate row(s)" in capsys.readouterr().err
    n = 60
    assert a.task == "regression" and a.num_samples == n and a.target_unit == "%"
    assert {m: a.array(m).shape for m in a.modalities} == {"s1": (n, 4, 3), "optical": (n, 4, 8), "static": (n, 7)}
    assert a.modalities["s1"].bands == ("vv", "vh", "vh_vv") and a.modalities["static"].kind == "static"
    s1 = a.array("s1")[:]
    # oldest first: step 0 is t-3 (value 100·f + 30), step 3 is t (100·f + 0); row 5 → + 0.005
    np.testing.assert_allclose(s1[5, :, 0], [30.005, 20.005, 10.005, 0.005], rtol=1e-6)
    np.testing.assert_allclose(s1[5, 0, 2], 200 + 30.005, rtol=1e-6)
    np.testing.assert_allclose(a.array("static")[5], [100 * (11 + k) + 1 for k in range(7)])  # site1, (t) column
    assert a.group[5] == "site1" and a.ids[5] == "site1/2018-06-15"
    # months of the steps: date month minus lag, oldest first (row 0 is January → Oct, Nov, Dec, Jan)
    np.testing.assert_array_equal(a.month[0], [10, 11, 12, 1])
    np.testing.assert_allclose(a.latlon[5], [35.1, -120.1])
    counts = a.split_counts()
    assert counts["test"] == 6 and counts["train"] == 54  # fold 0 of 10
    # another fold holds other samples; same fold and seed, same split
    b = open_archive(import_lfmc(lfmc_csv, tmp_path / "f1.zarr", fold=1))
    assert not ((a.split == 2) & (b.split == 2)).any()
    c = open_archive(import_lfmc(lfmc_csv, tmp_path / "f0.zarr"))
    np.testing.assert_array_equal(a.split, c.split)


def test_lfmc_group_folds_keep_sites_whole(tmp_path, lfmc_csv):
    a = open_archive(import_lfmc(lfmc_csv, tmp_path / "g.zarr", group_folds=True, folds=4, fold=2))
    test_sites = set(a.group[a.split == 2].tolist())
    assert test_sites and not test_sites & set(a.group[a.split == 0].tolist())


def test_lfmc_modalities_from_yaml(tmp_path, lfmc_csv):
    spec = tmp_path / "mods.yaml"
    spec.write_text("radar: [vh, vv]\nsoil: {kind: static, columns: [sand, clay]}\nveg: {columns: [ndvi]}\n")
    a = open_archive(import_lfmc(lfmc_csv, tmp_path / "y.zarr", modalities=spec))
    assert list(a.modalities) == ["radar", "soil", "veg"]
    assert a.array("radar").shape[1:] == (4, 2) and a.array("soil").shape[1:] == (2,)
    np.testing.assert_allclose(a.array("radar")[0, 3], [100, 0])  # vh is feature 1, vv feature 0, at lag 0


def test_lfmc_errors_name_file_column_and_line(tmp_path):
    header, rows = lfmc_rows(n_sites=3, per_site=4)
    drop = header.index("vh(t-2)")
    bad = write_csv(
        tmp_path / "missing.csv", [h for j, h in enumerate(header) if j != drop], [[v for j, v in enumerate(r) if j != drop] for r in rows]
    )
    with pytest.raises(ArchiveError, match=r"missing\.csv.*feature 'vh'.*'vh\(t-2\)'"):
        import_lfmc(bad, tmp_path / "a.zarr")
    rows[2][header.index("red(t-1)")] = "cloudy"
    bad = write_csv(tmp_path / "text.csv", header, rows)
    with pytest.raises(ArchiveError, match=r"text\.csv: column 'red\(t-1\)', line 4: 'cloudy' is not a number"):
        import_lfmc(bad, tmp_path / "b.zarr")
    no_target = write_csv(tmp_path / "nt.csv", [h.replace("percent(t)", "lfmc") for h in header], rows)
    with pytest.raises(ArchiveError, match=r"nt\.csv: column 'percent\(t\)' is missing"):
        import_lfmc(no_target, tmp_path / "c.zarr")
    yaml_file = tmp_path / "bad.yaml"
    yaml_file.write_text("s1: {kind: image, columns: [vv]}\n")
    with pytest.raises(ArchiveError, match=r"bad\.yaml: key 's1': kind 'image'"):
        import_lfmc(no_target, tmp_path / "d.zarr", modalities=yaml_file)


def test_lfmc_parquet_same_as_csv(tmp_path, lfmc_csv):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(lfmc_csv, newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = rows[0], rows[1:]
    columns = {h: [r[j] for r in body] for j, h in enumerate(header)}
    table = {h: (v if h in ("", "site", "date") else [float(x) for x in v]) for h, v in columns.items()}
    pq.write_table(pa.table(table), tmp_path / "t.parquet")
    a = open_archive(import_lfmc(tmp_path / "t.parquet", tmp_path / "p.zarr"))
    b = open_archive(import_lfmc(lfmc_csv, tmp_path / "c.zarr"))
    for m in a.modalities:
        np.testing.assert_allclose(a.array(m)[:], b.array(m)[:])
    np.testing.assert_array_equal(a.ids, b.ids)


def test_lfmc_parquet_without_pyarrow_says_so(tmp_path, monkeypatch):
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails as if pyarrow were absent
    with pytest.raises(ArchiveError, match=r"t\.parquet: reading Parquet needs pyarrow \(pip install pyarrow\), or save the table as CSV"):
        import_lfmc(tmp_path / "t.parquet", tmp_path / "q.zarr")


# ----------------------------------------------------------------------------------------- CropHarvest
def write_cropharvest(root: Path, n: int = 30, seed: int = 0) -> Path:
    """labels.geojson + features/arrays/<index>_<dataset>.h5 (key 'array', [12, 18]); the stored NDVI is
    the pipeline's (B7-B3)/(B7+B3). One test label, one label without an array."""
    rng = np.random.default_rng(seed)
    arrays = root / "features" / "arrays"
    arrays.mkdir(parents=True)
    features = []
    crops = ["maize", "wheat", "rice"]
    for i in range(n + 2):
        props = {
            "index": i,
            "dataset": "togo" if i % 2 else "kenya-non-crop",
            "is_crop": i % 3 != 0,
            "lat": 5.0 + i,
            "lon": 1.0 - i,
            "is_test": i == n,
            "classification_label": crops[i % 3] if i % 4 else None,
            "export_end_date": "2020-02-01T00:00:00",
        }
        features.append(
            {"type": "Feature", "properties": props, "geometry": {"type": "Point", "coordinates": [props["lon"], props["lat"]]}}
        )
        if i <= n - 1:
            x = rng.uniform(100, 3000, size=(12, 18))
            x[:, :2] = rng.normal(-12, 3, size=(12, 2))
            x[:, BANDS.index("elevation")] = 100 + i
            x[:, BANDS.index("slope")] = 2 + i / 10
            b7, b3 = x[:, BANDS.index("B7")], x[:, BANDS.index("B3")]
            x[:, BANDS.index("NDVI")] = (b7 - b3) / (b7 + b3)
            with h5py.File(arrays / f"{i}_{props['dataset']}.h5", "w") as h5:
                h5.create_dataset("array", data=x)
                h5.attrs["instance_lat"] = props["lat"]
    (root / "labels.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return root


def test_cropharvest_binary(tmp_path, capsys):
    src = write_cropharvest(tmp_path / "ch")
    a = open_archive(import_cropharvest(src, tmp_path / "ch.zarr"))
    assert "30 samples; skipped 1 (test), 1 (no array)" in capsys.readouterr().err
    n = 30
    assert a.task == "binary" and a.class_names == ("non_crop", "crop")
    assert {m: a.array(m).shape for m in a.modalities} == {"s1": (n, 12, 2), "s2": (n, 12, 12), "era5": (n, 12, 2), "srtm": (n, 2)}
    assert a.modalities["s2"].bands[-1] == "NDVI" and a.modalities["srtm"].kind == "static"
    with h5py.File(src / "features" / "arrays" / "4_kenya-non-crop.h5") as h5:
        raw = h5["array"][()]
    row = list(a.ids).index("4_kenya-non-crop")
    b8, b4 = raw[:, BANDS.index("B8")], raw[:, BANDS.index("B4")]
    np.testing.assert_allclose(a.array("s2")[row, :, -1], (b8 - b4) / (b8 + b4), rtol=1e-5)  # recomputed, not stored
    np.testing.assert_allclose(a.array("s1")[row], raw[:, :2], rtol=1e-6)
    np.testing.assert_allclose(a.array("srtm")[row], [104, 2.4], rtol=1e-6)
    np.testing.assert_array_equal(a.target[:], [int(i % 3 != 0) for i in range(n)])
    np.testing.assert_allclose(a.latlon[row], [9.0, -3.0])
    # 12 steps of 30 days ending 2020-02-01: from 2019-02-06 (February) to January
    np.testing.assert_array_equal(a.month[row], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 1])
    assert a.split_counts() == {"train": 27, "val": 0, "test": 3}


def test_cropharvest_crop_type(tmp_path):
    src = write_cropharvest(tmp_path / "ch")
    a = open_archive(import_cropharvest(src, tmp_path / "ct.zarr", task="multiclass"))
    assert a.task == "multiclass" and a.class_names == ("maize", "rice", "wheat")
    kept = [i for i in range(30) if i % 4]
    assert list(a.ids) == [f"{i}_{'togo' if i % 2 else 'kenya-non-crop'}" for i in kept]
    np.testing.assert_array_equal(a.target[:], [("maize", "rice", "wheat").index(["maize", "wheat", "rice"][i % 3]) for i in kept])


def test_cropharvest_bad_array_names_file_key_and_shape(tmp_path):
    src = write_cropharvest(tmp_path / "ch", n=6)
    bad = src / "features" / "arrays" / "3_togo.h5"
    with h5py.File(bad, "w") as h5:
        h5.create_dataset("array", data=np.zeros((12, 17)))
    with pytest.raises(ArchiveError, match=r"3_togo\.h5: key 'array' has shape \[12, 17\], expected \[12, 18\]"):
        import_cropharvest(src, tmp_path / "a.zarr")
    with h5py.File(bad, "w") as h5:
        h5.create_dataset("x", data=np.zeros((12, 18)))
    with pytest.raises(ArchiveError, match=r"3_togo\.h5: key 'array' is missing \(found \['x'\]\); expected shape \[12, 18\]"):
        import_cropharvest(src, tmp_path / "b.zarr")
    (src / "labels.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [{"properties": {"index": 0}}]}))
    with pytest.raises(ArchiveError, match=r"labels\.geojson: feature 0: property 'dataset' is missing"):
        import_cropharvest(src, tmp_path / "c.zarr")


# -------------------------------------------------------------------------------------------- TreeSatAI
def write_treesatai(root: Path, n: int = 12, size: int = 8, seed: int = 0) -> Path:
    """aerial/<name>.tif [H, W, 4], sentinel-ts/<name>_<year>.h5 ([T, C, 6, 6], T varies), labels JSON, lists."""
    import tifffile

    rng = np.random.default_rng(seed)
    (root / "aerial" / "60m").mkdir(parents=True)
    (root / "sentinel-ts").mkdir()
    (root / "labels").mkdir()
    (root / "split").mkdir()
    labels, names = {}, []
    for i in range(n):
        name = f"{GENERA[i % 15]}_x_{i}_{1000 + i}_WEFL_NLF"
        names.append(name)
        patch = (rng.uniform(0, 255, size=(size, size, 4))).astype(np.uint8)
        patch[..., 3] = 200  # NIR constant: shows the channel axis survived the transpose
        tifffile.imwrite(root / "aerial" / "60m" / f"{name}.tif", patch)
        t1, t2, t3 = 3 + i % 4, 5 + i % 3, 2 + i % 5
        with h5py.File(root / "sentinel-ts" / f"{name}_2020.h5", "w") as h5:
            h5["sen-1-asc-data"] = np.full((t1, 2, 6, 6), -10.0 - i, dtype=np.float32)
            h5["sen-1-des-data"] = rng.normal(-12, 2, size=(t2, 2, 6, 6)).astype(np.float32)
            s2 = rng.uniform(0, 3000, size=(t3, 10, 6, 6)).astype(np.float32)
            s2[0, 0, 0, 0] = np.nan  # a missing pixel: the pixel mean ignores it
            h5["sen-2-data"] = s2
            h5["sen-2-masks"] = np.full((t3, 2, 6, 6), 7, dtype=np.uint8)
            h5["sen-2-products"] = np.array([b"S2A_MSIL2A_20200101"] * t3)
        pairs = [[GENERA[i % 15], 0.9], [GENERA[(i + 1) % 15], 0.05]]
        if i == n - 1:
            pairs = [[GENERA[0], 0.05]]  # nothing above 0.07: dropped
        labels[f"{name}.tif"] = pairs
    (root / "labels" / "TreeSatBA_v9_60m_multi_labels.json").write_text(json.dumps(labels))
    lists = {"train": names[:8], "val": names[8:10], "test": names[10:]}
    for split, part in lists.items():
        (root / "split" / f"{split}_filenames.lst").write_text("".join(f"{p}.tif\n" for p in part))
    return root


def test_treesatai_layout_padding_and_aerial(tmp_path, capsys):
    src = write_treesatai(tmp_path / "ts")
    a = open_archive(import_treesatai(src, tmp_path / "ts.zarr"))
    assert "dropped 1 without a genus above 0.07" in capsys.readouterr().err
    n = 11
    assert a.task == "multilabel" and a.class_names == GENERA
    assert {m: (a.modalities[m].kind, a.array(m).shape) for m in a.modalities} == {
        "s1_asc": ("series", (n, 6, 2)),
        "s1_des": ("series", (n, 7, 2)),
        "s2": ("series", (n, 6, 12)),
        "aerial": ("image", (n, 4, 8, 8)),
    }
    assert a.modalities["s2"].bands[-2:] == ("snow_prob", "cloud_prob")
    assert a.split_counts() == {"train": 8, "val": 2, "test": 1}
    s1 = a.array("s1_asc")[:]
    # sample 1 has 4 steps: 2 NaN steps in front, then its values (front padding, last step = last date)
    assert np.isnan(s1[1, :2]).all() and np.allclose(s1[1, 2:], -11.0)
    assert not np.isnan(s1[:, -1]).any()
    assert np.allclose(a.array("s2")[:, -1, 10:], 7)
    aerial = a.array("aerial")[:]
    assert np.allclose(aerial[:, 3], 200) and aerial[:, :3].std() > 10
    target = a.target[:]
    assert target[0, 0] == 1 and target[0].sum() == 1  # 0.05 of the second genus is below the threshold
    pooled = open_archive(import_treesatai(src, tmp_path / "p.zarr", aerial_pool=2))
    assert pooled.array("aerial").shape == (n, 4, 4, 4)
    np.testing.assert_allclose(pooled.array("aerial")[0, 0, 0, 0], aerial[0, 0, :2, :2].mean(), rtol=1e-6)


def test_treesatai_large_aerial_goes_through_a_temporary_memmap(tmp_path, monkeypatch):
    import colearn_dist.importers.treesatai as ts

    src = write_treesatai(tmp_path / "ts", n=5)
    in_memory = open_archive(import_treesatai(src, tmp_path / "m.zarr")).array("aerial")[:]
    monkeypatch.setattr(ts, "_IN_MEMORY_BYTES", 0)
    out = tmp_path / "out" / "d.zarr"
    np.testing.assert_array_equal(open_archive(import_treesatai(src, out)).array("aerial")[:], in_memory)
    assert sorted(p.name for p in out.parent.iterdir()) == ["d.zarr"]  # the temporary file is gone


def test_treesatai_errors_name_file_key_and_shape(tmp_path):
    src = write_treesatai(tmp_path / "ts", n=4)
    name = (src / "split" / "train_filenames.lst").read_text().split()[0][:-4]
    with h5py.File(src / "sentinel-ts" / f"{name}_2020.h5", "a") as h5:
        del h5["sen-2-data"]
        h5["sen-2-data"] = np.zeros((3, 9, 6, 6), dtype=np.float32)
    with pytest.raises(ArchiveError, match=rf"{name}_2020\.h5: key 'sen-2-data' has shape \[3, 9, 6, 6\].*expected \[T, 10, H, W\]"):
        import_treesatai(src, tmp_path / "a.zarr")
    (src / "aerial" / "60m" / f"{name}.tif").unlink()
    with pytest.raises(ArchiveError, match=rf"no aerial patch '{name}\.tif' \(listed in .*train_filenames\.lst\)"):
        import_treesatai(src, tmp_path / "b.zarr")
    (src / "split" / "train_filenames.lst").unlink()
    with pytest.raises(ArchiveError, match=r"train_filenames\.lst: missing"):
        import_treesatai(src, tmp_path / "c.zarr")


# ------------------------------------------------------------------------------------------ MDiCo netCDF
def write_netcdf(
    path: Path,
    views: dict[str, np.ndarray],
    target: np.ndarray,
    *,
    ids: list[str],
    train_mask: np.ndarray | None,
    target_names: list[str] | str,
    attr: str = "view_names",
) -> Path:
    """The layout xarray + h5netcdf write for the reference code's Dataset: an `identifier` dimension
    scale with the ids, one variable per view with dimensions identifier, <view>-D1, …, `target`
    (identifier, dim_target), `train_mask` (bool as int8), global attributes view_names, target_names."""
    str_dt = h5py.string_dtype()
    with h5py.File(path, "w") as h5:
        ident = h5.create_dataset("identifier", data=np.array(ids, dtype=object), dtype=str_dt)
        ident.make_scale("identifier")

        def dims(ds, names):
            for axis, name in enumerate(names):
                if axis == 0:
                    ds.dims[0].attach_scale(ident)
                    continue
                if name not in h5:
                    scale = h5.create_dataset(name, data=np.arange(ds.shape[axis]), dtype="i8")
                    scale.attrs["NAME"] = np.bytes_(f"This is a netCDF dimension but not a netCDF variable. {ds.shape[axis]}")
                    scale.make_scale(name)
                ds.dims[axis].attach_scale(h5[name])

        for name, arr in views.items():
            ds = h5.create_dataset(name, data=arr)
            if arr.dtype.kind == "f":
                ds.attrs["_FillValue"] = np.array(np.nan, dtype=arr.dtype)
            dims(ds, ["identifier"] + [f"{name}-D{i + 1}" for i in range(arr.ndim - 1)])
        ds = h5.create_dataset("target", data=target)
        dims(ds, ["identifier", "dim_target"][: target.ndim])
        if train_mask is not None:
            ds = h5.create_dataset("train_mask", data=train_mask.astype(np.int8))
            ds.attrs["dtype"] = "bool"
            dims(ds, ["identifier"])
        h5.attrs.create(attr, np.array(list(views), dtype=object), dtype=str_dt)
        if isinstance(target_names, str):
            h5.attrs["target_names"] = target_names
        else:
            h5.attrs.create("target_names", np.array(target_names, dtype=object), dtype=str_dt)
    return path


def crop_views(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "S2": rng.normal(size=(n, 12, 11)).astype(np.float32),
        "S1": rng.normal(size=(n, 12, 2)).astype(np.float32),
        "weather": rng.normal(size=(n, 12, 2)).astype(np.float32),
        "DEM": rng.normal(size=(n, 2)).astype(np.float32),
        "S2VI": rng.normal(size=(n, 12, 1)).astype(np.float32),
        "S1Ind": rng.normal(size=(n, 12)).astype(np.float32),
        "coords": np.stack([np.linspace(1, 2, n), np.linspace(5, 6, n)], axis=1).astype(np.float32),
        "year": np.full((n, 1), 2020, dtype=np.int16),
    }


def test_mdico_netcdf_views_splits_and_concatenation(tmp_path, capsys):
    classes = ["maize", "rice", "wheat"]
    tr, te = crop_views(20, 0), crop_views(6, 1)
    mask = np.arange(20) % 5 != 0
    write_netcdf(
        tmp_path / "crop_multi_train.nc",
        tr,
        (np.arange(20) % 3).astype(np.int8),
        ids=[f"s{i}" for i in range(20)],
        train_mask=mask,
        target_names=classes,
    )
    write_netcdf(
        tmp_path / "crop_multi_test.nc",
        te,
        (np.arange(6) % 3).astype(np.int8),
        ids=[f"t{i}" for i in range(6)],
        train_mask=None,
        target_names=classes,
        attr="modality_names",
    )
    path = import_mdico_netcdf(tmp_path / "crop_multi_train.nc", tmp_path / "nc.zarr", modalities=["S1", "S2_S2VI", "DEM"])
    assert "crop_multi_test.nc (test)" in capsys.readouterr().err
    a = open_archive(path)
    assert a.task == "multiclass" and a.class_names == tuple(classes)
    assert {m: (a.modalities[m].kind, a.array(m).shape) for m in a.modalities} == {
        "S1": ("series", (26, 12, 2)),
        "S2_S2VI": ("series", (26, 12, 12)),
        "DEM": ("static", (26, 2)),
    }
    np.testing.assert_allclose(a.array("S2_S2VI")[3, :, 11], tr["S2VI"][3, :, 0])
    np.testing.assert_allclose(a.array("S2_S2VI")[21, :, :11], te["S2"][1])
    assert a.ids[0] == "s0" and a.ids[20] == "t0"
    np.testing.assert_array_equal(a.split[:20], np.where(mask, 0, 2))
    assert (a.split[20:] == SPLIT_CODES["test"]).all()
    np.testing.assert_allclose(a.latlon[0], [5, 1])  # the reference stores (lon, lat)
    # kinds override: S1Ind [N, 12] read as a series [N, 12, 1]; nothing held out → one of 10 folds
    only = tmp_path / "lfmc.nc"
    write_netcdf(
        only,
        {"S1Ind": tr["S1Ind"], "DEM": tr["DEM"]},
        np.linspace(50, 150, 20).astype(np.float32)[:, None],
        ids=[f"s{i}" for i in range(20)],
        train_mask=np.ones(20, bool),
        target_names="lfmc",
    )
    b = open_archive(import_mdico_netcdf(only, tmp_path / "l.zarr", kinds={"S1Ind": "series"}))
    assert b.task == "regression" and b.target_name == "lfmc" and b.array("S1Ind").shape == (20, 12, 1)
    assert b.split_counts() == {"train": 18, "val": 0, "test": 2}


def test_mdico_netcdf_image_view_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    views = {"S2": rng.normal(size=(8, 5, 10)).astype(np.float32), "aerial": rng.uniform(size=(8, 6, 6, 4)).astype(np.float32)}
    y = rng.integers(0, 2, size=(8, 15)).astype(np.uint8)
    y[:, 0] = 1
    write_netcdf(
        tmp_path / "tree_train.nc", views, y, ids=[f"p{i}" for i in range(8)], train_mask=np.arange(8) < 6, target_names=list(GENERA)
    )
    a = open_archive(import_mdico_netcdf(tmp_path / "tree_train.nc", tmp_path / "t.zarr", heldout="val"))
    assert a.task == "multilabel" and a.modalities["aerial"].kind == "image"
    np.testing.assert_allclose(a.array("aerial")[2], np.moveaxis(views["aerial"][2], -1, 0))  # channels first
    assert a.split_counts() == {"train": 6, "val": 2, "test": 0}
    # a view with the wrong sample count, and a file without view_names
    with h5py.File(tmp_path / "tree_train.nc", "a") as h5:
        del h5["S2"]
        h5["S2"] = np.zeros((7, 5, 10), dtype=np.float32)
    with pytest.raises(ArchiveError, match=r"tree_train\.nc: variable 'S2' has shape \[7, 5, 10\], expected \[8, \.\.\.\]"):
        import_mdico_netcdf(tmp_path / "tree_train.nc", tmp_path / "u.zarr")
    with h5py.File(tmp_path / "tree_train.nc", "a") as h5:
        del h5.attrs["view_names"]
    with pytest.raises(ArchiveError, match=r"tree_train\.nc: global attribute 'view_names'.* is missing"):
        import_mdico_netcdf(tmp_path / "tree_train.nc", tmp_path / "v.zarr")
    (tmp_path / "junk.nc").write_bytes(b"CDF\x01 classic netCDF3")
    with pytest.raises(ArchiveError, match=r"junk\.nc: cannot read as HDF5"):
        import_mdico_netcdf(tmp_path / "junk.nc", tmp_path / "w.zarr")


# ------------------------------------------------------------------------------ image modality end to end
def image_archive(path: Path, n: int = 48) -> Path:
    rng = np.random.default_rng(0)
    img = rng.normal(loc=[10.0, -5.0, 0.0], scale=[2.0, 1.0, 0.5], size=(n, 8, 8, 3)).transpose(0, 3, 1, 2).astype(np.float32)
    img[0, 1] = np.nan  # one sample without channel 1
    s2 = rng.normal(size=(n, 5, 4)).astype(np.float32)
    target = (img[:, 0].mean(axis=(1, 2)) > 10).astype(np.int64)
    return write_archive(
        path,
        {
            "s2": (s2, ModalitySpec("s2", "series", ("a", "b", "c", "d"))),
            "aerial": (img, ModalitySpec("aerial", "image", ("R", "G", "NIR"))),
        },
        target=target,
        task="binary",
        split=np.where(np.arange(n) < 40, 0, 2),
        ids=np.array([f"i{k}" for k in range(n)]),
        chunk_size=16,
    )


def test_image_archive_validation(tmp_path):
    path = image_archive(tmp_path / "img.zarr")
    a = open_archive(path)
    assert a.modalities["aerial"].kind == "image" and a.array("aerial").shape == (48, 3, 8, 8)
    with pytest.raises(ArchiveError, match=r"'modalities/aerial/aerial' \(image\) has shape .*expected \[N, C, H, W\]"):
        write_archive(
            tmp_path / "b.zarr",
            {"aerial": (np.zeros((4, 8, 8), np.float32), ModalitySpec("aerial", "image", ("R",) * 8))},
            target=np.zeros(4, np.int64),
            task="binary",
            split=np.zeros(4),
            ids=np.arange(4),
        )
    with pytest.raises(ArchiveError, match=r"'modalities/aerial/aerial' has 3 bands but attribute 'bands' names 8"):
        write_archive(
            tmp_path / "c.zarr",
            {"aerial": (np.zeros((4, 3, 8, 8), np.float32), ModalitySpec("aerial", "image", ("R",) * 8))},
            target=np.zeros(4, np.int64),
            task="binary",
            split=np.zeros(4),
            ids=np.arange(4),
        )
    bad = np.ones((4, 2, 8, 8), np.float32)
    bad[:, 1] = np.nan
    with pytest.raises(ArchiveError, match=r"all-NaN band\(s\) \['G'\]"):
        write_archive(
            tmp_path / "d.zarr",
            {"aerial": (bad, ModalitySpec("aerial", "image", ("R", "G")))},
            target=np.zeros(4, np.int64),
            task="binary",
            split=np.zeros(4),
            ids=np.arange(4),
        )


def test_image_shards_loader_and_mdico_forward(tmp_path):
    from colearn_dist.loader import ShardLoader
    from colearn_dist.model import MDiCo
    from colearn_dist.objective import MDiCoObjective, TaskSpec
    from colearn_dist.shards import verify_shards, write_shards

    archive = image_archive(tmp_path / "img.zarr")
    manifest = write_shards(archive, tmp_path / "shards", samples_per_shard=16, workers=1, val_fraction=0.0, progress=False)
    assert verify_shards(tmp_path / "shards") == []
    assert manifest.modalities["aerial"]["shape"] == [3, 8, 8]
    raw = open_archive(archive).array("aerial")[:40]
    stats = manifest.stats["aerial"]
    flat = np.moveaxis(raw, 1, -1).reshape(-1, 3)
    np.testing.assert_allclose(stats["mean"], np.nanmean(flat, axis=0), rtol=1e-4)  # per channel over H×W
    np.testing.assert_allclose(stats["std"], np.nanstd(flat, axis=0), rtol=1e-3)

    loader = ShardLoader(tmp_path / "shards", "train", batch_size=8, shuffle=False)
    batch = next(iter(loader))
    x, valid = batch["inputs"]["aerial"], batch["valid"]["aerial"]
    assert x.shape == (8, 3, 8, 8) and x.dtype == torch.float32 and valid.shape == x.shape
    rows = batch["index"].numpy()
    back = loader.denormalise("aerial", x, valid)
    np.testing.assert_allclose(back, raw[rows], rtol=1e-4, atol=1e-4, equal_nan=True)
    assert batch["present"]["aerial"].all()
    if 0 in rows:
        k = list(rows).index(0)
        assert not valid[k, 1].any() and (x[k, 1] == 0).all()

    inputs = modality_inputs(manifest.modalities)
    assert inputs["aerial"] == Modality("aerial", "image", None, 3, height=8, width=8, bands=("R", "G", "NIR"))
    cfg = ModelConfig(
        embedding_dim=16,
        encoders={"default": EncoderConfig(hidden=8, depth=1), "aerial": EncoderConfig(type="cnn", hidden=8, depth=2)},
    )
    model = MDiCo(inputs, cfg, 2)
    assert isinstance(model.encoders["unique"]["aerial"], ImageCNN)
    out = model(batch["inputs"])
    assert out["pred"]["aerial"].shape == (8, 2) and out["z_sha"]["aerial"].shape == (8, 8)
    loss, _ = MDiCoObjective(ObjectiveConfig(), TaskSpec.from_manifest(manifest), list(inputs))(out, batch)
    loss.backward()
    assert model.encoders["common"]["aerial"].stem[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model.predict({"aerial": batch["inputs"]["aerial"]}, modalities=["aerial"]).shape == (8, 2)


def test_build_encoder_for_images():
    inp = Modality("aerial", "image", None, 4, height=304, width=304)
    enc = build_encoder(EncoderConfig(type="tempcnn", hidden=8, depth=3), inp, 16)  # a temporal default still gets the CNN
    assert isinstance(enc, ImageCNN)
    assert enc(torch.randn(2, 4, 32, 32)).shape == (2, 16)
    with pytest.raises(ValueError, match="'cnn' is for image modalities"):
        build_encoder(EncoderConfig(type="cnn"), Modality("s2", "series", 5, 4), 16)
    with pytest.raises(ValueError, match=r"\(image\): manifest shape \[4, 8\] is not \[C, H, W\]"):
        modality_inputs({"aerial": {"kind": "image", "shape": [4, 8]}})


# ------------------------------------------------------------------------------------------- CLI, configs
def test_cli_import_lfmc_and_treesatai(tmp_path, lfmc_csv, capsys):
    assert cli_main(["import", "lfmc", str(lfmc_csv), str(tmp_path / "l.zarr"), "--fold", "3", "--seed", "1"]) == 0
    assert "60 samples, task regression" in capsys.readouterr().out
    src = write_treesatai(tmp_path / "ts", n=6)
    assert cli_main(["import", "treesatai", str(src), str(tmp_path / "t.zarr"), "--aerial-pool", "2"]) == 0
    assert "aerial   image" in capsys.readouterr().out
    assert cli_main(["import", "cropharvest", str(tmp_path / "nowhere"), str(tmp_path / "c.zarr")]) == 2
    assert "not a CropHarvest folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, modalities, batch",
    [
        ("cropharvest", ["s1", "s2"], 128),
        ("cropharvest_crop_type", ["s1", "s2"], 128),
        ("lfmc", ["s1", "optical"], 32),
        ("treesatai", ["s2", "aerial"], 128),
        ("mdico_netcdf", ["S1_S1Ind", "S2_S2Ind"], 32),
    ],
)
def test_benchmark_configs_have_the_paper_settings(name, modalities, batch):
    cfg = load_config(REPO / "colearn_dist" / "configs" / f"{name}.yaml")
    assert cfg.data.modalities == modalities and cfg.data.batch_size == batch
    assert cfg.model.method == "mdico" and cfg.model.embedding_dim == 128
    assert cfg.model.encoders["default"].type == "tempcnn"
    assert cfg.train.lr == 1e-3 and cfg.train.patience == 5
    o = cfg.objective
    assert (o.main, o.aux, o.con, o.mod, o.temperature) == (1.0, 1.0, 1.0, 1.0, 0.1)
    if "aerial" in modalities:
        assert cfg.model.encoder_for("aerial").type == "cnn"
