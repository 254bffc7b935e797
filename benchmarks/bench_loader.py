"""Loader throughput: ShardLoader (tar shards, one process, workers=0) next to reading the same
rows straight from the zarr archive, normalised the same way, printed as a ratio in one run.

    python benchmarks/bench_loader.py                      # bundled fuel_moisture, batch 64
    python benchmarks/bench_loader.py --batch-size 256 --epochs 5

Why the comparison: the archive is the random-access source of truth, the shards exist so many
ranks and workers can stream disjoint samples without random access. The zarr figure is what one
process gets by slicing the archive directly (its rows in order, whole batches per slice, and in
random batches); the ratio says what the streaming format costs per process. Both paths end in the
same batch: float32 inputs normalised with the train statistics, NaN → 0, validity masks, torch
tensors.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _normalise(x: np.ndarray, kind: str, stats: dict[str, Any] | None, missing: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loader's normalisation, written out for the zarr path."""
    if kind == "categorical":
        x = x.astype(np.int64)
        ok = np.ones(x.shape, bool) if missing is None else x != missing
        return torch.from_numpy(x), torch.from_numpy(ok)
    x = x.astype(np.float32, copy=True)
    ok = ~np.isnan(x)
    x -= np.asarray(stats["mean"], np.float32)
    x /= np.asarray(stats["std"], np.float32)
    np.copyto(x, 0.0, where=~ok)
    return torch.from_numpy(x), torch.from_numpy(ok)


def zarr_batches(
    archive_path: Path, rows: np.ndarray, batch_size: int, manifest: Any, *, shuffle: bool, seed: int = 0
) -> Iterator[dict[str, Any]]:
    """Batches read straight from the archive: `rows` in order (one slice per batch, then the rows
    picked from it), or in random batches (orthogonal selection of each batch's sorted rows)."""
    from colearn_dist.archive import open_archive

    arc = open_archive(archive_path, check_values=False)
    arrays = {m: arc.array(m) for m in manifest.modalities}
    target, month = arc.target, arc.month
    rows = np.sort(rows)
    if shuffle:
        rows = np.random.default_rng(seed).permutation(rows)

    def take(arr: Any, r: np.ndarray) -> np.ndarray:
        if shuffle:
            return np.asarray(arr.get_orthogonal_selection((np.sort(r),) + (slice(None),) * (arr.ndim - 1)))
        lo, hi = int(r[0]), int(r[-1]) + 1
        return np.asarray(arr[lo:hi])[r - lo]

    for k in range(0, len(rows), batch_size):
        r = rows[k : k + batch_size]
        inputs, valid, present = {}, {}, {}
        for name, arr in arrays.items():
            meta = manifest.modalities[name]
            x, ok = _normalise(take(arr, r), meta["kind"], manifest.stats.get(name), meta.get("missing_value"))
            inputs[name], valid[name] = x, ok
            present[name] = ok.reshape(len(r), -1).any(dim=1)
        batch = {"inputs": inputs, "valid": valid, "present": present, "target": torch.from_numpy(take(target, r).astype(np.float32))}
        if month is not None:
            batch["month"] = torch.from_numpy(take(month, r).astype(np.int64))
        batch["index"] = torch.from_numpy(np.sort(r) if shuffle else r)
        yield batch


def _rate(make: Callable[[], Iterator[dict[str, Any]]], epochs: int) -> tuple[float, int]:
    """Median samples/s over `epochs` timed passes, after one warm-up pass."""
    n = sum(len(b["index"]) for b in make())
    rates = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        count = sum(len(b["index"]) for b in make())
        rates.append(count / (time.perf_counter() - t0))
        assert count == n
    return statistics.median(rates), n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="fuel_moisture", choices=["fuel_moisture", "algae_blooms"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=5, help="timed passes per case (median reported)")
    parser.add_argument("--samples-per-shard", type=int, default=512)
    parser.add_argument("--split", default="train")
    args = parser.parse_args(argv)

    from colearn_dist.importers import bundled_path, import_presto
    from colearn_dist.loader import ShardLoader
    from colearn_dist.shards import write_shards

    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    archive = import_presto(bundled_path(args.dataset), tmp / f"{args.dataset}.zarr")
    manifest = write_shards(archive, tmp / "shards", samples_per_shard=args.samples_per_shard, workers=1, progress=False)
    # the rows of the shard split (a carved val split is not in the archive's split array)
    rows = np.concatenate([b["index"].numpy() for b in ShardLoader(tmp / "shards", args.split, batch_size=1024, shuffle=False)])

    def loader(**kw: Any) -> Callable[[], Iterator[dict[str, Any]]]:
        sl = ShardLoader(tmp / "shards", args.split, batch_size=args.batch_size, workers=0, **kw)
        return lambda: iter(sl)

    cases = [
        ("loader: shuffled (buffer 1000), sha256 verified", loader(shuffle=True, shuffle_buffer=1000, verify=True)),
        ("loader: shard order, no verification", loader(shuffle=False, verify=False)),
        ("zarr: rows in order, one slice per batch", lambda: zarr_batches(archive, rows, args.batch_size, manifest, shuffle=False)),
        ("zarr: random batches (orthogonal selection)", lambda: zarr_batches(archive, rows, args.batch_size, manifest, shuffle=True)),
    ]
    torch.set_num_threads(1)
    results = []
    for name, make in cases:
        rate, n = _rate(make, args.epochs)
        results.append((name, rate, n))
        print(f"  {name:<48} {rate:>10,.0f} samples/s", file=sys.stderr, flush=True)

    base = results[2][1]
    print(
        f"\n{args.dataset} {args.split}: {results[0][2]} samples, batch {args.batch_size}, "
        f"{len(manifest.splits[args.split]['shards'])} shard(s) of ≤ {args.samples_per_shard}; one process, median of {args.epochs} passes"
    )
    print("| case | samples/s | ratio to zarr in order |")
    print("|---|---:|---:|")
    for name, rate, _ in results:
        print(f"| {name} | {rate:,.0f} | {rate / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
