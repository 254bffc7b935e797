"""benchmarks/bench_rf.py: its reference YAML is what `evaluate --reference` reads."""

from __future__ import annotations

import sys
from pathlib import Path

from colearn_dist.sweep import load_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_rf  # noqa: E402


def test_reference_yaml_holds_the_month_and_sensor_forests_per_dataset(tmp_path):
    rows = [
        {"dataset": "fm", "features": "month", "sensors": "none", "split": "test", "rmse_mean": 30.7, "rmse_std": 0.0, "n_seeds": 3},
        {"dataset": "fm", "features": "month + s1", "sensors": "s1", "split": "test", "rmse_mean": 32.3519, "rmse_std": 0.1, "n_seeds": 3},
        {"dataset": "ab", "features": "month + s2", "sensors": "s2", "split": "test", "rmse_mean": 0.7712, "rmse_std": 0.0, "n_seeds": 3},
    ]
    path = tmp_path / "reference.yaml"
    path.write_text(bench_rf.reference_yaml(rows))
    assert load_reference(str(path)) == {"fm": {"s1": 32.352}, "ab": {"s2": 0.771}}  # the month-only forest is no sensor's column
