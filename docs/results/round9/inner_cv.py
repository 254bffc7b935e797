"""Round 9: paired per-fold comparison of inner cross-validation roots (`colearn-dist crossval --inner`).

Held-out-fold RMSE from each run's metrics_test.json (the held-out inner fold; the archive's test
split is in no fold). The first root is the baseline of the differences.

    python docs/results/round9/inner_cv.py ROOT_A ROOT_B [ROOT ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

SENSORS = ["s1", "s2", "era5", "srtm", "dw", "all"]


def load(root: str) -> dict[tuple[str, str], float]:
    out = {}
    for f in sorted(Path(root).glob("fold*/mdico/seed0/metrics_test.json")):
        fold = f.parts[-4]
        for r in json.loads(f.read_text()):
            out[(fold, r["sensors"])] = r["metrics"]["rmse"]
    return out


def main() -> None:
    roots = sys.argv[1:]
    data = {r: load(r) for r in roots}
    base = roots[0]
    names = [Path(r).name for r in roots]
    print(
        f"| held-out fold RMSE, mean of the folds | {' | '.join(names)} | "
        + " | ".join(f"{n} − {names[0]} (folds better)" for n in names[1:])
        + " |"
    )
    print("|:---|" + "---:|" * (2 * len(roots) - 1))
    means: dict[str, list[float]] = {r: [] for r in roots}
    for s in SENSORS:
        folds = sorted(f for (f, ss) in data[base] if ss == s)
        row = [statistics.mean(data[r][(f, s)] for f in folds) for r in roots]
        for r, m in zip(roots, row):
            if s != "all":
                means[r].append(m)
        diffs = []
        for r in roots[1:]:
            d = [data[r][(f, s)] - data[base][(f, s)] for f in folds]
            diffs.append(f"{statistics.mean(d):+.3f} ({sum(x < 0 for x in d)} of {len(d)})")
        print(f"| {s} | " + " | ".join(f"{m:.3f}" for m in row) + " | " + " | ".join(diffs) + " |")
    per = {r: statistics.mean(means[r]) for r in roots}
    print(
        "| mean of the five sensors | "
        + " | ".join(f"{per[r]:.3f}" for r in roots)
        + " | "
        + " | ".join(f"{per[r] - per[base]:+.3f}" for r in roots[1:])
        + " |"
    )


if __name__ == "__main__":
    main()
