"""The GPU check: MDiCo on one GPU in bf16 — throughput, memory, the loader, and resume after SIGKILL.

Measures, within about 8 minutes on one GPU node (run by benchmarks/bench_gpu.sh):
1. training samples/s and peak GPU memory of the engine (DeepSpeed, bf16) on the bundled
   fuel_moisture data and on a synthetic archive of 1M samples (`colearn-dist synth`), at batch
   32, 256 and 4096 per GPU (each timed for --seconds after a warm-up; the bundled train split has
   1,341 samples, so its "4096" is one batch of all of them per epoch — the table says so);
2. the loader alone on the synthetic shards with the workers the node has (cores − 1);
3. a resume check on the GPU: a short run is SIGKILLed after a checkpoint and restarted; its final
   weights are compared with those of an uninterrupted run (identical, or the largest difference:
   GPU kernels need not be deterministic).

    bash benchmarks/bench_gpu.sh                                   # the GPU check (needs a CUDA GPU)
    python benchmarks/bench_gpu.py --device cpu --quick            # the same code path on CPU, small (CI)

Results: a Markdown table on stdout and every figure in --out (JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "colearn_dist" / "configs" / "fuel_moisture_paper.yaml"
SYNTH_MODALITIES = "s1,s2,era5,srtm"  # the synthetic archive's sensors
BUNDLED_MODALITIES = "s1,s2,era5,srtm,dw"


def cores() -> int:
    from colearn_dist.distributed import available_cores

    return available_cores()


def synthetic_shards(root: Path, samples: int, workers: int) -> tuple[Path, dict[str, float]]:
    """`colearn-dist synth` + `shard` (validation carved by site, 5 %); reused when already there."""
    from colearn_dist.shards import write_shards
    from colearn_dist.synthetic import write_synthetic_archive

    shards = root / f"synth_{samples}" / "shards"
    if (shards / "manifest.json").exists():
        return shards, {"reused": 1.0}
    t0 = time.perf_counter()
    archive = write_synthetic_archive(root / f"synth_{samples}" / "archive.zarr", samples, overwrite=True)
    t1 = time.perf_counter()
    write_shards(archive, shards, samples_per_shard=2048, workers=workers, val_fraction=0.05, progress=False, overwrite=True)
    return shards, {"synth_s": t1 - t0, "shard_s": time.perf_counter() - t1}


def overrides(shards: Path, run_dir: Path, modalities: str, batch: int, args: argparse.Namespace, workers: int) -> list[str]:
    from colearn_dist.manifest import load_manifest

    # the shipped config's calendar context where the shards have months (synthetic archives have none)
    context = [] if load_manifest(shards).has_month else ["model.context=[]"]
    return [
        *context,
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        f"data.modalities=[{modalities}]",
        f"data.batch_size={batch}",
        f"data.workers={workers}",
        "data.shuffle_buffer=4096",
        "train.epochs=1",
        "train.patience=0",
        "train.log_every_steps=0",
        f"engine.precision={args.precision}",
        f"train.threads={args.threads}",
    ]


def throughput(shards: Path, run_dir: Path, modalities: str, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """Engine steps (forward, objective, backward, optimizer) on the run's own loader, for
    args.seconds after args.warmup steps; samples/s, data wait, peak device memory."""
    import torch

    from colearn_dist.batch import to_device
    from colearn_dist.config import load_config
    from colearn_dist.engine import Trainer

    cfg = load_config(CONFIG, overrides(shards, run_dir, modalities, batch, args, args.workers))
    trainer = Trainer(cfg)
    trainer.engine.train()
    cuda = trainer.device.type == "cuda"

    def batches(loader):
        while True:  # epoch after epoch
            yield from loader

    it = batches(trainer.train_loader)
    for _ in range(args.warmup):
        trainer._train_step(to_device(next(it), trainer.device, trainer.dtype))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    samples = steps = 0
    wait = 0.0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        tw = time.perf_counter()
        raw = next(it)
        wait += time.perf_counter() - tw
        trainer._train_step(to_device(raw, trainer.device, trainer.dtype))
        samples += int(raw["target"].shape[0])
        steps += 1
        if cuda and steps % 20 == 0:
            torch.cuda.synchronize()  # the clock must see the GPU's work, not only its queue
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    row = {
        "batch": batch,
        "mean_batch": samples / max(1, steps),
        "steps": steps,
        "samples_per_s": samples / seconds,
        "data_wait_share": wait / seconds,
        "gpu_mem_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gpu_mem_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "threads": torch.get_num_threads(),
    }
    trainer.logger.close()
    del trainer, it
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def loader_rate(shards: Path, modalities: str, workers: int, seconds: float) -> dict[str, Any]:
    """ShardLoader alone (shuffled, sha256-checked, normalised), batch 256, `workers` processes."""
    from colearn_dist.loader import ShardLoader

    loader = ShardLoader(shards, "train", batch_size=256, modalities=modalities.split(","), workers=workers, shuffle_buffer=4096)
    samples = 0
    t0 = time.perf_counter()
    first = None
    for batch in loader:
        if first is None:  # worker start-up is not throughput
            first = time.perf_counter()
            continue
        samples += int(batch["target"].shape[0])
        if time.perf_counter() - first > seconds:
            break
    elapsed = time.perf_counter() - (first or t0)
    return {"workers": workers, "batch": 256, "samples_per_s": samples / max(elapsed, 1e-9), "startup_s": (first or t0) - t0}


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "colearn_dist.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _final_weights(run_dir: Path) -> dict[str, Any]:
    import torch

    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return torch.load(run_dir / "checkpoints" / latest / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def resume_check(shards: Path, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Uninterrupted run vs the same run SIGKILLed after its checkpoint at step ≥ kill_at, then restarted."""
    import torch
    import yaml

    from colearn_dist.config import load_config

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    runs = {}
    for name in ("reference", "killed"):
        sets = overrides(shards, root / f"resume-{name}", BUNDLED_MODALITIES, 32, args, 0)
        sets += [f"train.epochs={args.resume_epochs}", "train.checkpoint_every_steps=10", "train.evaluate_test=false"]
        cfg = load_config(CONFIG, sets)
        path = root / f"resume-{name}.yaml"
        path.write_text(yaml.safe_dump(cfg.to_dict()))
        runs[name] = path
    t0 = time.perf_counter()
    ref = _cli(["train", str(runs["reference"])], env)
    if ref.wait() != 0:
        raise RuntimeError(f"resume check: the reference run failed:\n{ref.stderr.read().decode()[-2000:]}")
    latest = root / "resume-killed" / "checkpoints" / "latest"
    proc = _cli(["train", str(runs["killed"])], env)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if latest.exists() and int(latest.read_text().strip()[4:]) >= args.kill_at:
            break
        time.sleep(0.02)
    if proc.poll() is not None:
        raise RuntimeError(f"resume check: the run ended (code {proc.returncode}) before it could be killed; raise --resume-epochs")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip()[4:])
    again = _cli(["train", str(runs["killed"])], env)
    if again.wait() != 0:
        raise RuntimeError(f"resume check: the restarted run failed:\n{again.stderr.read().decode()[-2000:]}")
    a, b = _final_weights(root / "resume-reference"), _final_weights(root / "resume-killed")
    worst = max(float((a[k].float() - b[k].float()).abs().max()) if a[k].numel() else 0.0 for k in a)
    return {
        "killed_after_checkpoint_step": killed_at,
        "final_step": int((root / "resume-killed" / "checkpoints" / "latest").read_text().strip()[4:]),
        "identical": all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys(),
        "max_abs_difference": worst,
        "seconds": time.perf_counter() - t0,
        "resumed_in_log": "resumed" in (root / "resume-killed" / "train.log").read_text(),
    }


def table(results: dict[str, Any]) -> str:
    lines = [
        f"device: {results['device']}, precision {results['precision']}, {results['cores']} cores, "
        f"{results['workers']} loader worker(s) per training run",
        "",
        "| data | batch/GPU (mean) | samples/s | data wait | GPU memory peak (reserved) GB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, rows in results["training"].items():
        for r in rows:
            mem = "–" if r["gpu_mem_peak_gb"] is None else f"{r['gpu_mem_peak_gb']:.2f} ({r['gpu_mem_reserved_gb']:.2f})"
            lines.append(
                f"| {name} | {r['batch']} ({r['mean_batch']:.0f}) | {r['samples_per_s']:,.0f} | {r['data_wait_share']:.0%} | {mem} |"
            )
    ld = results["loader"]
    lines += ["", f"loader alone ({ld['workers']} workers, batch 256): {ld['samples_per_s']:,.0f} samples/s"]
    rc = results.get("resume")
    if rc:
        verdict = "bit-identical" if rc["identical"] else f"largest difference {rc['max_abs_difference']:.3g}"
        lines.append(
            f"resume: SIGKILL after the checkpoint of step {rc['killed_after_checkpoint_step']}, restarted, "
            f"final step {rc['final_step']}: {verdict} to the uninterrupted run ({rc['seconds']:.0f} s)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--quick", action="store_true", help="small and short: the code path, not the figures (CPU / CI)")
    p.add_argument("--root", default=None, help="work folder (data, runs); default $TMPDIR/colearn-bench-gpu")
    p.add_argument("--out", default=None, help="results JSON (default ROOT/bench_gpu.json)")
    p.add_argument("--samples", type=int, default=None, help="synthetic archive size (default 1,000,000; --quick 3,000)")
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes per GPU (default 32 256 4096)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per configuration (default 20; --quick 1)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before each timing")
    p.add_argument("--workers", type=int, default=None, help="loader workers of the training runs (default: half the cores)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process (default: the engine's rule; --quick 1)")
    p.add_argument("--resume-epochs", type=int, default=3)
    p.add_argument("--kill-at", type=int, default=50, help="SIGKILL once a checkpoint of this step or later exists")
    p.add_argument("--no-resume", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks for a GPU
    import tempfile

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU visible to this process (use --device cpu for the CPU dry run)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    from bench_train import prepare_shards

    n_cores = cores()
    args.precision = "bf16" if args.device == "cuda" else "fp32"  # bf16 needs a GPU (the engine refuses it on CPU)
    args.samples = args.samples or (3000 if args.quick else 1_000_000)
    args.batches = args.batches or ([32, 256] if args.quick else [32, 256, 4096])
    args.seconds = args.seconds if args.seconds is not None else (1.0 if args.quick else 20.0)
    if args.quick:
        args.warmup, args.resume_epochs, args.kill_at = 2, 1, 20  # killed between steps 20 and 41
    args.threads = args.threads if args.threads is not None else (1 if args.quick else 0)
    args.workers = args.workers if args.workers is not None else (0 if args.quick else max(1, n_cores // 2))
    root = Path(args.root or Path(tempfile.gettempdir()) / "colearn-bench-gpu")
    shutil.rmtree(root / "runs", ignore_errors=True)  # runs of an earlier call would resume, not train
    (root / "bundled").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    results: dict[str, Any] = {"device": device, "precision": args.precision, "cores": n_cores, "workers": args.workers}
    results["command"] = " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])
    bundled = prepare_shards(root / "bundled")
    synth, prep = synthetic_shards(root, args.samples, max(1, n_cores - 1))
    results["synthetic"] = {"samples": args.samples, **prep}
    results["training"] = {}
    for name, shards, modalities in (
        ("fuel_moisture", bundled, BUNDLED_MODALITIES),
        (f"synthetic {args.samples:,}", synth, SYNTH_MODALITIES),
    ):
        rows = []
        for batch in args.batches:
            row = throughput(shards, root / "runs" / f"{shards.parent.name}-{batch}", modalities, batch, args)
            rows.append(row)
            print(json.dumps({"data": name, **row}), flush=True)
        results["training"][name] = rows
    results["loader"] = loader_rate(synth, SYNTH_MODALITIES, max(1, n_cores - 1) if not args.quick else 1, args.seconds * 2)
    if not args.no_resume:
        results["resume"] = resume_check(bundled, root / "runs", args)
    results["seconds"] = time.perf_counter() - t0
    out = Path(args.out or root / "bench_gpu.json")
    out.write_text(json.dumps(results, indent=1))
    print(table(results))
    print(f"total {results['seconds']:.0f} s; figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
