"""sweep.py: the baselines (fusion, sensor dropout, distillation from the fusion teacher) trained end to end."""

from __future__ import annotations

import json
import math

import pytest


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from colearn_dist.shards import write_shards

    from helpers import make_synthetic_archive

    root = tmp_path_factory.mktemp("sweep-shards")
    archive = make_synthetic_archive(root / "a.zarr", n=160, t=4, groups=8)
    write_shards(archive, root / "shards", samples_per_shard=40, workers=1, progress=False)
    return root / "shards"


def test_sweep_trains_and_scores_the_baselines(tiny_shards, tmp_path, capsys):
    from colearn_dist.sweep import plan_sweep, run_sweep

    from helpers import write_config

    cfg = write_config(tmp_path / "c.yaml", tiny_shards, tmp_path / "unused", data={"modalities": ["s1", "s2"]}, train={"epochs": 1})
    runs = plan_sweep(cfg, ["distill", "dropout", "fusion"], [0], root=tmp_path / "runs")
    # the teacher first; one student per sensor, each wired to the fusion run of its seed
    assert [(r.method, r.modality) for r in runs] == [("fusion", None), ("dropout", None), ("distill", "s1"), ("distill", "s2")]
    assert all(f"model.teacher={tmp_path / 'runs' / 'fusion' / 'seed0'}" in r.overrides for r in runs if r.method == "distill")

    assert run_sweep(runs, out=tmp_path / "results") == 0
    expected = {"fusion": {"s1", "s2", "all"}, "dropout": {"s1", "s2", "all"}}
    for run in runs:
        records = json.loads((run.run_dir / "metrics_test.json").read_text())
        assert {r["sensors"] for r in records} == expected.get(run.method, {run.modality}), run.run_dir
        for r in records:
            assert r["method"] == run.method and r["split"] == "test"
            assert math.isfinite(r["metrics"]["rmse"]) and r["metrics"]["rmse"] > 0
    table = capsys.readouterr().out
    assert "| dropout | distill | fusion |" in table  # the methods are the columns; rows s1, s2, all
    assert "| s1 |" in table and "| all |" in table
    assert (tmp_path / "results" / "results_test.csv").exists()
