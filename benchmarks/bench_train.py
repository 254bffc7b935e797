"""Training throughput of MDiCo with the paper's settings on the bundled fuel_moisture data.

Prints samples/s for: the engine (DeepSpeed) in 1 process and in N processes (weak scaling: each
process keeps batch 32), the share of time spent waiting for data, and the same model, objective
and loader in a plain single-process PyTorch loop without DeepSpeed (the overhead reference).
Runs unchanged on a GPU node (nccl there; the plain loop uses the same device). Both sides run at
the same `--precision` (fp32 by default; bf16 on a GPU: DeepSpeed's bf16 engine vs autocast in the
plain loop), so the comparison stays fair.

    python benchmarks/bench_train.py [--epochs 6] [--nproc 2] [--modalities s1,s2,era5,srtm,dw] [--precision bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CONFIG = Path(__file__).resolve().parents[1] / "colearn_dist" / "configs" / "fuel_moisture.yaml"


def prepare_shards(root: Path) -> Path:
    from colearn_dist.importers.presto import BUNDLED, import_presto
    from colearn_dist.shards import write_shards

    shards = root / "shards"
    if not (shards / "manifest.json").exists():
        archive = import_presto(BUNDLED["fuel_moisture"], root / "fm.zarr", overwrite=True)
        write_shards(archive, shards, samples_per_shard=256, workers=1, progress=False)
    return shards


def overrides(shards: Path, run_dir: Path, args: argparse.Namespace) -> list[str]:
    return [
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        f"data.modalities=[{args.modalities}]",
        f"data.workers={args.workers}",
        f"train.epochs={args.epochs}",
        "train.patience=0",
        "train.log_every_steps=0",
        f"train.threads={args.threads}",
        f"engine.precision={args.precision}",
    ]


def engine_rank(args: argparse.Namespace) -> None:
    """One rank of the engine benchmark (run directly, or by torchrun for N processes)."""
    from colearn_dist.config import load_config
    from colearn_dist.engine import Trainer

    cfg = load_config(CONFIG, overrides(Path(args.shards), Path(args.run_dir), args))
    trainer = Trainer(cfg)
    trainer.stop.install()
    stats = []
    for _ in range(args.epochs):
        trainer._train_epoch()
        trainer.epoch += 1
        stats.append(dict(trainer.epoch_stats))
    steady = stats[1:]  # the first epoch pays for warm-up
    local = torch.tensor([sum(s["samples"] for s in steady), sum(s["wait_s"] for s in steady), sum(s["seconds"] for s in steady)])
    from colearn_dist.distributed import all_reduce_sum

    total = all_reduce_sum(local) if trainer.world > 1 else local
    if trainer.rank == 0:
        seconds = float(total[2]) / trainer.world
        print(
            json.dumps(
                {
                    "world": trainer.world,
                    "samples_per_s": float(total[0]) / seconds,
                    "data_wait_share": float(total[1]) / trainer.world / seconds,
                    "threads_per_rank": torch.get_num_threads(),
                    "device": trainer.device.type,
                }
            ),
            flush=True,
        )


def plain_loop(shards: Path, args: argparse.Namespace) -> dict[str, float]:
    """The same model, objective and loader, with torch.optim.Adam and no DeepSpeed."""
    from colearn_dist.batch import to_device
    from colearn_dist.config import load_config
    from colearn_dist.distributed import configure_threads, threads_per_rank
    from colearn_dist.loader import ShardLoader
    from colearn_dist.manifest import load_manifest
    from colearn_dist.methods import build_objective
    from colearn_dist.runs import build

    cfg = load_config(CONFIG, overrides(shards, Path(tempfile.mkdtemp()), args))
    configure_threads(cfg.train.threads or threads_per_rank(1, cfg.data.workers))
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    built = build(cfg, load_manifest(shards))
    model = built.model.to(device).train()
    objective = build_objective("mdico", cfg.objective, built.spec, built.model_modalities)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
    loader = ShardLoader(shards, "train", batch_size=cfg.data.batch_size, modalities=built.modalities, workers=cfg.data.workers)
    samples, seconds = 0, 0.0
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        n = 0
        for batch in loader:
            batch = to_device(batch, device, torch.float32)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                out = model(batch["inputs"], batch.get("month"))
            loss, _ = objective(out, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n += int(batch["target"].shape[0])
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:
            samples += n
            seconds += time.perf_counter() - t0
    return {"samples_per_s": samples / seconds, "threads_per_rank": torch.get_num_threads()}


def run_engine(nproc: int, shards: Path, args: argparse.Namespace) -> dict[str, float]:
    run_dir = Path(tempfile.mkdtemp(prefix="bench-run-"))
    me = [str(Path(__file__).resolve()), "--rank-worker", "--shards", str(shards), "--run-dir", str(run_dir)]
    me += ["--epochs", str(args.epochs), "--modalities", args.modalities, "--workers", str(args.workers), "--threads", str(args.threads)]
    me += ["--precision", args.precision]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    if nproc == 1:
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *me]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    shutil.rmtree(run_dir, ignore_errors=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"engine benchmark with {nproc} process(es) failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: the engine's rule, cores // ranks - workers)")
    p.add_argument("--modalities", default="s1,s2,era5,srtm,dw")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16 needs a GPU")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rank_worker:
        engine_rank(args)
        return
    root = Path(tempfile.gettempdir()) / "colearn-bench-train"
    root.mkdir(exist_ok=True)
    shards = prepare_shards(root)
    print(
        f"MDiCo, TempCNN, embedding 128, batch 32/process, Adam 1e-3, {args.precision}; modalities {args.modalities}; "
        f"fuel_moisture train split; {args.epochs - 1} timed epochs after one warm-up; {os.cpu_count()} cores"
    )
    plain = plain_loop(shards, args)
    one = run_engine(1, shards, args)
    rows = [("plain PyTorch loop, 1 process", plain, 1), ("engine (DeepSpeed), 1 process", one, 1)]
    if args.nproc > 1:
        many = run_engine(args.nproc, shards, args)
        rows.append((f"engine (DeepSpeed), {args.nproc} processes", many, args.nproc))
    print("\n| run | samples/s (global) | per process | data wait | threads/rank |\n|---|---:|---:|---:|---:|")
    for name, r, n in rows:
        wait = r.get("data_wait_share")
        print(
            f"| {name} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / n:,.0f} | {'–' if wait is None else f'{wait:.0%}'} | {r['threads_per_rank']} |"
        )
    print(f"\nengine / plain loop, 1 process: {one['samples_per_s'] / plain['samples_per_s']:.0%} of the plain loop's throughput")
    if args.nproc > 1:
        print(
            f"weak-scaling efficiency, {args.nproc} processes: {many['samples_per_s'] / (args.nproc * one['samples_per_s']):.0%} "
            f"({os.cpu_count()} cores here, shared by the ranks)"
        )


if __name__ == "__main__":
    main()
