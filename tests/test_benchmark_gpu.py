"""benchmarks/bench_gpu.py: the GPU check's CPU dry run, so the script keeps working where CI has no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


@pytest.mark.slow
def test_cpu_dry_run_measures_every_part(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--root", str(tmp_path), "--seconds", "0.5"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert results["device"] == "cpu" and results["precision"] == "fp32"
    assert list(results["training"]) == ["fuel_moisture", "synthetic 3,000"]
    for rows in results["training"].values():
        assert [r["batch"] for r in rows] == [32, 256]
        for r in rows:
            assert r["steps"] >= 1 and r["samples_per_s"] > 0 and r["mean_batch"] >= r["batch"]
            assert r["gpu_mem_peak_gb"] is None
    assert results["loader"]["samples_per_s"] > 0
    resume = results["resume"]
    assert resume["resumed_in_log"] and resume["killed_after_checkpoint_step"] < resume["final_step"]
    assert resume["identical"] and resume["max_abs_difference"] == 0.0  # CPU kernels are deterministic
    assert "| fuel_moisture | 32 " in done.stdout and "bit-identical" in done.stdout
    assert (
        "no CUDA GPU"
        in subprocess.run(
            [sys.executable, str(SCRIPT), "--root", str(tmp_path)], capture_output=True, text=True, env={**env, "CUDA_VISIBLE_DEVICES": ""}
        ).stderr
    )
