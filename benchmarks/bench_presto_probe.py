"""Correctness check of our Presto port: frozen encoder + ridge regression, per sensor, other groups masked.

Presto's README (`colearn_dist/bundled/presto_weights/README.md`) reports, on the bundled fuel_moisture
data (geographic test split, no location): test RMSE S1 30.4, S2 31.1, ERA5 27.2, Dynamic World 30.9.
This script embeds every sample with `PrestoEncoder.embed` (raw archive values: mean 0, std 1, so the
encoder applies Presto's own normalisation only), fits sklearn's Ridge (default alpha) on the train
split and scores the test split. Matching figures mean the port (tokens, embeddings, masking, pooling,
normalisation) is right; it tunes nothing.

    python benchmarks/bench_presto_probe.py                       # fuel_moisture, every sensor
    python benchmarks/bench_presto_probe.py --dataset algae_blooms
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from colearn_dist.archive import open_archive
from colearn_dist.importers.presto import bundled_path, import_presto
from colearn_dist.presto import PrestoEncoder

PUBLISHED = {"fuel_moisture": {"s1": 30.4, "s2": 31.1, "era5": 27.2, "dw": 30.9}}


def embeddings(archive, modality: str, batch: int = 512) -> np.ndarray:
    meta = archive.modalities[modality]
    x = np.asarray(archive.array(modality)[:])
    month = torch.from_numpy(np.asarray(archive.month[:]).astype(np.int64)) if archive.month is not None else None
    kind, bands = meta.kind, list(meta.bands)
    ones = None if kind == "categorical" else [0.0] * len(bands)
    enc = PrestoEncoder(
        modality, kind, bands, 1, ones, None if ones is None else [1.0] * len(bands),
        freeze=True, missing_value=meta.missing_value,
    ).eval()  # fmt: skip
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            xb = torch.from_numpy(x[i : i + batch])
            xb = xb.long() if kind == "categorical" else torch.nan_to_num(xb.float())
            out.append(enc.embed(xb, None if month is None else month[i : i + batch]).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fuel_moisture", choices=["fuel_moisture", "algae_blooms"])
    parser.add_argument("--sensors", nargs="*", default=["s1", "s2", "era5", "srtm", "dw"])
    args = parser.parse_args()
    from sklearn.linear_model import Ridge

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = import_presto(bundled_path(args.dataset), Path(tmp) / f"{args.dataset}.zarr")
        archive = open_archive(path)
        y = np.asarray(archive.target[:], dtype=np.float64)
        split = archive.split
        train, test = split == 0, split == 2
        rows = {}
        for m in args.sensors:
            z = embeddings(archive, m)
            pred = Ridge().fit(z[train], y[train]).predict(z[test])
            rmse = float(np.sqrt(np.mean((pred - y[test]) ** 2)))
            rows[m] = {"test_rmse": round(rmse, 2), "published": PUBLISHED.get(args.dataset, {}).get(m)}
            print(json.dumps({"dataset": args.dataset, "sensor": m, **rows[m]}), flush=True)


if __name__ == "__main__":
    main()
