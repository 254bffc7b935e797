"""Prediction throughput of exported sensor models (torch.export .pt2, ONNX on onnxruntime) on CPU.

Trains MDiCo briefly on the bundled fuel_moisture data with the paper's settings
(colearn_dist/configs/fuel_moisture_paper.yaml: the paper's TempCNN model; throughput does not depend on how well it is trained), exports each
sensor in both formats and times batches of `--batch` raw samples (drawn from the archive, NaNs
included) through each file, and through the eager model (normalisation + model.predict) as the
reference. Threads: `--threads` (default 1) for torch and onnxruntime alike.

    python benchmarks/bench_export.py [--sensors s1,s2] [--batch 4096] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONFIG = Path(__file__).resolve().parents[1] / "colearn_dist" / "configs" / "fuel_moisture_paper.yaml"


def train_run(root: Path, epochs: int) -> Path:
    from bench_train import prepare_shards

    from colearn_dist.config import load_config
    from colearn_dist.engine import train

    shards = prepare_shards(root)
    cfg = load_config(
        CONFIG, [f"data.shards={shards}", f"run_dir={root / 'run'}", f"train.epochs={epochs}", "train.threads=1", "data.workers=0"]
    )
    train(cfg)
    return root / "run"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up (graph build, allocations)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sensors", default="s1,s2")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from colearn_dist.archive import open_archive
    from colearn_dist.export import SensorModel, export_sensor, load_exported
    from colearn_dist.runs import load_trained

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = train_run(root, args.epochs)
        archive = open_archive(root / "fm.zarr")
        rows = np.sort(np.random.default_rng(0).integers(0, archive.num_samples, args.batch))
        results = []
        for sensor in args.sensors.split(","):
            x = np.asarray(archive.array(sensor).oindex[rows])
            x = x.astype(np.int64 if archive.modalities[sensor].kind == "categorical" else np.float32)
            month = np.asarray(archive.month.oindex[rows]).astype(np.int64)
            eager = SensorModel(load_trained(run, sensor), sensor).eval()
            m = month if "month" in eager.context else None
            with torch.no_grad():
                args_ = (torch.from_numpy(x), None if m is None else torch.from_numpy(m))
                seconds = timed(lambda f=eager, a=args_: f(*a), args.repeats)
            results.append({"sensor": sensor, "format": "eager", "samples_per_s": round(args.batch / seconds)})
            for fmt in ("pt2", "onnx"):
                model = load_exported(export_sensor(run, sensor, root / f"{sensor}.{fmt}", fmt=fmt))
                seconds = timed(lambda f=model.run, a=(x, m): f(*a), args.repeats)
                results.append({"sensor": sensor, "format": fmt, "samples_per_s": round(args.batch / seconds)})
        for r in results:
            print(json.dumps({**r, "batch": args.batch, "threads": args.threads}))


if __name__ == "__main__":
    main()
