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

# --------------------------------------------------------------------------------------------
# Part 1: sharding
# The one synthetic generator (shared and sensor-specific factors, chunk by chunk): colearn_dist.synthetic.
from colearn_dist.synthetic import write_synthetic_archive  # noqa: E402


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
    shard_bytes = sum(
        p.stat().st_size for s in ("train", "val", "test") for p in (manifest.path / sh["name"] for sh in manifest.splits[s]["shards"])
    )
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


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float, str]:
    """Run `cmd` while sampling the summed memory of its process tree every 50 ms.

    Returns (seconds, peak tree RSS MB, peak tree PSS MB, stdout)."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak = [0, 0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            try:
                rss, pss = _tree_memory(ps)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], pss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, err = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return time.perf_counter() - t0, peak[0] / 2**20, peak[1] / 2**20, stdout


def run_sharding(archive: Path, out: Path, *, workers: int, progress: bool = False) -> dict:
    """Shard in a fresh subprocess while sampling the summed RSS of its process tree."""
    cmd = [sys.executable, __file__, "_shard", str(archive), str(out), "--workers", str(workers)]
    if progress:
        cmd.append("--progress")
    _, rss, pss, stdout = run_measured(cmd)
    result = json.loads(stdout.strip().splitlines()[-1])
    result["tree_peak_rss_mb"] = rss
    result["tree_peak_pss_mb"] = pss
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
