"""Training throughput of MDiCo (paper settings) on the bundled fuel_moisture data, against the hardware.

For each batch size × sensor set, one process runs, alternating round by round (A/B/C, the same
batches in the same order):
  * the engine (DeepSpeed `Trainer`, its own loader: data wait measured),
  * the plain loop: the same model, objective and loader with torch.optim.Adam, no DeepSpeed,
  * a reference-shaped plain PyTorch MDiCo written here from the paper (one TempCNN / MLP per
    encoder, nn.Conv1d / nn.BatchNorm1d / nn.Linear modules called one by one, NT-Xent pair by pair),
    with the same sizes,
and reports samples/s (median over rounds; a round is one epoch, or as many as make 40 steps;
the engine / plain and engine / reference columns are medians of the per-round ratios) and the
fraction of the FLOP limit: FLOPs per sample of
forward + backward counted with torch.utils.flop_counter, divided into the matmul GFLOP/s measured
in the same process on the model's own matrix shapes (between rounds).

`--baseline DIR` also runs the engine of another checkout (e.g. the main branch) against this one,
in alternating subprocesses, at `--baseline-batch` with all sensors: the speed-up is a ratio from one
run. Each side reads the fuel_moisture config shipped with its own code, without `model.context`
(older checkouts have none), so both train the same model. One torch thread everywhere by default. Figures from a shared machine are noisy; the ratios of
alternating runs are what to read.

    python benchmarks/bench_train.py [--batches 32 256] [--sets s1,s2 s1,s2,era5,srtm,dw] [--rounds 3]
                                     [--compile] [--baseline /path/to/other/checkout] [--profile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG = Path(__file__).resolve().parents[1] / "colearn_dist" / "configs" / "fuel_moisture_paper.yaml"
FIVE = "s1,s2,era5,srtm,dw"
MIN_STEPS = 40  # each timed round runs whole epochs (passes) until at least this many steps


def prepare_shards(root: Path) -> Path:
    from colearn_dist.importers.presto import BUNDLED, import_presto
    from colearn_dist.shards import write_shards

    shards = root / "shards"
    if not (shards / "manifest.json").exists():
        archive = import_presto(BUNDLED["fuel_moisture"], root / "fm.zarr", overwrite=True)
        write_shards(archive, shards, samples_per_shard=256, workers=1, progress=False)
    return shards


def overrides(shards: Path, run_dir: Path, mods: str, batch: int, compile_: bool) -> list[str]:
    out = [
        f"data.shards={shards}",
        f"run_dir={run_dir}",
        f"data.modalities=[{mods}]",
        f"data.batch_size={batch}",
        "data.workers=0",
        "train.patience=0",
        "train.log_every_steps=0",
        "train.threads=1",
        "engine.precision=fp32",
    ]
    return out + (["train.compile=true"] if compile_ else [])


# ------------------------------------------------------------------------- the reference-shaped model
class RefTempCNN(nn.Module):
    """Pelletier et al.'s TempCNN as the paper's code writes it: conv blocks, flatten, dense block."""

    def __init__(self, channels: int, steps: int, out: int, hidden: int = 64, depth: int = 3, k: int = 5, p: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [
                nn.Conv1d(channels if i == 0 else hidden, hidden, k, padding="same"),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Dropout(p),
            ]
        self.convs = nn.Sequential(*layers)
        self.dense = nn.Sequential(nn.Flatten(), nn.Linear(hidden * steps, out), nn.BatchNorm1d(out), nn.ReLU(), nn.Dropout(p))

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(self.convs(x.transpose(1, 2)))


class RefMLP(nn.Module):
    def __init__(self, channels: int, out: int, hidden: int = 64, depth: int = 2, p: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(channels if i == 0 else hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(p)]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class RefMDiCo(nn.Module):
    """Per sensor a unique encoder (z_spe | z_unu), a common encoder + Linear/BN/ReLU projection (z_sha)
    and a head on [z_spe; z_sha]; shared: an auxiliary head and two modality classifiers."""

    def __init__(self, inputs: dict[str, Any], emb: int = 128, out: int = 1, cat_dim: int = 8):
        super().__init__()
        self.mods = list(inputs)
        half = emb // 2

        def encoder(inp: Any) -> nn.Module:
            if inp.kind == "static":
                return RefMLP(inp.channels, emb)
            if inp.kind == "categorical":
                return nn.Sequential(nn.Embedding(inp.num_classes, cat_dim), RefTempCNN(cat_dim, inp.steps, emb))
            return RefTempCNN(inp.channels, inp.steps, emb)

        self.unique = nn.ModuleDict({m: encoder(i) for m, i in inputs.items()})
        self.common = nn.ModuleDict({m: encoder(i) for m, i in inputs.items()})
        self.project = nn.ModuleDict({m: nn.Sequential(nn.Linear(emb, half), nn.BatchNorm1d(half), nn.ReLU()) for m in inputs})
        self.heads = nn.ModuleDict({m: nn.Linear(emb, out) for m in inputs})
        self.aux = nn.Linear(half, out)
        self.mod_spe = nn.Linear(half, len(inputs))
        self.mod_unu = nn.Linear(half, len(inputs))
        self.half = half
        self.classes = {m: i.num_classes for m, i in inputs.items() if i.kind == "categorical"}

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        out: dict[str, dict[str, Tensor]] = {k: {} for k in ("pred", "spe", "unu", "sha")}
        for m in self.mods:
            x = inputs[m]
            if m in self.classes:  # missing / out-of-range codes → class 0 (the reference has no missing code)
                x = x.clamp(0, self.classes[m] - 1)
            u = self.unique[m](x)
            spe, unu = u[:, : self.half], u[:, self.half :]
            sha = self.project[m](self.common[m](x))
            out["pred"][m], out["spe"][m], out["unu"][m], out["sha"][m] = self.heads[m](torch.cat([spe, sha], 1)), spe, unu, sha
        return out


def ref_nt_xent(a: Tensor, b: Tensor, tau: float = 0.1) -> Tensor:
    z = F.normalize(torch.cat([a, b]), dim=1)
    n = a.shape[0]
    sim = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, positives)


def ref_loss(model: RefMDiCo, out: dict[str, dict[str, Tensor]], target: Tensor) -> Tensor:
    mods = model.mods
    main = sum(F.mse_loss(out["pred"][m][:, 0], target) for m in mods) / len(mods)
    aux = sum(F.mse_loss(model.aux(out[k][m])[:, 0], target) for m in mods for k in ("spe", "sha")) / (2 * len(mods))
    pairs = [(a, b) for i, a in enumerate(mods) for b in mods[i + 1 :]]
    con = sum(ref_nt_xent(out["sha"][a], out["sha"][b]) for a, b in pairs) / len(pairs)
    mod = 0.0
    for i, m in enumerate(mods):
        label = torch.full((target.shape[0],), i)
        mod = mod + F.cross_entropy(model.mod_spe(out["spe"][m]), label) + F.cross_entropy(model.mod_unu(out["unu"][m]), label)
    return main + aux + con + mod / (2 * len(mods))


# ------------------------------------------------------------------------------------------ one case
def matmul_gflops(batch: int, repeats: int = 30) -> float:
    """Best of the model's batched-matmul shapes (conv window, dense layer, and their backward forms)."""
    g = 10
    best = 0.0
    for m, k, n in ((batch, 192, 64), (batch, 192, 128), (192, batch, 64), (batch, 64, 192)):
        a, b = torch.randn(g, m, k), torch.randn(g, k, n)
        for _ in range(3):
            torch.bmm(a, b)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(repeats):
                torch.bmm(a, b)
            times.append((time.perf_counter() - t0) / repeats)
        best = max(best, 2 * g * m * k * n / statistics.median(times) / 1e9)
    return best


def flops_per_sample(step: Callable[[dict[str, Any]], None], batch: dict[str, Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step(batch)
    return counter.get_total_flops() / int(batch["target"].shape[0])


def engine_round(trainer: Any, reps: int) -> tuple[float, float]:
    """`reps` epochs of the engine: samples/s and the share of the time spent waiting for data."""
    samples = seconds = wait = 0.0
    for _ in range(reps):
        trainer._train_epoch()
        trainer.epoch += 1
        s = trainer.epoch_stats
        samples, seconds, wait = samples + s["samples"], seconds + s["seconds"], wait + s["wait_s"]
    return samples / seconds, wait / seconds


def profiled(fn: Callable[[], Any], steps: int) -> dict[str, Any]:
    """torch.profiler over `fn` (one round): per step, the CPU time of all ops, aten calls, and the
    calls of the ops that re-lay out or fill memory."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    out = {
        "ms": sum(e.self_cpu_time_total for e in events) / 1000 / steps,
        "aten_calls": sum(e.count for e in events if e.key.startswith("aten::")) / steps,
    }
    for op in ("stack", "copy_", "clone", "zeros", "zero_", "fill_", "transpose"):
        out[op] = sum(e.count for e in events if e.key == f"aten::{op}") / steps
    # where the step goes: the ops with the most self time, "name ms calls" per step
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    out["top"] = "; ".join(f"{e.key} {e.self_cpu_time_total / 1000 / steps:.2f} ms ×{e.count / steps:.0f}" for e in top)
    return out


def run_case(args: argparse.Namespace) -> None:
    from colearn_dist.config import load_config
    from colearn_dist.engine import Trainer

    torch.set_num_threads(1)
    shards = Path(args.shards)
    config, extra = CONFIG, []
    if args.engine_only:
        # Another checkout's engine (--baseline): the config shipped with the code being imported,
        # without the input context (which older code does not have), so both run the same model.
        import colearn_dist
        from colearn_dist.config import ModelConfig

        config = Path(colearn_dist.__file__).parent / "configs" / CONFIG.name
        if not config.exists():  # checkouts before fuel_moisture_paper.yaml shipped these settings as fuel_moisture.yaml
            config = config.with_name("fuel_moisture.yaml")
        extra = ["model.context=null"] if "context" in {f.name for f in dataclasses.fields(ModelConfig)} else []
    cfg = load_config(config, overrides(shards, Path(tempfile.mkdtemp(prefix="bench-run-")), args.mods, args.batch, args.compile) + extra)
    trainer = Trainer(cfg)
    trainer.stop.install()
    reps = max(1, math.ceil(MIN_STEPS / len(trainer.train_loader)))  # epochs (passes) per round
    if args.engine_only:
        rates, waits = [], []
        for epoch in range(args.rounds + 1):
            rate, wait = engine_round(trainer, reps)
            if epoch:
                rates.append(rate)
                waits.append(wait)
        print(json.dumps({"engine": statistics.median(rates), "data_wait": statistics.median(waits)}), flush=True)
        return

    from colearn_dist.batch import to_device
    from colearn_dist.loader import ShardLoader
    from colearn_dist.manifest import load_manifest
    from colearn_dist.methods import build_objective
    from colearn_dist.runs import build

    manifest = load_manifest(shards)
    torch.manual_seed(0)
    built = build(cfg, manifest)
    model = built.model.train()
    objective = build_objective("mdico", cfg.objective, built.spec, built.model_modalities)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
    loader = ShardLoader(shards, "train", batch_size=args.batch, modalities=built.modalities, cache_bytes=cfg.data.cache_mb << 20)

    def forward_loss(inputs: dict[str, Tensor], month: Tensor | None, labels: dict[str, Tensor]) -> Tensor:
        return objective(model(inputs, month), labels)[0]

    fl = torch.compile(forward_loss) if args.compile else forward_loss

    marked = [not args.compile]

    def plain_step(batch: dict[str, Any]) -> None:
        labels = {"target": batch["target"]}
        if not marked[0]:  # as the engine: the batch axis marked dynamic at the first call only
            for t in [*batch["inputs"].values(), batch["target"], batch["month"]]:
                torch._dynamo.maybe_mark_dynamic(t, 0)
            marked[0] = True
        loss = fl(batch["inputs"], batch.get("month"), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    from colearn_dist.manifest import modality_inputs

    torch.manual_seed(0)
    ref = RefMDiCo(modality_inputs(manifest.modalities, built.modalities)).train()
    ref_opt = torch.optim.Adam(ref.parameters(), lr=cfg.train.lr)

    def ref_step(batch: dict[str, Any]) -> None:
        loss = ref_loss(ref, ref(batch["inputs"]), built.spec.standardise(batch["target"]))
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()

    def timed(step: Callable[[dict[str, Any]], None]) -> float:
        batches = [to_device(b, torch.device("cpu"), torch.float32) for b in loader]
        t0 = time.perf_counter()
        for _ in range(reps):
            for b in batches:
                step(b)
        return reps * sum(int(b["target"].shape[0]) for b in batches) / (time.perf_counter() - t0)

    def engine_epoch() -> tuple[float, float]:
        return engine_round(trainer, reps)

    first = to_device(
        next(iter(ShardLoader(shards, "train", batch_size=args.batch, modalities=built.modalities))), torch.device("cpu"), torch.float32
    )
    flops = flops_per_sample(lambda b: forward_loss(b["inputs"], b.get("month"), {"target": b["target"]}).backward(), first)
    ref_flops = flops_per_sample(lambda b: ref_loss(ref, ref(b["inputs"]), built.spec.standardise(b["target"])).backward(), first)
    optimizer.zero_grad(set_to_none=True)
    ref_opt.zero_grad(set_to_none=True)
    engine_epoch(), timed(plain_step), timed(ref_step)  # warm-up (and compilation)
    if args.profile:
        print(
            json.dumps(
                {"engine": profiled(engine_epoch, reps * len(loader)), "plain": profiled(lambda: timed(plain_step), reps * len(loader))}
            )
        )
        return
    rows: dict[str, list[float]] = {"engine": [], "data_wait": [], "plain": [], "reference": [], "gflops": []}
    for _ in range(args.rounds):
        rate, wait = engine_epoch()
        rows["engine"].append(rate)
        rows["data_wait"].append(wait)
        rows["plain"].append(timed(plain_step))
        rows["reference"].append(timed(ref_step))
        rows["gflops"].append(matmul_gflops(args.batch))
    # Ratios per round (A, B and C ran back to back): steadier than ratios of medians on a shared machine.
    paired = {
        "engine_vs_plain": [e / p for e, p in zip(rows["engine"], rows["plain"])],
        "engine_vs_reference": [e / r for e, r in zip(rows["engine"], rows["reference"])],
    }
    t0 = time.perf_counter()
    n = sum(int(b["target"].shape[0]) for b in loader)
    loader_rate = n / (time.perf_counter() - t0)
    result = {k: statistics.median(v) for k, v in {**rows, **paired}.items()}
    result.update(reps=reps, flops_per_sample=flops, ref_flops_per_sample=ref_flops, loader=loader_rate, compile_s=trainer.compile_seconds)
    print(json.dumps(result), flush=True)


def subprocess_case(argv: list[str], code: Path | None = None) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    if code is not None:
        env["PYTHONPATH"] = str(code)
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--case", *argv], capture_output=True, text=True, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"benchmark case {argv} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[32, 256])
    p.add_argument("--sets", nargs="+", default=["s1,s2", FIVE])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="train.compile for the engine, torch.compile for the plain loop")
    p.add_argument("--baseline", type=Path, help="another checkout whose engine to compare with (alternating subprocesses)")
    p.add_argument("--baseline-batch", type=int, default=32)
    p.add_argument("--only-baseline", action="store_true", help="skip the table; only the A/B against --baseline")
    p.add_argument("--profile", action="store_true", help="instead of the table: torch.profiler per step (engine, plain loop)")
    p.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--mods", default=FIVE, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        run_case(args)
        return
    root = Path(tempfile.gettempdir()) / "colearn-bench-train"
    root.mkdir(exist_ok=True)
    shards = prepare_shards(root)
    print(f"MDiCo, TempCNN, embedding 128, Adam 1e-3, fp32, 1 thread; fuel_moisture train split; medians of {args.rounds} "
          f"alternating rounds after a warm-up{'; compiled' if args.compile else ''}; {os.cpu_count()} cores (shared)\n")  # fmt: skip
    if not args.profile:
        print(
            "| batch | sensors | engine | plain loop | reference MDiCo | engine / plain | engine / reference | data wait | "
            "loader alone | MFLOP/sample (ref) | matmul GFLOP/s | FLOP limit | engine share |"
        )
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch in [] if args.only_baseline else args.batches:
        for mods in args.sets:
            argv = ["--shards", str(shards), "--mods", mods, "--batch", str(batch), "--rounds", str(args.rounds)]
            if args.profile:
                for name, row in subprocess_case(argv + ["--profile"]).items():
                    top = row.pop("top")
                    print(f"profile, batch {batch}, {mods}, {name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in row.items()), flush=True)
                    print(f"  most self time per step: {top}", flush=True)
                continue
            r = subprocess_case(argv + (["--compile"] if args.compile else []))
            limit = r["gflops"] * 1e9 / r["flops_per_sample"]
            print(f"| {batch} | {mods} | {r['engine']:,.0f} | {r['plain']:,.0f} | {r['reference']:,.0f} | {r['engine_vs_plain']:.0%} | "
                  f"{r['engine_vs_reference']:.1f}× | {r['data_wait']:.1%} | {r['loader']:,.0f} | {r['flops_per_sample'] / 1e6:.2f} "
                  f"({r['ref_flops_per_sample'] / 1e6:.2f}) | {r['gflops']:.0f} | {limit:,.0f} | {r['engine'] / limit:.0%} |"
                  + (f" compiled in {r['compile_s']:.0f} s" if r.get("compile_s") else ""), flush=True)  # fmt: skip
    if args.baseline:
        here = Path(__file__).resolve().parents[1]
        argv = ["--engine-only", "--shards", str(shards), "--mods", FIVE, "--batch", str(args.baseline_batch), "--rounds", str(args.rounds)]
        a, b = [], []
        for _ in range(args.rounds):
            a.append(subprocess_case(argv, args.baseline)["engine"])
            b.append(subprocess_case(argv + (["--compile"] if args.compile else []), here)["engine"])
        ratios = [y / x for x, y in zip(a, b)]
        print(f"\nengine, batch {args.baseline_batch}, all sensors: {args.baseline} {statistics.median(a):,.0f} samples/s, "
              f"this checkout {statistics.median(b):,.0f}; ratio per alternating pair {', '.join(f'{x:.2f}' for x in ratios)} "
              f"(median {statistics.median(ratios):.2f}×)")  # fmt: skip


if __name__ == "__main__":
    main()
