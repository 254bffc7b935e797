"""Pretraining benchmarks (docs/PRETRAINING.md).

Part 1 `scale`: pretraining throughput and peak memory with 1 and N processes on synthetic archives
of growing size (colearn_dist.synthetic, unlabeled), to show memory stays flat as the archive grows.
Each run is a fresh `colearn-dist train` / `launch` subprocess; peak memory is the summed RSS and PSS
of its process tree (ranks + loader workers), sampled every 50 ms (as benchmarks/bench_data.py).
Throughput is the median of the engine's logged global samples/s, the first log interval
(start-up) left out.

    python benchmarks/bench_pretrain.py scale --sizes 10000 100000 1000000 --nproc 1 2 --steps 150

Part 2 `bundled`: pretrain on the inputs of the bundled train split only (never val / test inputs;
targets unused), fine-tune (full, and a frozen-encoder probe), next to MDiCo from scratch and the
single-sensor baseline; per-sensor test metrics, mean ± std over seeds.

    python benchmarks/bench_pretrain.py bundled --dataset fuel_moisture --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import run_measured  # noqa: E402  (one definition of how memory is measured)

# --------------------------------------------------------------------------------------------
# Part 1: scale


def _logged_rates(run_dir: Path) -> list[float]:
    return [float(m) for m in re.findall(r"step\s+\d+\s+loss \S+\s+(\d+) samples/s", (run_dir / "train.log").read_text())]


def pretrain_run(shards: Path, run_dir: Path, *, nproc: int, steps: int, batch: int, workers: int) -> dict:
    sets = [
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        f"train.max_steps={steps}",
        f"data.batch_size={batch}",
        f"data.workers={workers}",
        "train.warmup_steps=0",
        f"train.checkpoint_every_steps={max(1, steps // 2)}",
        f"train.log_every_steps={max(1, steps // 10)}",
    ]
    cli = [sys.executable, "-m", "colearn_dist.cli"]
    cmd = (
        cli
        + (["train"] if nproc == 1 else ["launch", "--nproc", str(nproc)])
        + [str(REPO / "colearn_dist" / "configs" / "pretrain_synthetic.yaml")]
    )
    cmd += [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    seconds, rss, pss, _ = run_measured(cmd, env)
    rates = _logged_rates(run_dir)[1:]
    return {
        "nproc": nproc,
        "steps": steps,
        "global_batch": batch * nproc,
        "seconds": seconds,
        "samples_per_s": statistics.median(rates) if rates else float("nan"),
        "tree_peak_rss_mb": rss,
        "tree_peak_pss_mb": pss,
    }


def bench_scale(sizes: list[int], nprocs: list[int], *, steps: int, batch: int, workers: int, tmp: Path) -> list[dict]:
    from colearn_dist.shards import write_shards
    from colearn_dist.synthetic import write_synthetic_archive

    rows = []
    for n in sizes:
        t0 = time.perf_counter()
        archive = write_synthetic_archive(tmp / f"synth_{n}.zarr", n, labelled=False, overwrite=True)
        t_gen = time.perf_counter() - t0
        t0 = time.perf_counter()
        shards = tmp / f"synth_{n}_shards"
        manifest = write_shards(archive, shards, samples_per_shard=2048, val_fraction=0.0, workers=2, overwrite=True, progress=False)
        t_shard = time.perf_counter() - t0
        print(f"{n:,} samples: generated in {t_gen:.0f} s, sharded in {t_shard:.0f} s "
              f"({manifest.split_size('train'):,} train samples)", file=sys.stderr, flush=True)  # fmt: skip
        for nproc in nprocs:
            run_dir = tmp / f"run_{n}_{nproc}"
            shutil.rmtree(run_dir, ignore_errors=True)
            row = {
                "samples": n,
                "train_samples": manifest.split_size("train"),
                **pretrain_run(shards, run_dir, nproc=nproc, steps=steps, batch=batch, workers=workers),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(shards)
        shutil.rmtree(archive)
    return rows


def scale_table(rows: list[dict]) -> str:
    head = ["archive samples", "train samples", "processes", "global batch", "steps", "samples/s", "tree peak RSS MB", "tree peak PSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['samples']:,} | {r['train_samples']:,} | {r['nproc']} | {r['global_batch']} | {r['steps']} | "
            f"{r['samples_per_s']:,.0f} | {r['tree_peak_rss_mb']:.0f} | {r['tree_peak_pss_mb']:.0f} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Part 2: bundled data


def _train(config: Path, sets: list[str]) -> dict:
    from colearn_dist.config import load_config
    from colearn_dist.engine import train

    result = train(load_config(config, sets))
    if result["status"] != "finished":
        raise RuntimeError(f"{config} {sets}: {result['status']}")
    return result


def bench_bundled(dataset: str, seeds: list[int], *, root: Path, pretrain_steps: int, single: bool) -> str:
    from colearn_dist.evaluate import load_records
    from colearn_dist.importers.presto import BUNDLED, import_presto
    from colearn_dist.metrics import PRIMARY
    from colearn_dist.report import aggregate, markdown_table, write_csv
    from colearn_dist.shards import write_shards
    from colearn_dist.sweep import plan_sweep

    archive = root / f"{dataset}.zarr"
    if not archive.exists():
        import_presto(BUNDLED[dataset], archive)
    shards = root / "shards"
    if not (shards / "manifest.json").exists():
        write_shards(archive, shards, samples_per_shard=256, seed=0, workers=1, progress=False)
    base = REPO / "colearn_dist" / "configs" / f"{dataset}.yaml"
    data = [f"data.shards={shards}"]
    labels: dict[str, str] = {}
    runs: list[Path] = []
    methods = ["mdico"] + (["single"] if single else [])
    for run in plan_sweep(base, methods, seeds, data, root / "runs"):
        if not run.done:
            print(f"{run.run_dir}", file=sys.stderr, flush=True)
            _train(Path(run.config), run.overrides)
        runs.append(run.run_dir)
        labels[str(run.run_dir)] = "MDiCo (scratch)" if run.method == "mdico" else "single"
    for seed in seeds:
        pre = root / "runs" / "pretrain" / f"seed{seed}"
        if not (pre / "best" / "all.pt").exists():
            print(f"{pre}", file=sys.stderr, flush=True)
            # The base config's model and data, method pretrain: only the train split's inputs are read.
            _train(
                base,
                data
                + [
                    f"run_dir={pre}",
                    "model.method=pretrain",
                    f"train.max_steps={pretrain_steps}",
                    f"train.seed={seed}",
                    "train.checkpoint_every_steps=500",
                    "train.log_every_steps=100",
                ],
            )
        for kind, freeze in (("finetune", "false"), ("probe", "true")):
            run_dir = root / "runs" / kind / f"seed{seed}"
            if not (run_dir / "metrics_test.json").exists():
                print(f"{run_dir}", file=sys.stderr, flush=True)
                _train(
                    base, data + [f"run_dir={run_dir}", f"model.init_from={pre}", f"model.freeze_encoders={freeze}", f"train.seed={seed}"]
                )
            runs.append(run_dir)
            labels[str(run_dir)] = "MDiCo pretrained + fine-tuned" if kind == "finetune" else "MDiCo pretrained, frozen-encoder probe"
    records = load_records(runs)
    for r in records:  # the method column says how the run was trained, not only its model
        r["method"] = labels[r["run"]]
    rows = aggregate(records)
    out = root / "results"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results_test.csv")
    metric = PRIMARY[records[0]["task"]][0]
    table = markdown_table(rows, metric, digits=2)
    (out / "results_test.md").write_text(table + "\n")
    for extra in ("r2",) if metric == "rmse" else ():
        table += "\n\n" + markdown_table(rows, extra, digits=3)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("scale", help="throughput and peak memory vs archive size and processes")
    s.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    s.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    s.add_argument("--steps", type=int, default=150)
    s.add_argument("--batch", type=int, default=256, help="per process")
    s.add_argument("--workers", type=int, default=1, help="loader workers per process")
    s.add_argument("--tmp", type=Path, help="scratch folder (default: a temporary one, removed after)")
    b = sub.add_parser("bundled", help="pretrain → fine-tune vs scratch MDiCo and single sensor, on bundled data")
    b.add_argument("--dataset", default="fuel_moisture", choices=["fuel_moisture", "algae_blooms"])
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    b.add_argument("--pretrain-steps", type=int, default=2000)
    b.add_argument("--no-single", action="store_true", help="skip the single-sensor baseline runs")
    b.add_argument("--root", type=Path, default=Path("runs/bench_pretrain"))
    args = parser.parse_args(argv)
    if args.command == "scale":
        tmp = args.tmp or Path(tempfile.mkdtemp(prefix="bench_pretrain_"))
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            rows = bench_scale(args.sizes, args.nproc, steps=args.steps, batch=args.batch, workers=args.workers, tmp=tmp)
        finally:
            if args.tmp is None:
                shutil.rmtree(tmp, ignore_errors=True)
        print(f"\npretraining ({os.cpu_count()} CPUs visible, batch {args.batch}/process, {args.workers} loader worker(s)/process)")
        print(scale_table(rows))
    else:
        root = args.root / args.dataset
        print(bench_bundled(args.dataset, args.seeds, root=root, pretrain_steps=args.pretrain_steps, single=not args.no_single))
        print(f"\ntables in {root / 'results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
