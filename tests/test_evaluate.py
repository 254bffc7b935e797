"""evaluate.py: scoring a trained run with its sensor sets and with any subset of its sensors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def mdico_run(tmp_path_factory):
    from helpers import make_synthetic_archive, train_run

    root = tmp_path_factory.mktemp("evaluate")
    archive = make_synthetic_archive(root / "a.zarr", n=200, t=4, groups=10)
    return train_run(root, archive, train={"epochs": 1})


def test_a_sensor_subset_is_scored_with_the_weights_of_all(mdico_run):
    from colearn_dist.loader import ShardLoader
    from colearn_dist.metrics import compute_metrics
    from colearn_dist.runs import load_trained
    from colearn_dist.scoring import evaluate_run

    records = evaluate_run(mdico_run, extra_sets=["s2+s1"], embeddings=False)
    by_set = {r["sensors"]: r for r in records}
    assert list(by_set) == ["s1", "s2", "srtm", "dw", "all", "s1+s2"]
    assert by_set["s1+s2"]["weights"] == "all" and by_set["s1"]["weights"] == "s1"

    # MDiCo with s1 and s2 present: the mean of their heads, with the weights chosen for "all".
    trained = load_trained(mdico_run, "all")
    loader = ShardLoader(trained.cfg.data.shards, "test", batch_size=64, shuffle=False)
    pred, target = [], []
    with torch.no_grad():
        for batch in loader:
            out = trained.model.predict(batch["inputs"], batch.get("month"), modalities=["s1", "s2"])
            pred.append(trained.spec.to_target_units(out).numpy())
            target.append(batch["target"].numpy())
    expected = compute_metrics("regression", np.concatenate(target), np.concatenate(pred), [])
    assert by_set["s1+s2"]["metrics"] == pytest.approx(expected, rel=1e-5, nan_ok=True)
    assert by_set["s1+s2"]["metrics"]["rmse"] != pytest.approx(by_set["all"]["metrics"]["rmse"], rel=1e-6)


def test_an_unknown_sensor_in_a_subset_is_an_error(mdico_run):
    from colearn_dist.scoring import evaluate_run

    with pytest.raises(ValueError, match=r"'s1\+radar'.*\['radar'\].*\['s1', 's2', 'srtm', 'dw'\]"):
        evaluate_run(mdico_run, extra_sets=["s1+radar"], embeddings=False)


def test_single_sensor_runs_skip_the_subsets(mdico_run):
    from colearn_dist.runs import RunDir
    from colearn_dist.scoring import run_sensor_sets

    cfg = RunDir(mdico_run).config()
    assert list(run_sensor_sets(cfg, ["s1+s2", "all", "dw+s2+s1"])) == ["s1", "s2", "srtm", "dw", "all", "s1+s2", "s1+s2+dw"]
    cfg.model.method, cfg.model.modality = "single", "s1"
    assert run_sensor_sets(cfg, ["s1+s2", "s2", "s1"]) == {"s1": ["s1"]}
    with pytest.raises(ValueError, match="radar"):
        run_sensor_sets(cfg, ["radar"])


def test_records_are_reevaluated_only_for_missing_sets(mdico_run, monkeypatch, tmp_path, capsys):
    import colearn_dist.evaluate as evaluate
    from colearn_dist.cli import main

    calls = []
    real = evaluate.evaluate_run
    monkeypatch.setattr(evaluate, "evaluate_run", lambda run, split, **kw: calls.append(kw) or real(run, split, embeddings=False, **kw))
    assert {r["sensors"] for r in evaluate.load_records([mdico_run])} >= {"s1", "all"}
    assert calls == []  # metrics_test.json has every set asked for
    assert main(["evaluate", str(mdico_run), "--out", str(tmp_path), "--sensors", "s2+srtm"]) == 0
    assert calls == [{"extra_sets": ["s2+srtm"]}]
    table = capsys.readouterr().out
    assert "| s2+srtm |" in table and table.index("| dw |") < table.index("| all |") < table.index("| s2+srtm |")
    saved = json.loads((mdico_run / "metrics_test.json").read_text())
    assert "s2+srtm" in {r["sensors"] for r in saved}
    evaluate.load_records([mdico_run], extra_sets=["s2+srtm"])
    assert len(calls) == 1
    assert main(["evaluate", str(mdico_run), "--out", str(tmp_path), "--sensors", "s1+radar"]) == 2


def test_projector_target_labels():
    from colearn_dist.scoring import _target_labels

    classes = SimpleNamespace(task="multiclass", class_names=("crop", "forest", "water"))
    assert _target_labels(torch.tensor([2, 0]), classes) == ["water", "crop"]
    labels = SimpleNamespace(task="multilabel", class_names=("oak", "pine"))
    assert _target_labels(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]), labels) == ["oak|pine", "pine", ""]
    regression = SimpleNamespace(task="regression", class_names=())
    assert _target_labels(torch.tensor([1.23456, 7.0]), regression) == ["1.235", "7.000"]


def test_tables_cover_every_scalar_metric_and_print_the_primary_one(mdico_run, tmp_path):
    from colearn_dist.evaluate import evaluate_runs

    printed = evaluate_runs([mdico_run], tmp_path / "tables")
    written = (tmp_path / "tables" / "results_test.md").read_text()
    assert "(test rmse)" in printed and "(test mae)" not in printed
    assert "context: month to attention only (test rmse)" in printed  # the run's config has no model.context
    for metric, word in (("rmse", "lower"), ("mae", "lower"), ("r2", "higher"), ("bias", "closer to 0")):
        assert f"(test {metric})" in written and f"| sensors ({metric}, {word} is better) |" in written
    assert written.startswith(printed.rstrip("\n"))
    header = (tmp_path / "tables" / "results_test.csv").read_text().splitlines()[0]
    assert {"rmse_mean", "mae_std", "r2_mean", "bias_mean"} <= set(header.split(","))


def _evaluate_worker(rank: int, world: int, port: int, run: str, out: str) -> None:
    import torch.distributed as dist

    from colearn_dist.scoring import evaluate_run

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        records = evaluate_run(run, split="test", extra_sets=["s1+s2"])
        torch.save(records, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_test_scoring_shared_by_two_ranks_equals_one(mdico_run, tmp_path):
    """Each rank scores its part of the test split, rank 0 the metrics: the records of 1 process,
    on every rank, and one metrics file and projector with every test sample."""
    import shutil

    import torch.multiprocessing as mp

    from colearn_dist.launch import free_port
    from colearn_dist.scoring import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(mdico_run, run)
    shutil.rmtree(run / "tb", ignore_errors=True)
    one = evaluate_run(run, split="test", extra_sets=["s1+s2"])
    projector_one = sorted((run / "tb").rglob("metadata.tsv"))
    lines_one = [p.read_text() for p in projector_one]
    shutil.rmtree(run / "tb")
    (run / "metrics_test.json").unlink()
    mp.spawn(_evaluate_worker, args=(2, free_port(), str(run), str(tmp_path)), nprocs=2, join=True)
    two = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert two[0] == two[1]  # every rank returns rank 0's records
    assert json.loads((run / "metrics_test.json").read_text()) == two[0]
    assert [r["sensors"] for r in two[0]] == [r["sensors"] for r in one]
    for a, b in zip(two[0], one):
        assert a["metrics"] == pytest.approx(b["metrics"], rel=1e-5, nan_ok=True), a["sensors"]
    # the projector holds every test sample × sensor, as written by 1 process
    projector_two = sorted((run / "tb").rglob("metadata.tsv"))
    assert [p.relative_to(run) for p in projector_two] == [p.relative_to(run) for p in projector_one]
    for p, text in zip(projector_two, lines_one):
        assert sorted(p.read_text().splitlines()) == sorted(text.splitlines())
