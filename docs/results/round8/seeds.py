"""Round 8: MDiCo against a baseline per sensor over many seeds (test RMSE from each run's metrics_test.json).

Seeds are independent runs, not pairs, so the test is two-sided Mann-Whitney U over the seeds.

    python docs/results/round8/seeds.py --a RUN [RUN ...] --b RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

from scipy.stats import mannwhitneyu


def rmse_by_sensor(runs: list[str], split: str = "test") -> dict[str, list[float]]:
    out: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        for record in json.loads((Path(run) / f"metrics_{split}.json").read_text()):
            out[record["sensors"]].append(record["metrics"]["rmse"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", nargs="+", required=True, help="MDiCo runs")
    ap.add_argument("--b", nargs="+", required=True, help="baseline runs (one sensor each)")
    ap.add_argument("--split", default="test")
    args = ap.parse_args()
    a, b = rmse_by_sensor(args.a, args.split), rmse_by_sensor(args.b, args.split)
    print("| sensor | seeds | mdico | baseline | mdico − baseline | seeds where mdico < baseline mean | Mann-Whitney p |")
    print("|:---|---:|---:|---:|---:|---:|---:|")
    for sensor, xs in a.items():
        ys = b.get(sensor)
        if not ys:
            print(f"| {sensor} | {len(xs)} | {statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f} | – | – | – | – |")
            continue
        mx, my = statistics.mean(xs), statistics.mean(ys)
        p = mannwhitneyu(xs, ys, alternative="two-sided").pvalue
        wins = sum(x < my for x in xs)
        print(
            f"| {sensor} | {len(xs)} / {len(ys)} | {mx:.3f} ± {statistics.stdev(xs):.3f} | {my:.3f} ± {statistics.stdev(ys):.3f} "
            f"| {mx - my:+.3f} | {wins} of {len(xs)} | {p:.3f} |"
        )


if __name__ == "__main__":
    main()
