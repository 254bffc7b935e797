"""Per-sensor deployment: the exported TorchScript file alone reproduces the framework's predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import make_synthetic_archive, train_run


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    archive = make_synthetic_archive(root / "a.zarr", n=240, t=4, groups=12)
    return train_run(root, archive, train={"epochs": 2}), archive


@pytest.fixture(scope="module")
def single_run(trained_run):
    """The single-sensor baseline on the same shards."""
    run, archive = trained_run
    return train_run(run.parent, archive, name="single", model={"method": "single", "modality": "s1"}, train={"epochs": 1}), archive


@pytest.fixture(scope="module")
def multiclass_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-multiclass")
    archive = make_synthetic_archive(root / "a.zarr", n=200, t=4, groups=10, task="multiclass", num_classes=3)
    return train_run(root, archive, train={"epochs": 1}), archive


def _check_exported(run, archive, modality, out):
    """The exported file on the raw archive gives the framework's predictions (target units:
    probabilities [B, K] for classification) on the shards."""
    from colearn_dist.archive import open_archive
    from colearn_dist.export import export_sensor, load_exported, predict_archive
    from colearn_dist.loader import ShardLoader
    from colearn_dist.runs import load_trained
    from colearn_dist.scoring import predict_loader

    path = export_sensor(run, modality, out)
    module, meta = load_exported(path)
    trained = load_trained(run, modality)
    assert meta["modality"] == modality and meta["task"] == trained.manifest.task
    assert meta["method"] == trained.cfg.model.method

    loader = ShardLoader(trained.cfg.data.shards, "test", batch_size=64, shuffle=False)
    expected = predict_loader(trained.model, loader, trained.spec, [[modality]], gather=False)[modality]
    ids, got = predict_archive(path, archive, split="test")
    # The exported model reads the raw archive (NaNs included) and normalises inside.
    order = np.argsort(expected["index"])
    rows = open_archive(archive).split_indices("test")
    assert np.array_equal(np.sort(expected["index"]), rows)
    np.testing.assert_allclose(got, expected["pred"][order].reshape(got.shape), rtol=1e-5, atol=1e-4)
    assert len(ids) == len(rows)
    return path, got


@pytest.mark.parametrize("modality", ["s1", "srtm", "dw"])
def test_exported_model_matches_in_framework_predictions(trained_run, modality, tmp_path):
    _, got = _check_exported(*trained_run, modality, tmp_path / f"{modality}.pt")
    assert got.ndim == 1


def test_exported_multiclass_model_gives_class_probabilities(multiclass_run, tmp_path):
    _, got = _check_exported(*multiclass_run, "s2", tmp_path / "s2.pt")
    assert got.ndim == 2 and got.shape[1] == 3
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_exported_single_sensor_baseline(single_run, tmp_path):
    _check_exported(*single_run, "s1", tmp_path / "s1.pt")


def test_predict_on_shards_equals_predict_on_the_archive(trained_run, tmp_path):
    from colearn_dist.export import export_sensor, predict, predict_archive

    run, archive = trained_run
    shards = run.parent / "shards"
    for modality in ("s2", "dw"):  # a float series with NaNs, and a categorical layer
        path = export_sensor(run, modality, tmp_path / f"{modality}.pt")
        ids, got = predict(path, shards, split="test")
        ref_ids, ref = predict_archive(path, archive, split="test")
        assert sorted(ids) == sorted(ref_ids) and len(set(ids)) == len(ids)
        by_id = dict(zip(ref_ids, ref))
        np.testing.assert_allclose(got, [by_id[i] for i in ids], rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match=r"split.*\['test', 'train', 'val'\]"):
        predict(path, shards)


def test_cli_predict_on_shards_writes_class_columns(multiclass_run, tmp_path):
    import csv

    from colearn_dist.cli import main
    from colearn_dist.export import export_sensor, predict

    run, _ = multiclass_run
    path = export_sensor(run, "s1", tmp_path / "s1.pt")
    out = tmp_path / "pred.csv"
    assert main(["predict", str(path), str(run.parent / "shards"), "--split", "test", "--out", str(out)]) == 0
    rows = list(csv.reader(open(out)))
    assert rows[0] == ["id", "class0", "class1", "class2"]
    ids, preds = predict(path, run.parent / "shards", split="test")
    assert [r[0] for r in rows[1:]] == list(ids)
    np.testing.assert_allclose(np.array([r[1:] for r in rows[1:]], dtype=float), preds, rtol=1e-5, atol=1e-6)
    assert main(["predict", str(path), str(run.parent / "shards"), "--out", str(out)]) == 2  # --split is required


def test_export_refuses_an_unknown_sensor(trained_run):
    from colearn_dist.export import export_sensor

    with pytest.raises(ValueError, match="no sensor 'radar'.*weights for \\['all', 'dw', 's1', 's2', 'srtm'\\]"):
        export_sensor(trained_run[0], "radar")


def test_exported_model_works_without_the_package_state(trained_run, tmp_path):
    """Only torch is needed to run it: load in a fresh interpreter that never imports colearn_dist."""
    import subprocess
    import sys

    from colearn_dist.export import export_sensor

    path = export_sensor(trained_run[0], "s1", tmp_path / "s1.pt")
    code = (
        "import sys, torch; sys.modules['colearn_dist'] = None\n"
        f"m = torch.jit.load({str(path)!r}); x = torch.randn(5, 4, 2); x[0, 0, 0] = float('nan')\n"
        "y = m(x, torch.randint(1, 13, (5, 4))); assert y.shape == (5,) and torch.isfinite(y).all(), y; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr
    assert torch.jit.load(str(path)) is not None
