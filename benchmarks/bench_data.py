"""Data-pipeline benchmarks.

Part 1 (sharding): throughput of `write_shards` on the bundled fuel-moisture archive, and peak memory
(parent + worker processes) when sharding large synthetic archives, to show that memory does not
grow with the archive size.

    python benchmarks/bench_data.py --sizes 100000            # bundled + 100k synthetic
    python benchmarks/bench_data.py --sizes 100000 1000000    # + 1M (minutes, ~8 GB of disk)

Each sharding run happens in a fresh subprocess (`_shard` sub-command), so archive generation and
earlier runs do not pollute its memory figures. Peak memory is reported four ways: the sharding
process's own peak RSS (VmHWM), the largest worker's peak RSS (getrusage RUSAGE_CHILDREN), and the
peaks of the summed RSS and summed PSS of the whole process tree (psutil, sampled every 50 ms; PSS
counts pages shared between forked processes once).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------
# Part 1: sharding

SYNTHETIC_MODALITIES = {  # name -> (kind, bands); series get T steps
    "s1": ("series", ("VV", "VH")),
    "s2": ("series", tuple(f"b{i}" for i in range(12))),
    "era5": ("series", ("temperature_2m", "total_precipitation")),
    "srtm": ("static", ("elevation", "slope")),
}


def write_synthetic_archive(
    path: str | Path, n: int, *, t: int = 12, block: int = 50_000, chunk_size: int = 4096, seed: int = 0
) -> Path:
    """Write an n-sample archive block by block, so a 1M-sample archive never sits in memory.

    `write_archive` takes whole arrays, so this creates the zarr arrays of the archive format
    (docs/DESIGN.md) itself and fills them in row blocks; `open_archive` validates the result.
    """
    import zarr

    from colearn_dist.archive import FORMAT, SPLIT_CODES, VERSION, ModalitySpec, open_archive

    path = Path(path)
    root = zarr.open_group(str(path), mode="w")
    root.attrs.update(
        {
            "format": FORMAT,
            "version": VERSION,
            "task": "regression",
            "class_names": [],
            "target_name": "synthetic",
            "target_unit": "",
            "modalities": list(SYNTHETIC_MODALITIES),
            "description": f"synthetic benchmark archive, {n} samples",
        }
    )
    arrays = {}
    for name, (kind, bands) in SYNTHETIC_MODALITIES.items():
        shape = (n, t, len(bands)) if kind == "series" else (n, len(bands))
        arr = root.create_array(f"modalities/{name}", shape=shape, dtype="float32", chunks=(chunk_size,) + shape[1:])
        arr.attrs.update(ModalitySpec(name, kind, bands, time_step="month" if kind == "series" else None).attrs())
        arrays[name] = arr
    target = root.create_array("target", shape=(n,), dtype="float32", chunks=(chunk_size,))
    split = root.create_array("split", shape=(n,), dtype="uint8", chunks=(1 << 20,))
    split.attrs["codes"] = SPLIT_CODES
    string_chunk = 1 << 16
    ids = root.create_array("ids", shape=(n,), dtype=str, chunks=(string_chunk,))
    group = root.create_array("group", shape=(n,), dtype=str, chunks=(string_chunk,))
    block = max(string_chunk, block // string_chunk * string_chunk)  # whole string chunks per write
    rng = np.random.default_rng(seed)
    n_groups = max(2, n // 100)
    for start in range(0, n, block):
        stop = min(n, start + block)
        m = stop - start
        for name, arr in arrays.items():
            x = rng.normal(size=(m,) + arr.shape[1:]).astype(np.float32)
            x[rng.random(x.shape) < 0.02] = np.nan
            arr[start:stop] = x
        target[start:stop] = rng.normal(size=m).astype(np.float32)
        split[start:stop] = np.where(rng.random(m) < 0.2, SPLIT_CODES["test"], SPLIT_CODES["train"]).astype(np.uint8)
        ids[start:stop] = np.array([f"syn{i:08d}" for i in range(start, stop)])
        group[start:stop] = np.array([f"site{g:06d}" for g in rng.integers(0, n_groups, size=m)])
    open_archive(path, check_values=False)
    return path


def _own_peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: after fork+exec, ru_maxrss also counts the
    launching process's RSS at fork time, which would charge the archive generator to the sharder."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _shard_child(args: argparse.Namespace) -> None:
    """Runs in its own process: shard, then report time and getrusage figures as one JSON line."""
    from colearn_dist.shards import write_shards

    t0 = time.perf_counter()
    manifest = write_shards(args.archive, args.out, workers=args.workers, seed=0, overwrite=True, progress=args.progress)
    seconds = time.perf_counter() - t0
    n = sum(manifest.split_size(s) for s in ("train", "val", "test"))
    shard_bytes = sum(p.stat().st_size for s in ("train", "val", "test") for p in manifest.shard_paths(s))
    print(
        json.dumps(
            {
                "samples": n,
                "seconds": seconds,
                "self_maxrss_mb": _own_peak_rss_mb(),
                "children_maxrss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                "shard_gb": shard_bytes / 1e9,
            }
        )
    )


def _tree_memory(proc) -> tuple[int, int]:
    """Summed RSS and PSS of a process tree. RSS counts pages a forked worker shares with its
    parent once per process; PSS splits them, so it is the fairer total."""
    import psutil

    rss = pss = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return rss, pss


def run_sharding(archive: Path, out: Path, *, workers: int, progress: bool = False) -> dict:
    """Shard in a fresh subprocess while sampling the summed RSS of its process tree."""
    import psutil

    cmd = [sys.executable, __file__, "_shard", str(archive), str(out), "--workers", str(workers)]
    if progress:
        cmd.append("--progress")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_rss = peak_pss = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_pss
        while not done.is_set():
            try:
                rss, pss = _tree_memory(ps)
                peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"sharding {archive} failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_peak_rss_mb"] = peak_rss / 2**20
    result["tree_peak_pss_mb"] = peak_pss / 2**20
    return result


def _table(rows: list[dict]) -> str:
    head = [
        "case", "samples", "workers", "seconds", "samples/s",
        "main peak RSS MB", "max worker peak RSS MB", "tree peak RSS MB", "tree peak PSS MB", "shards GB",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['samples']:,} | {r['workers']} | {r['seconds']:.1f} | {r['samples'] / r['seconds']:,.0f} | "
            f"{r['self_maxrss_mb']:.0f} | {r['children_maxrss_mb']:.0f} | {r['tree_peak_rss_mb']:.0f} | "
            f"{r['tree_peak_pss_mb']:.0f} | {r['shard_gb']:.2f} |"
        )
    return "\n".join(lines)


def bench_sharding(sizes: list[int], *, workers: int, tmp: Path, bundled: bool = True, progress: bool = False) -> list[dict]:
    rows = []
    if bundled:
        from colearn_dist.importers import bundled_path, import_presto

        archive = import_presto(bundled_path("fuel_moisture"), tmp / "fuel_moisture.zarr", overwrite=True)
        rows.append({"case": "fuel_moisture (bundled)", "workers": workers, **run_sharding(archive, tmp / "fm_shards", workers=workers)})
        shutil.rmtree(tmp / "fm_shards")
        print(_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    for n in sizes:
        t0 = time.perf_counter()
        archive = write_synthetic_archive(tmp / f"synthetic_{n}.zarr", n)
        print(f"generated {n:,}-sample archive in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        out = tmp / f"synthetic_{n}_shards"
        rows.append({"case": f"synthetic {n:,}", "workers": workers, **run_sharding(archive, out, workers=workers, progress=progress)})
        print(_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        shutil.rmtree(out)
        shutil.rmtree(archive)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("_shard", help=argparse.SUPPRESS)
    child.add_argument("archive")
    child.add_argument("out")
    child.add_argument("--workers", type=int, default=2)
    child.add_argument("--progress", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000], help="synthetic archive sizes (samples)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-bundled", action="store_true", help="skip the bundled fuel-moisture throughput run")
    parser.add_argument("--tmp", type=Path, default=None, help="scratch folder (default: a temporary one, removed after)")
    parser.add_argument("--progress", action="store_true", help="show the sharder's progress bar")
    args = parser.parse_args(argv)
    if args.command == "_shard":
        _shard_child(args)
        return 0
    tmp = args.tmp or Path(tempfile.mkdtemp(prefix="bench_data_"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        rows = bench_sharding(args.sizes, workers=args.workers, tmp=tmp, bundled=not args.no_bundled, progress=args.progress)
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nsharding ({os.cpu_count()} CPUs visible, workers={args.workers})")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
