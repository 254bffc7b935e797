"""crossval.py: fold archives (every sample tested once, groups kept whole) and a k-fold experiment
whose runs `evaluate` aggregates over folds."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from colearn_dist.archive import SPLIT_CODES, open_archive
from colearn_dist.crossval import plan_crossval, write_fold_archive

from helpers import make_synthetic_archive, write_config


def test_every_sample_is_tested_in_exactly_one_fold_and_groups_stay_whole(tmp_path):
    src = make_synthetic_archive(tmp_path / "a.zarr", n=180, groups=12, with_val=True)
    before = np.asarray(zarr.open_group(str(src), mode="r")["split"][:])
    groups = open_archive(src).group
    tested = np.zeros(180, dtype=int)
    for i in range(3):
        out = write_fold_archive(src, tmp_path / f"f{i}.zarr", 3, i, seed=0)
        archive = open_archive(out)
        split = np.asarray(archive.split[:])
        assert set(np.unique(split)) == {SPLIT_CODES["train"], SPLIT_CODES["test"]}  # val is carved later, by the sharder
        test = split == SPLIT_CODES["test"]
        tested += test
        assert not set(groups[test]) & set(groups[~test]), "a group on both sides of a fold"
        assert archive.attrs["fold"] == {"dataset": "a", "index": i, "of": 3, "by": "group", "seed": 0}
    assert (tested == 1).all()
    assert np.array_equal(np.asarray(zarr.open_group(str(src), mode="r")["split"][:]), before)  # the source is untouched


@pytest.mark.slow
def test_crossval_runs_every_fold_and_evaluate_aggregates_over_folds(tmp_path):
    from colearn_dist.cli import main
    from colearn_dist.manifest import load_manifest

    src = make_synthetic_archive(tmp_path / "syn.zarr", n=240, t=4, groups=12)
    cfg = write_config(
        tmp_path / "c.yaml", tmp_path / "unused", tmp_path / "unused-run", data={"modalities": ["s1", "s2"]}, train={"epochs": 1}
    )
    root = tmp_path / "cv"
    assert main(["crossval", str(cfg), str(src), "--root", str(root), "--folds", "2", "--methods", "mdico,single", "--seeds", "0"]) == 0
    for i in range(2):
        manifest = load_manifest(root / "data" / f"syn-fold{i}")
        assert manifest.fold == {"dataset": "syn", "index": i, "of": 2, "by": "group", "seed": 0}
        assert manifest.split_size("val") > 0  # carved out of the other folds, grouped
        assert (root / f"fold{i}" / "single-s2" / "seed0" / "metrics_test.json").exists()
    table = (root / "results" / "crossfold_test.md").read_text()
    assert "### syn — trained with s1+s2, context month to attention only, 2-fold cross-validation (test rmse)" in table
    assert "difference vs `single`" in table and "deployed epoch" in table
    rows = [r for r in (root / "results" / "crossfold_test.csv").read_text().splitlines()[1:] if ",mdico,s1,test,rmse," in r]
    assert len(rows) == 1  # one row over both folds, not one table per fold
    assert not (root / "results" / "results_test.md").exists()  # no per-seed table of mixed folds
    # the plan is idempotent: a second call reuses the fold shards and skips finished runs
    again = plan_crossval(cfg, src, root, folds=2, methods=["mdico", "single"], seeds=[0])
    assert len(again) == 2 * 3 and all(r.done for r in again)


def test_inner_folds_leave_the_test_split_out_of_every_fold_archive(tmp_path):
    src = make_synthetic_archive(tmp_path / "a.zarr", n=180, groups=12, with_val=True)
    source = open_archive(src)
    test_ids = set(np.asarray(source.ids)[np.asarray(source.split[:]) == SPLIT_CODES["test"]].tolist())
    kept_ids = set(np.asarray(source.ids).tolist()) - test_ids
    assert test_ids and kept_ids
    tested: list[str] = []
    for i in range(3):
        archive = open_archive(write_fold_archive(src, tmp_path / f"f{i}.zarr", 3, i, seed=0, inner=True))
        ids = np.asarray(archive.ids)
        assert set(ids.tolist()) == kept_ids  # the source's test samples are in no fold archive
        assert archive.attrs["fold"]["inner"] is True
        rows = {name: row for row, name in enumerate(np.asarray(source.ids).tolist())}
        back = np.array([rows[name] for name in ids.tolist()])
        assert np.array_equal(np.asarray(archive.target[:]), np.asarray(source.target[:])[back], equal_nan=True)  # rows stay aligned
        tested += ids[np.asarray(archive.split[:]) == SPLIT_CODES["test"]].tolist()
    assert sorted(tested) == sorted(kept_ids)  # every kept sample tested exactly once


def test_crossval_inner_flag_reaches_the_fold_archives(tmp_path, monkeypatch):
    import colearn_dist.cli as cli

    src = make_synthetic_archive(tmp_path / "syn.zarr", n=120, t=4, groups=12)
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "unused", tmp_path / "unused-run", data={"modalities": ["s1", "s2"]})
    planned: list = []
    monkeypatch.setattr(cli, "run_sweep", lambda runs, **_: planned.extend(runs) or 0)
    root = tmp_path / "cv"
    assert cli.main(["crossval", str(cfg), str(src), "--root", str(root), "--folds", "2", "--inner", "--methods", "single"]) == 0
    assert len(planned) == 2 * 2  # two folds × the single-sensor model of s1 and s2
    source = open_archive(src)
    kept = int((np.asarray(source.split[:]) != SPLIT_CODES["test"]).sum())
    assert open_archive(root / "data" / "syn-fold0.zarr").num_samples == kept < source.num_samples
