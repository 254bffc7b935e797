"""Per-sensor deployment: each exported file (.pt2, .onnx) alone reproduces the framework's predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_synthetic_archive, train_run

TASKS = ("regression", "binary", "multiclass", "multilabel")
FORMATS = ("pt2", "onnx")
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """task → (run, archive): one small MDiCo run per task kind, trained on first use."""
    cache: dict[str, tuple] = {}

    def get(task: str):
        if task not in cache:
            root = tmp_path_factory.mktemp(f"export-{task}")
            archive = make_synthetic_archive(root / "a.zarr", n=160, t=4, groups=8, task=task, num_classes=3)
            cache[task] = (train_run(root, archive, train={"epochs": 1}), archive)
        return cache[task]

    return get


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
    """(task, modality, fmt) → model path, exported once per module."""
    from colearn_dist.export import export_sensor

    cache: dict[tuple, object] = {}
    out = tmp_path_factory.mktemp("models")

    def get(task: str, modality: str, fmt: str):
        key = (task, modality, fmt)
        if key not in cache:
            cache[key] = export_sensor(runs(task)[0], modality, out / f"{task}_{modality}.{fmt}", fmt=fmt)
        return cache[key]

    return get


def _raw_batch(archive, modality: str, size: int, seed: int = 0):
    """`size` raw samples drawn from the archive (with its NaNs), plus a step and a band made missing."""
    from colearn_dist.archive import open_archive

    a = open_archive(archive)
    rows = np.random.default_rng(seed).integers(0, a.num_samples, size)
    x = np.asarray(a.array(modality).oindex[np.sort(rows)])
    month = np.asarray(a.month.oindex[np.sort(rows)]) if a.month is not None else None
    spec = a.modalities[modality]
    if spec.kind == "categorical":
        x[0, 1] = spec.missing_value
        return x.astype(np.int64), month
    if spec.kind == "series":
        x[0, 1, :] = np.nan  # a whole step missing
        if size > 1:
            x[1, :, 0] = np.nan  # a whole band missing for one sample
    else:
        x[0, 0] = np.nan
    return x.astype(np.float32), month


def _eager(run, modality: str, x: np.ndarray, month):
    """The framework's eager predictions for raw inputs: SensorModel (normalisation + model.predict)."""
    from colearn_dist.export import SensorModel
    from colearn_dist.runs import load_trained

    module = SensorModel(load_trained(run, modality), modality).eval()
    with torch.no_grad():
        return module(torch.from_numpy(x), *([torch.from_numpy(month)] if "month" in module.context else [])).numpy()


def _check_against_loader(run, archive, modality, path):
    """The exported file on the raw archive gives the framework's predictions on the shards (the
    loader's normalisation, model.predict, target units), sample for sample."""
    from colearn_dist.archive import open_archive
    from colearn_dist.export import predict_archive
    from colearn_dist.loader import ShardLoader
    from colearn_dist.runs import load_trained
    from colearn_dist.scoring import predict_loader

    trained = load_trained(run, modality)
    loader = ShardLoader(trained.cfg.data.shards, "test", batch_size=64, shuffle=False)
    expected = predict_loader(trained.model, loader, trained.spec, [[modality]], gather=False)[modality]
    ids, got = predict_archive(path, archive, split="test")
    order = np.argsort(expected["index"])
    rows = open_archive(archive).split_indices("test")
    assert np.array_equal(np.sort(expected["index"]), rows) and len(ids) == len(rows)
    np.testing.assert_allclose(got, expected["pred"][order].reshape(got.shape), **TOL)
    return got


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("task", TASKS)
def test_exported_model_matches_eager_predictions(runs, exported, task, fmt):
    """Every task kind, both formats: loader path on the test split, then raw batches of 1 and 4096
    (NaN steps and bands included) through the file and through the eager model."""
    from test_stac import validate

    from colearn_dist.export import apply, load_exported

    run, archive = runs(task)
    path = exported(task, "s1", fmt)
    got = _check_against_loader(run, archive, "s1", path)
    if task == "regression":
        assert got.ndim == 1
    else:
        assert got.shape[1] == (2 if task == "binary" else 3)
        if task != "multilabel":
            np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    model = load_exported(path)
    assert model.meta["format"] == fmt and model.meta["task"] == task and model.meta["inputs"] == ["x", "month"]
    x, month = _raw_batch(archive, "s1", 4096)
    eager = _eager(run, "s1", x, month)
    assert np.isfinite(eager).all()
    np.testing.assert_allclose(model.run(x, month), eager, **TOL)
    np.testing.assert_allclose(model.run(x[:1], month[:1]), eager[:1], **TOL)
    _, batched = apply(model, [(np.arange(4096).astype(str), x, {"month": month})])
    np.testing.assert_allclose(batched, eager, **TOL)
    validate(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("modality", ["srtm", "dw"])
def test_static_and_categorical_sensors_export(runs, exported, modality, fmt):
    """A static layer (no months) and a categorical one (integer codes, missing code embedded as zero)."""
    from colearn_dist.export import load_exported

    run, archive = runs("regression")
    path = exported("regression", modality, fmt)
    _check_against_loader(run, archive, modality, path)
    model = load_exported(path)
    assert model.meta["inputs"] == (["x", "month"] if modality == "dw" else ["x"])
    x, month = _raw_batch(archive, modality, 4096)
    month = month if "month" in model.meta["inputs"] else None
    eager = _eager(run, modality, x, month)
    context = [] if month is None else [month]
    np.testing.assert_allclose(model.run(x, *context), eager, **TOL)
    np.testing.assert_allclose(model.run(x[:1], *(c[:1] for c in context)), eager[:1], **TOL)


@pytest.mark.parametrize("fmt", FORMATS)
def test_exported_single_sensor_baseline(runs, fmt, tmp_path_factory):
    """The single-sensor baseline (a FusionModel over one sensor) exports alike."""
    from colearn_dist.export import export_sensor

    run, archive = runs("regression")
    single = run.parent / "single"
    if not (single / "best").exists():
        train_run(run.parent, archive, name="single", model={"method": "single", "modality": "s1"}, train={"epochs": 1})
    path = export_sensor(single, "s1", tmp_path_factory.mktemp("single") / f"s1.{fmt}", fmt=fmt)
    _check_against_loader(single, archive, "s1", path)


def test_missing_observations_are_handled_inside_the_model(runs, exported):
    """NaN in → the training rule (0 after normalisation): the same output as feeding the band mean."""
    from colearn_dist.export import load_exported
    from colearn_dist.runs import load_trained

    run, archive = runs("regression")
    model = load_exported(exported("regression", "s1", "onnx"))
    x, month = _raw_batch(archive, "s1", 8, seed=1)
    mean = np.asarray(load_trained(run, "s1").manifest.stats["s1"]["mean"], dtype=np.float32)
    filled = np.where(np.isnan(x), mean, x).astype(np.float32)
    np.testing.assert_allclose(model.run(x, month), model.run(filled, month), **TOL)
    assert not np.allclose(model.run(x, month)[:2], model.run(np.nan_to_num(x), month)[:2])  # NaN is not read as 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_predict_on_shards_and_on_xarray_equals_predict_on_the_archive(runs, exported, fmt):
    import xarray as xr

    from colearn_dist.export import predict, predict_archive

    run, archive = runs("regression")
    path = exported("regression", "s1", fmt)
    ref_ids, ref = predict_archive(path, archive, split="test")
    by_id = dict(zip(ref_ids, ref))
    ids, got = predict(path, run.parent / "shards", split="test")
    assert sorted(ids) == sorted(ref_ids) and len(set(ids)) == len(ids)
    np.testing.assert_allclose(got, [by_id[i] for i in ids], **TOL)
    # the archive's own modality group, opened by xarray, is a cube with dims sample / time / band
    cube = xr.open_zarr(archive, group="modalities/s1", consolidated=False)
    all_ids, all_pred = predict_archive(path, archive)
    cube_ids, cube_pred = predict(path, cube)
    assert list(cube_ids) == list(all_ids)
    np.testing.assert_allclose(cube_pred, all_pred, **TOL)
    with pytest.raises(ValueError, match=r"split.*\['test', 'train', 'val'\]"):
        predict(path, run.parent / "shards")


def test_predict_on_a_cube_with_own_dim_names_and_band_order(runs, exported, tmp_path):
    """A netCDF cube named by the user (pixel / t / channel), bands in another order, a datetime time axis."""
    import xarray as xr

    from colearn_dist.archive import open_archive
    from colearn_dist.export import predict, predict_archive

    run, archive = runs("regression")
    path = exported("regression", "s1", "pt2")
    a = open_archive(archive)
    x, month = np.asarray(a.array("s1")[:]), np.asarray(a.month[:])
    keep = np.flatnonzero((month == month[:1]).all(axis=1))  # samples sharing the first sample's months
    times = np.array([f"2020-{m:02d}-15" for m in month[0]], dtype="datetime64[ns]")
    ds = xr.Dataset(
        {"radar": (("pixel", "t", "channel"), x[keep][..., ::-1])},
        coords={"pixel": a.ids[keep], "t": times, "channel": ["VH", "VV"]},
    )
    ds.to_netcdf(tmp_path / "cube.nc")
    ids, got = predict(path, tmp_path / "cube.nc", variable="radar", sample_dim="pixel", time_dim="t", band_dim="channel")
    ref_ids, ref = predict_archive(path, archive)
    assert list(ids) == list(ref_ids[keep])
    np.testing.assert_allclose(got, ref[keep], **TOL)
    with pytest.raises(ValueError, match=r"dimension 't' is none of --sample-dim 'pixel', --time-dim 'time'"):
        predict(path, tmp_path / "cube.nc", variable="radar", sample_dim="pixel", band_dim="channel")
    ds.sel(channel=["VV"]).to_netcdf(tmp_path / "one.nc")
    with pytest.raises(ValueError, match=r"band 'VH' is missing from variable 'radar'"):
        predict(path, tmp_path / "one.nc", variable="radar", sample_dim="pixel", time_dim="t", band_dim="channel")


def test_cli_export_and_predict_write_class_columns(runs, tmp_path):
    import csv
    import json

    from colearn_dist.cli import main
    from colearn_dist.export import predict

    run, _ = runs("multiclass")
    path = tmp_path / "s2.onnx"
    assert main(["export", str(run), "--modality", "s2", "--format", "onnx", "--out", str(path)]) == 0
    item = json.loads((tmp_path / "s2.onnx.stac.json").read_text())
    assert item["properties"]["mlm:framework"] == "ONNX" and item["assets"]["model"]["href"] == "s2.onnx"
    out = tmp_path / "pred.csv"
    assert main(["predict", str(path), str(run.parent / "shards"), "--split", "test", "--out", str(out)]) == 0
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["id", "class0", "class1", "class2"]
    ids, preds = predict(path, run.parent / "shards", split="test")
    assert [r[0] for r in rows[1:]] == list(ids)
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], dtype=float), preds, rtol=1e-5, atol=1e-6)
    assert main(["predict", str(path), str(run.parent / "shards"), "--out", str(out)]) == 2  # --split is required


def test_export_refuses_an_unknown_sensor_and_format(runs, tmp_path):
    from colearn_dist.export import export_sensor, load_exported

    run = runs("regression")[0]
    with pytest.raises(ValueError, match=r"no sensor 'radar'.*weights for \['all', 'dw', 's1', 's2', 'srtm'\]"):
        export_sensor(run, "radar")
    with pytest.raises(ValueError, match=r"'all' is not a sensor of the run"):
        export_sensor(run, "all")
    with pytest.raises(ValueError, match=r"format 'torchscript' is not one of \['pt2', 'onnx'\]"):
        export_sensor(run, "s1", fmt="torchscript")
    (tmp_path / "old.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="TorchScript models are no longer supported"):
        load_exported(tmp_path / "old.pt")


def test_predict_names_missing_context(exported, tmp_path):
    """A model that takes months, on data without them: a one-line error naming the input."""
    from colearn_dist.export import predict_archive

    path = exported("regression", "s1", "pt2")
    archive = make_synthetic_archive(tmp_path / "no_months.zarr", n=40, t=4, groups=4, month=False)
    with pytest.raises(ValueError, match=r"no_months\.zarr: model .* takes \['month'\] \(the run's context\), the data has none"):
        predict_archive(path, archive)


def test_exported_models_run_without_the_package(exported):
    """Only torch (pt2) or onnxruntime (onnx) is needed: a fresh interpreter that cannot import colearn_dist."""
    import subprocess
    import sys

    pt2, onnx_path = exported("regression", "s1", "pt2"), exported("regression", "s1", "onnx")
    code = (
        "import sys; sys.modules['colearn_dist'] = None\n"
        "import numpy as np, torch, onnxruntime as ort\n"
        "x = np.random.randn(5, 4, 2).astype('float32'); x[0, 0, 0] = np.nan; m = np.random.randint(1, 13, (5, 4))\n"
        f"a = torch.export.load({str(pt2)!r}).module()(torch.from_numpy(x), torch.from_numpy(m)).numpy()\n"
        f"b = ort.InferenceSession({str(onnx_path)!r}).run(None, {{'x': x, 'month': m}})[0]\n"
        "assert a.shape == (5,) and np.isfinite(a).all() and np.allclose(a, b, rtol=1e-5, atol=1e-5), (a, b); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.fixture(scope="module")
def context_run(tmp_path_factory):
    """MDiCo with calendar and location (output join: the input join is the shipped default, tested in test_model)."""
    root = tmp_path_factory.mktemp("export-context")
    archive = make_synthetic_archive(root / "a.zarr", n=160, t=4, groups=8)
    model = {"context": ["calendar", "location"], "context_join": "output"}
    return train_run(root, archive, model=model, train={"epochs": 1}), archive


@pytest.mark.parametrize("modality", ["s1", "srtm", "dw"])
def test_exported_model_takes_the_context(context_run, modality, tmp_path):
    """With model.context [calendar, location] every sensor's file takes x, month and latlon; it
    matches the framework on the shards, and the month and the location both change its output."""
    from colearn_dist.archive import open_archive
    from colearn_dist.export import export_sensor, load_exported

    run, archive = context_run
    path = export_sensor(run, modality, tmp_path / f"{modality}.pt2", fmt="pt2")
    _check_against_loader(run, archive, modality, path)
    loaded = load_exported(path)
    assert loaded.meta["inputs"] == ["x", "month", "latlon"] and loaded.meta["context"] == "calendar + location"
    a = open_archive(archive)
    rows = a.split_indices("test")[:8]
    x = np.asarray(a.array(modality).oindex[rows])
    x = x.astype(np.int64) if a.modalities[modality].kind == "categorical" else x.astype(np.float32)
    month, latlon = np.asarray(a.month.oindex[rows]).astype(np.int64), np.asarray(a.latlon.oindex[rows]).astype(np.float32)
    base = loaded.run(x, month, latlon)
    assert not np.allclose(base, loaded.run(x, month % 12 + 1, latlon))
    assert not np.allclose(base, loaded.run(x, month, latlon + 20.0))
