"""Per-sensor deployment: the exported TorchScript file alone reproduces the framework's predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from colearn_dist.config import load_config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from conftest import make_synthetic_archive
    from test_engine import write_config

    from colearn_dist.engine import train
    from colearn_dist.shards import write_shards

    root = tmp_path_factory.mktemp("export")
    archive = make_synthetic_archive(root / "a.zarr", n=240, t=4, groups=12)
    write_shards(archive, root / "shards", samples_per_shard=40, workers=1, progress=False)
    cfg = write_config(root / "c.yaml", root / "shards", root / "run", train={"epochs": 2})
    train(load_config(cfg))
    return root / "run", archive


@pytest.mark.parametrize("modality", ["s1", "srtm", "dw"])
def test_exported_model_matches_in_framework_predictions(trained_run, modality, tmp_path):
    from colearn_dist.evaluate import load_trained, predict_loader
    from colearn_dist.export import export_sensor, load_exported, predict_archive
    from colearn_dist.loader import ShardLoader

    run, archive = trained_run
    path = export_sensor(run, modality, tmp_path / f"{modality}.pt")
    module, meta = load_exported(path)
    assert meta["modality"] == modality and meta["task"] == "regression"

    trained = load_trained(run, modality)
    loader = ShardLoader(trained.cfg.data.shards, "test", batch_size=64, shuffle=False)
    expected = predict_loader(trained.model, loader, trained.spec, [[modality]], gather=False)[modality]
    ids, got = predict_archive(path, archive, split="test")
    # The exported model reads the raw archive (NaNs included) and normalises inside.
    order = np.argsort(expected["index"])
    from colearn_dist.archive import open_archive

    rows = open_archive(archive).split_indices("test")
    assert np.array_equal(np.sort(expected["index"]), rows)
    np.testing.assert_allclose(got, expected["pred"][order].reshape(got.shape), rtol=1e-5, atol=1e-4)
    assert len(ids) == len(rows)


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
