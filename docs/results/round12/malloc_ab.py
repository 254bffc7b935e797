"""Round 12's A/B: the engine with and without `distributed.keep_freed_memory` (glibc's malloc kept
from handing freed blocks back to the kernel), alternating subprocesses, same code otherwise. Each
child trains fuel_moisture (the benchmark's config, five sensors) for `--epochs` epochs with `Trainer` and
reports its median ms per step over the epochs after the first two, and its minor page faults per
step; the driver prints both sides per pair and the ratio off / on (> 1: the setting is faster):

    OMP_NUM_THREADS=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind \
        python docs/results/round12/malloc_ab.py --batch 256 [--compile] --rounds 3
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def child(batch: int, compile_: bool, keep: bool, epochs: int) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_train as bt
    import torch

    import colearn_dist.engine as engine
    from colearn_dist.config import load_config

    if not keep:
        engine.keep_freed_memory = lambda: False  # glibc's defaults
    torch.set_num_threads(1)
    shards = bt.prepare_shards(Path(tempfile.gettempdir()) / "colearn-bench-train")
    cfg = load_config(bt.CONFIG, bt.overrides(shards, Path(tempfile.mkdtemp()), bt.FIVE, batch, compile_))
    trainer = engine.Trainer(cfg)
    trainer.stop.install()
    steps = len(trainer.train_loader)
    ms, faults = [], []
    for epoch in range(epochs):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        trainer._train_epoch()
        trainer.epoch += 1
        if epoch >= 2:
            ms.append((time.perf_counter() - t0) / steps * 1000)
            faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / steps)
    print(json.dumps({"ms": statistics.median(ms), "faults": statistics.median(faults)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--child", choices=["off", "on"])
    a = p.parse_args()
    if a.child:
        child(a.batch, a.compile, a.child == "on", a.epochs)
        return
    ratios = []
    for _ in range(a.rounds):
        side = {}
        for keep in ("off", "on"):
            argv = [sys.executable, __file__, "--child", keep, "--batch", str(a.batch), "--epochs", str(a.epochs)]
            out = subprocess.run(argv + (["--compile"] if a.compile else []), capture_output=True, text=True, env=os.environ, check=True)
            side[keep] = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        ratios.append(side["off"]["ms"] / side["on"]["ms"])
        print(f"off {side['off']['ms']:.2f} ms/step ({side['off']['faults']:,.0f} faults/step), "
              f"on {side['on']['ms']:.2f} ({side['on']['faults']:,.0f}): {ratios[-1]:.3f}", flush=True)  # fmt: skip
    print(f"batch {a.batch}{', compiled' if a.compile else ''}: off / on median {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
