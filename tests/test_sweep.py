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


def test_core_slots_split_the_cores_without_overlap():
    from colearn_dist.sweep import core_slots

    assert core_slots(2, cores=[0, 1, 2, 3, 4]) == [{0, 1}, {2, 3}]  # the fifth core stays idle
    assert core_slots(2, nproc=2, cores=[4, 5, 6, 7]) == [{4, 5}, {6, 7}]
    with pytest.raises(ValueError, match=r"--jobs 3 × --nproc 1 needs 3 cores; this process may use 2"):
        core_slots(3, cores=[0, 1])


def test_parallel_sweep_waits_for_the_teacher_and_pins_each_run(tiny_shards, tmp_path, capsys):
    import os

    from colearn_dist.sweep import plan_sweep, run_sweep

    from helpers import write_config

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs 2 cores")
    cfg = write_config(tmp_path / "c.yaml", tiny_shards, tmp_path / "unused", data={"modalities": ["s1", "s2"]}, train={"epochs": 1})
    runs = plan_sweep(cfg, ["distill", "fusion"], [0], root=tmp_path / "runs")
    assert run_sweep(runs, out=tmp_path / "results", jobs=2) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    teacher_done = next(i for i, line in enumerate(lines) if "fusion/seed0: finished" in line)
    students = [i for i, line in enumerate(lines) if "distill-s" in line and "started on cores" in line]
    assert len(students) == 2 and min(students) > teacher_done  # a free slot does not start a student early
    for run in runs:
        assert (run.run_dir / "metrics_test.json").exists() and (run.run_dir / "console.log").stat().st_size > 0
        # pinned to one core of its own: the run sized its torch threads from that core
        assert "1 thread(s)/rank" in (run.run_dir / "train.log").read_text()
    assert "| distill | fusion |" in out
    # finished runs are skipped the next time
    assert run_sweep(runs, out=tmp_path / "results", jobs=2) == 0
    assert "3 of 3 runs done already; 0 to train" in capsys.readouterr().out


def test_parallel_sweep_reports_a_failed_run_and_skips_its_students(tiny_shards, tmp_path, monkeypatch, capsys):
    import sys

    import colearn_dist.sweep as sweep

    from helpers import write_config

    cfg = write_config(tmp_path / "c.yaml", tiny_shards, tmp_path / "unused", data={"modalities": ["s1", "s2"]})
    runs = sweep.plan_sweep(cfg, ["distill", "fusion"], [0], root=tmp_path / "runs")
    monkeypatch.setattr(sweep, "core_slots", lambda jobs, nproc=1: [{0}, {0}])
    monkeypatch.setattr(sweep, "cli_command", lambda argv, nproc=None: [sys.executable, "-c", "import sys; print('boom'); sys.exit(2)"])
    assert sweep.run_sweep(runs, jobs=2) == 3
    err = capsys.readouterr().err
    teacher = runs[0].run_dir
    assert f"{teacher}: FAILED (exit code 2)" in err and (teacher / "console.log").read_text() == "boom\n"
    for student in runs[1:]:
        assert f"{student.run_dir}: not trained, its teacher {teacher} failed" in err
        assert not (student.run_dir / "console.log").exists()
    assert "3 run(s) failed, nothing evaluated" in err


def test_demo_passes_jobs_to_the_sweep(tmp_path, monkeypatch):
    import colearn_dist.sweep as sweep

    calls: list = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "run_sweep", lambda runs, **kw: calls.append((runs, kw)) or 0)
    assert sweep.demo(["algae_blooms"], seeds=[0], methods=["mdico"], jobs=2) == 0
    [(runs, kw)] = calls
    assert kw["jobs"] == 2 and [r.method for r in runs] == ["mdico"]
    assert (tmp_path / "shards" / "algae_blooms" / "manifest.json").exists()
