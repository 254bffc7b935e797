"""Random-forest peers of the per-sensor networks: the calendar month alone, and one sensor's raw
bands with the calendar month (one-hot per step), on the same shards (so the same train /
validation / test rows) as the networks.

    python benchmarks/bench_rf.py                                   # both bundled datasets, seeds 0 1 2
    python benchmarks/bench_rf.py --datasets fuel_moisture --seeds 0 --split val

Why: a network deployed for one sensor must beat what a practitioner would fit in five minutes on
the same inputs. The month alone is a strong peer on the bundled data (seasonality of fuel
moisture and of blooms), so the tables of the README carry these columns, computed here rather than
copied from elsewhere. The forests are fitted on the train split (the validation split carved by
the sharder left out, as for the networks) with scikit-learn's defaults (100 trees) — nothing is
tuned — and scored on the split asked for (`--split val` while choosing settings, `test` once).
Output: one Markdown table per dataset (rows: sensor sets, columns: month-only and month + bands,
RMSE mean ± std over seeds), `--out` CSV rows and `--reference-out` the month + sensor forests
as the reference YAML that `colearn-dist evaluate --reference` shows as a column
(colearn_dist/configs/reference.yaml is this file for the test split).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def split_arrays(shards: Path, split: str) -> dict[str, Any]:
    """Every sample of a split, decoded by the project's own loader (normalised, NaN → 0), in one dict."""
    from colearn_dist.loader import ShardLoader

    loader = ShardLoader(shards, split, batch_size=4096, shuffle=False)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in loader:
        for name, x in batch["inputs"].items():
            parts.setdefault(f"x/{name}", []).append(x.numpy())
            parts.setdefault(f"valid/{name}", []).append(batch["valid"][name].numpy())
        parts.setdefault("target", []).append(batch["target"].numpy())
        if "month" in batch:
            parts.setdefault("month", []).append(batch["month"].numpy())
    return {k: np.concatenate(v) for k, v in parts.items()}


def month_features(month: np.ndarray) -> np.ndarray:
    """One-hot calendar month of every step: [N, T] (1..12) → [N, T·12]."""
    onehot = np.zeros((*month.shape, 12), np.float32)
    np.put_along_axis(onehot, (month - 1)[..., None], 1.0, axis=-1)
    return onehot.reshape(len(month), -1)


def sensor_features(data: dict[str, Any], sensor: str) -> np.ndarray:
    """A sensor's inputs flattened, with its validity mask (a missing value is not the mean value)."""
    x = data[f"x/{sensor}"].reshape(len(data["target"]), -1).astype(np.float32)
    valid = data[f"valid/{sensor}"].reshape(len(x), -1).astype(np.float32)
    return np.concatenate([x, valid], axis=1)


def forest_rmse(train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, seed: int) -> float:
    from sklearn.ensemble import RandomForestRegressor

    forest = RandomForestRegressor(random_state=seed, n_jobs=1).fit(train, y_train)
    return float(np.sqrt(np.mean((forest.predict(test) - y_test) ** 2)))


def run_dataset(shards: Path, split: str, seeds: list[int]) -> list[dict[str, Any]]:
    from colearn_dist.shards import load_manifest

    manifest = load_manifest(shards)
    if manifest.task != "regression":
        raise SystemExit(f"{shards}: task {manifest.task}; this benchmark scores regression (RMSE)")
    if not manifest.has_month:
        raise SystemExit(f"{shards}: the shards carry no month; the month-aware forests need it")
    train, test = split_arrays(shards, "train"), split_arrays(shards, split)
    rows = []
    for sensor in [None, *manifest.modalities]:
        feats = [month_features(train["month"])], [month_features(test["month"])]
        if sensor:
            feats[0].append(sensor_features(train, sensor))
            feats[1].append(sensor_features(test, sensor))
        a, b = np.concatenate(feats[0], axis=1), np.concatenate(feats[1], axis=1)
        scores = [forest_rmse(a, train["target"], b, test["target"], s) for s in seeds]
        rows.append(
            {
                "dataset": shards.name,
                "features": f"month + {sensor}" if sensor else "month",
                "sensors": sensor or "none",
                "split": split,
                "rmse_mean": float(np.mean(scores)),
                "rmse_std": float(np.std(scores, ddof=1)) if len(scores) > 1 else float("nan"),
                "n_seeds": len(scores),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    month_only = next(r for r in rows if r["sensors"] == "none")
    lines = [
        f"**{rows[0]['dataset']}** ({rows[0]['split']} RMSE, random forest, mean ± std over {rows[0]['n_seeds']} seeds)",
        "",
        "| sensors | month only | month + sensor's bands |",
        "|:---|---:|---:|",
    ]
    for r in rows:
        if r["sensors"] != "none":
            lines.append(f"| {r['sensors']} | {_cell(month_only)} | {_cell(r)} |")
    return "\n".join(lines) + "\n"


def _cell(r: dict[str, Any]) -> str:
    std = r["rmse_std"]
    return f"{r['rmse_mean']:.3f}" + (f" ± {std:.3f}" if np.isfinite(std) else "")


def bundled_shards(name: str, work: Path) -> Path:
    """The bundled dataset sharded exactly as `colearn-dist demo` shards it (same seed, same validation carve)."""
    from colearn_dist.importers.presto import BUNDLED, import_presto
    from colearn_dist.shards import write_shards

    archive, shards = work / f"{name}.zarr", work / name
    if not (shards / "manifest.json").exists():
        import_presto(BUNDLED[name], archive, overwrite=True)
        write_shards(archive, shards, samples_per_shard=256, seed=0, progress=False)
    return shards


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["fuel_moisture", "algae_blooms"], help="bundled dataset names")
    p.add_argument("--shards", nargs="*", default=[], help="shard folders to score instead of the bundled data")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--out", help="CSV of every row")
    p.add_argument("--reference-out", help="YAML {dataset: {sensor: mean RMSE of the month + sensor forest}} for `evaluate --reference`")
    args = p.parse_args(argv)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(s) for s in args.shards] or [bundled_shards(d, Path(tmp)) for d in args.datasets]
        for shards in folders:
            got = run_dataset(shards, args.split, args.seeds)
            print(markdown(got))
            rows += got
    if args.out:
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if args.reference_out:
        Path(args.reference_out).write_text(reference_yaml(rows))
    return 0


def reference_yaml(rows: list[dict[str, Any]]) -> str:
    """The month + sensor forests of `rows` as `evaluate --reference` reads them."""
    by_dataset: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["sensors"] != "none":
            by_dataset.setdefault(r["dataset"], {})[r["sensors"]] = round(float(r["rmse_mean"]), 3)
    head = (
        f"# Written by `python benchmarks/bench_rf.py --split {rows[0]['split']} --reference-out ...`: a random forest on the\n"
        "# calendar month (one-hot per step) and one sensor's bands, mean RMSE over seeds, per dataset and sensor.\n"
    )
    return head + yaml.safe_dump(by_dataset, default_flow_style=None, sort_keys=False, width=1000)


if __name__ == "__main__":
    sys.exit(main())
