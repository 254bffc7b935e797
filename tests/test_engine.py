"""The training engine: a real run end to end, and exact resume after SIGKILL and across world sizes."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml

SMALL_MODEL = {
    "method": "mdico",
    "embedding_dim": 16,
    "encoders": {"default": {"type": "tempcnn", "hidden": 8, "depth": 2, "dropout": 0.1}, "srtm": {"type": "mlp", "hidden": 8, "depth": 1}},
}


def write_config(path: Path, shards: Path, run_dir: Path, **sections) -> Path:
    cfg = {
        "name": "test",
        "run_dir": str(run_dir),
        "data": {"shards": str(shards), "batch_size": 16, "workers": 0, "shuffle_buffer": 64},
        "model": SMALL_MODEL,
        "train": {"epochs": 3, "patience": 0, "log_every_steps": 5, "threads": 1, "seed": 0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def shards(run_shards):
    return run_shards


# What an in-process run leaves in os.environ must not leak into a child: it would join that rendezvous.
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def run_cli(args: list[str], env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    return subprocess.Popen([sys.executable, "-m", "colearn_dist.cli", *args], env=env, **kw)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run_dir / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def samples_per_epoch(trace_prefix: Path) -> dict[int, list[int]]:
    """Samples of each epoch, a replayed step (after a restart) replacing its earlier record."""
    steps: dict[tuple[int, int, str], list[int]] = {}
    for file in trace_prefix.parent.glob(trace_prefix.name + ".rank*"):
        for line in file.read_text().splitlines():
            epoch, step, *idx = line.split()
            steps[(int(epoch), int(step), file.name)] = [int(i) for i in idx]
    per_epoch: dict[int, list[int]] = defaultdict(list)
    for (epoch, _, _), idx in steps.items():
        per_epoch[epoch] += idx
    return per_epoch


def train_indices(shards: Path) -> list[int]:
    from colearn_dist.loader import ShardLoader

    return sorted(int(i) for b in ShardLoader(shards, "train", batch_size=64, shuffle=False) for i in b["index"])


def test_single_process_run_end_to_end(shards, tmp_path):
    from colearn_dist.config import load_config
    from colearn_dist.engine import train

    cfg_path = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", train={"patience": 5})
    result = train(load_config(cfg_path))
    assert result["status"] == "finished" and result["epoch"] == 3
    run = tmp_path / "run"
    records = json.loads((run / "metrics_test.json").read_text())
    assert {r["sensors"] for r in records} == {"s1", "s2", "srtm", "dw", "all"}
    for rec in records:
        assert rec["split"] == "test" and rec["method"] == "mdico"
        assert rec["metrics"]["rmse"] > 0 and rec["metrics"]["rmse"] == rec["metrics"]["rmse"]
    # s1 carries the signal in the synthetic target: after 3 epochs its head beats predicting the mean.
    s1 = next(r for r in records if r["sensors"] == "s1")["metrics"]
    assert s1["r2"] > 0.0
    assert {p.stem for p in (run / "best").glob("*.pt")} == {"s1", "s2", "srtm", "dw", "all"}
    assert (run / "config.yaml").exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    log = (run / "train.log").read_text()
    assert "samples/s" in log and "val" in log


@pytest.mark.slow
def test_sigkill_and_restart_ends_with_the_same_weights(shards, tmp_path):
    common = {"train": {"epochs": 3, "checkpoint_every_steps": 4, "keep_checkpoints": 2}}
    ref_cfg = write_config(tmp_path / "ref.yaml", shards, tmp_path / "ref", **common)
    assert run_cli(["train", str(ref_cfg)]).wait(timeout=300) == 0

    cfg = write_config(tmp_path / "kill.yaml", shards, tmp_path / "kill", **common)
    trace = tmp_path / "trace"
    proc = run_cli(["train", str(cfg)], {"COLEARN_SAMPLE_TRACE": str(trace)})
    target = random.Random(1).choice([8, 12, 16])
    latest = tmp_path / "kill" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and int(latest.read_text().strip()[4:]) >= target:
            time.sleep(random.Random(2).uniform(0.0, 0.3))
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip()[4:])
    assert killed_at < 3 * 21  # it really was interrupted
    assert run_cli(["train", str(cfg)], {"COLEARN_SAMPLE_TRACE": str(trace)}).wait(timeout=300) == 0

    assert "resumed" in (tmp_path / "kill" / "train.log").read_text()
    assert_same_weights(final_state(tmp_path / "ref"), final_state(tmp_path / "kill"))
    expected = train_indices(shards)
    per_epoch = samples_per_epoch(trace)
    assert sorted(per_epoch) == [0, 1, 2]
    for epoch, seen in per_epoch.items():
        assert sorted(seen) == expected, f"epoch {epoch}: samples lost or repeated"


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_resume_with_another_world_size(shards, tmp_path, zero_stage):
    """2 processes → stopped mid-epoch → 1 process → stopped → 2 processes: every sample once per
    epoch. With ZeRO 2 the partitioned optimizer state goes through DeepSpeed's universal checkpoint."""
    trace = tmp_path / "trace"
    cfg = write_config(
        tmp_path / "c.yaml",
        shards,
        tmp_path / "run",
        engine={"zero_stage": zero_stage},
        train={"epochs": 2, "checkpoint_every_steps": 3},
        model={"encoders": {"default": {"type": "tempcnn", "hidden": 8, "depth": 2, "dropout": 0.0}}},
    )
    env = {"COLEARN_SAMPLE_TRACE": str(trace)}
    # Each leg stops itself after a given number of steps (as a time limit would), by signal.
    for nproc, stop_after in ((2, 5), (1, 7), (2, None)):
        extra = {**env, **({"COLEARN_STOP_AFTER_STEPS": str(stop_after)} if stop_after else {})}
        code = run_cli(["launch", "--nproc", str(nproc), str(cfg)], extra).wait(timeout=300)
        assert (code != 0) if stop_after else (code == 0)
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("stop requested") == 2
    assert "world size 2 → 1" in log and "world size 1 → 2" in log
    assert (tmp_path / "run" / "metrics_test.json").exists()
    expected = train_indices(shards)
    per_epoch = samples_per_epoch(trace)
    for epoch, seen in per_epoch.items():
        assert sorted(seen) == expected, f"epoch {epoch}: samples lost or repeated across world sizes"
