"""The command line on the bundled data, the way the README uses it."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import RENDEZVOUS

CONFIGS = Path(__file__).resolve().parents[1] / "colearn_dist" / "configs"


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS} | {"OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "colearn_dist.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bundled_fuel_moisture_import_shard_sweep_evaluate_export_predict(tmp_path):
    out = cli("import", "presto", "fuel_moisture", "fm.zarr", cwd=tmp_path)
    assert out.returncode == 0 and "train 1578, test 735" in out.stdout, out.stderr
    out = cli("shard", "fm.zarr", "shards/fm", "--samples-per-shard", "256", "--workers", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert cli("shards", "verify", "shards/fm", cwd=tmp_path).stdout.strip().endswith("OK")

    sets = ["--set", "data.shards=shards/fm", "--set", "train.epochs=2", "--set", "model.embedding_dim=32"]
    out = cli(
        "sweep",
        str(CONFIGS / "fuel_moisture_s1s2.yaml"),
        "--methods",
        "mdico,single",
        "--seeds",
        "0",
        "--root",
        "runs",
        *sets,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the per-sensor table: rows s1, s2, all; columns the methods
    assert "| s1 " in out.stdout and "| s2 " in out.stdout and "mdico" in out.stdout and "single" in out.stdout
    rows = list(csv.DictReader(open(tmp_path / "runs" / "results" / "results_test.csv")))
    assert {(r["method"], r["sensors"]) for r in rows} == {
        ("mdico", "s1"),
        ("mdico", "s2"),
        ("mdico", "all"),
        ("single", "s1"),
        ("single", "s2"),
    }
    assert list((tmp_path / "runs" / "results").glob("*.png"))

    out = cli("export", "runs/mdico/seed0", "--modality", "s2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    model, item = out.stdout.split()  # the .pt2 file and its STAC item
    assert model.endswith("model_s2.pt2") and item == model + ".stac.json"
    out = cli("predict", model, "fm.zarr", "--split", "test", "--out", "pred.csv", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    preds = list(csv.DictReader(open(tmp_path / "pred.csv")))
    assert len(preds) == 735 and all(float(p["prediction"]) > 0 for p in preds)  # moisture in %, not z-scores

    status = cli("status", "runs/mdico/seed0", cwd=tmp_path)
    assert "last checkpoint step" in status.stdout
    metrics = json.loads((tmp_path / "runs" / "mdico" / "seed0" / "metrics_test.json").read_text())
    assert {m["sensors"] for m in metrics} == {"s1", "s2", "all"}


def test_errors_are_reported_not_raised(tmp_path):
    out = cli("shard", "missing.zarr", "shards/x", cwd=tmp_path)
    assert out.returncode == 2 and "missing.zarr" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "bad.yaml").write_text("train: {lr: fast}\n")
    out = cli("train", "bad.yaml", cwd=tmp_path)
    assert out.returncode == 2 and "bad.yaml: train.lr: expected a number" in out.stderr


def test_a_corrupt_shard_is_a_one_line_error(run_shards, tmp_path, capsys):
    import shutil

    from colearn_dist.cli import main
    from colearn_dist.manifest import load_manifest

    from helpers import shard_paths, write_config

    shards = tmp_path / "shards"
    shutil.copytree(run_shards, shards)
    victim = shard_paths(load_manifest(shards), "train")[0]
    victim.write_bytes(victim.read_bytes()[:2000])
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", train={"epochs": 1})
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("colearn-dist train: error: ") and str(victim) in last and "Traceback" not in err


def test_a_torchrun_rank_exits_with_its_code_and_its_output(tmp_path):
    """A rank (TORCHELASTIC_RUN_ID set) ends without the interpreter's teardown, and loses neither its
    exit code nor its buffered output (stdout to a pipe is block-buffered)."""

    def run(*args: str, rank: bool) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("TORCHELASTIC_RUN_ID", "PYTHONUNBUFFERED")}
        if rank:
            env["TORCHELASTIC_RUN_ID"] = "test"
        return subprocess.run([sys.executable, "-m", "colearn_dist.cli", *args], capture_output=True, text=True, env=env, timeout=300)

    for args in (("status", str(tmp_path / "none")), ("train", str(tmp_path / "none.yaml"))):
        plain, rank = run(*args, rank=False), run(*args, rank=True)
        assert (rank.returncode, rank.stdout, rank.stderr) == (plain.returncode, plain.stdout, plain.stderr)
    assert "no checkpoint yet" in run("status", str(tmp_path / "none"), rank=True).stdout
    assert run("train", str(tmp_path / "none.yaml"), rank=True).returncode == 2
