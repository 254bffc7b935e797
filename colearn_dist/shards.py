"""Archive -> WebDataset tar shards + `manifest.json` (format: docs/DESIGN.md "Shards", shards/README.md).

Why it is built this way:

* Deterministic to the byte: same archive + seed -> same files, whatever the number of workers, so
  a shard's sha256 identifies its content and a rerun can be checked with `verify_shards`.
  Every random draw comes from its own seed stream ([seed, purpose, split, window]), tars are
  written with fixed TarInfo fields, and results are merged in a fixed order.
* Bounded memory: a split's sorted rows are cut into windows of `shuffle_window` samples; a
  worker reads one window from zarr (in chunk-aligned blocks), shuffles it, writes its shards and
  returns only small summaries (shard name, count, sha256, per-band sums). Nothing holds all data.
* The manifest is written last and atomically, so a directory with a manifest is complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from tqdm import tqdm

from .archive import SPLIT_CODES, SPLITS, Archive, channel_axis, modality_array, nan_safe_mean_std, open_archive
from .manifest import MANIFEST_NAME, Manifest, ShardError, load_manifest

KEY_DIGITS = 10
RESERVED_MEMBERS = ("target", "month", "latlon", "meta")

# Seed-stream tags, so every random draw is independent of the others and of the worker count.
_TAG_WINDOW_ORDER = 1
_TAG_WINDOW_SHUFFLE = 2
_TAG_VAL = 3
_NO_SPLIT = 255  # split code of rows outside `row_range`: in no split


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def sample_key(index: int) -> str:
    """The WebDataset key of an archive row; fixed width so keys sort like rows."""
    return f"{int(index):0{KEY_DIGITS}d}"


def _write_json_atomic(file: Path, data: dict[str, Any]) -> None:
    tmp = file.with_name(f".{file.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, file)


# --------------------------------------------------------------------------------------------
# Worker side: one window -> its shards


@dataclass
class _ModInfo:
    name: str
    kind: str


@dataclass
class _Window:
    """One unit of parallel work: a window of one split's rows (sorted), and where its shards start."""

    archive: str
    out_dir: str
    split: str
    window: int
    rows: np.ndarray
    has_group: bool
    first_shard: int
    seed: int
    samples_per_shard: int
    modalities: list[_ModInfo]
    task: str
    has_month: bool
    with_stats: bool
    has_latlon: bool = False


@dataclass
class _WindowResult:
    shards: list[tuple[str, int, str]]
    band_sums: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None
    target_sums: dict[str, Any] | None


_GROUPS: dict[tuple[int, str], zarr.Group] = {}


def _group(path: str) -> zarr.Group:
    """One open zarr group per process (keyed by pid, so a forked worker never reuses the parent's)."""
    key = (os.getpid(), path)
    if key not in _GROUPS:
        _GROUPS[key] = zarr.open_group(path, mode="r")
    return _GROUPS[key]


def _take(arr: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """arr[rows] for sorted rows, reading contiguous slices inside chunk-aligned blocks.

    A window of a sparse split can span much of the archive; reading block by block keeps the
    memory at one block plus the window, and each zarr chunk is decoded once.
    """
    chunk = int(arr.chunks[0])
    block = chunk * max(1, 8192 // chunk)
    pieces = []
    i = 0
    while i < len(rows):
        end_of_block = (int(rows[i]) // block + 1) * block
        j = int(np.searchsorted(rows, end_of_block, side="left"))
        lo, hi = int(rows[i]), int(rows[j - 1]) + 1
        data = np.asarray(arr[lo:hi])
        pieces.append(data[rows[i:j] - lo])
        i = j
    if not pieces:
        return np.empty((0,) + tuple(arr.shape[1:]), dtype=arr.dtype)
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


_HEADERS: dict[tuple[str, tuple[int, ...]], bytes] = {}


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The exact bytes np.save writes before the data, cached: saves a np.save call per member."""
    key = (np.dtype(dtype).str, tuple(shape))
    if key not in _HEADERS:
        buf = io.BytesIO()
        sample = np.zeros(shape, dtype=dtype)
        np.save(buf, sample, allow_pickle=False)
        raw = buf.getvalue()
        _HEADERS[key] = raw[: len(raw) - sample.nbytes]
    return _HEADERS[key]


def _npy_bytes(value: np.ndarray) -> bytes:
    value = np.asarray(value)
    if not value.flags.c_contiguous:  # not np.ascontiguousarray: it turns a 0-d target into shape (1,)
        value = value.copy(order="C")
    return _npy_header(value.dtype, value.shape) + value.tobytes()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    tar.addfile(info, io.BytesIO(payload))


def _band_sums(x: np.ndarray, axis: int = -1, block: int = 1 << 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """NaN-aware float64 sum, sum of squares and count per band (`axis`; images [N, C, H, W]: per channel over H×W).

    Summed `block` values per band at a time, so the float64 temporaries stay a few MB whatever the
    window holds (a window of large image patches would otherwise need several times its own size)."""
    x = np.moveaxis(x, axis, -1)
    x = x.reshape(-1, x.shape[-1])
    total, total_sq, count = (np.zeros(x.shape[-1], np.float64) for _ in range(3))
    for start in range(0, x.shape[0], block):
        part = x[start : start + block].astype(np.float64)
        finite = np.isfinite(part)
        part[~finite] = 0.0
        total += part.sum(axis=0)
        total_sq += np.einsum("ij,ij->j", part, part)
        count += finite.sum(axis=0)
    return total, total_sq, count


def _target_sums(task: str, target: np.ndarray) -> dict[str, Any]:
    if task == "regression":
        s, ss, c = _band_sums(target.reshape(-1, 1))
        return {"sum": s, "sumsq": ss, "count": c}
    if task == "multilabel":
        return {"positive": target.astype(np.int64).sum(axis=0), "num_samples": int(target.shape[0])}
    return {"counts": np.bincount(target.astype(np.int64).ravel())}


def _write_window(w: _Window) -> _WindowResult:
    """Read one window, shuffle it with its own seed stream, write its shards; return summaries."""
    root = _group(w.archive)
    rows = w.rows
    data = {m.name: _take(modality_array(root, m.name), rows) for m in w.modalities}
    target = _take(root["target"], rows)
    month = _take(root["month"], rows).astype(np.int64) if w.has_month else None
    latlon = _take(root["latlon"], rows).astype(np.float64) if w.has_latlon else None
    # Ids and groups are read here, per window, like the data: the parent never holds per-sample strings.
    ids = _take(root["ids"], rows)
    group = _take(root["group"], rows) if w.has_group else None

    result = _WindowResult(shards=[], band_sums=None, target_sums=None)
    if w.with_stats:
        result.band_sums = {m.name: _band_sums(data[m.name], channel_axis(m.kind)) for m in w.modalities if m.kind != "categorical"}
        result.target_sums = _target_sums(w.task, target)

    perm = np.random.default_rng([w.seed, _TAG_WINDOW_SHUFFLE, SPLIT_CODES[w.split], w.window]).permutation(len(rows))
    float_target = w.task == "regression"
    out_dir = Path(w.out_dir)
    for k, start in enumerate(range(0, len(rows), w.samples_per_shard)):
        name = shard_name(w.split, w.first_shard + k)
        picked = perm[start : start + w.samples_per_shard]
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for i in picked:
                row = int(rows[i])
                key = sample_key(row)
                for m in w.modalities:
                    _add(tar, f"{key}.{m.name}.npy", _npy_bytes(data[m.name][i]))
                t = target[i]
                _add(tar, f"{key}.target.npy", _npy_bytes(np.asarray(t, dtype=np.float32) if float_target else np.asarray(t)))
                if month is not None:
                    _add(tar, f"{key}.month.npy", _npy_bytes(month[i]))
                if latlon is not None:
                    _add(tar, f"{key}.latlon.npy", _npy_bytes(latlon[i]))
                meta = {
                    "id": str(ids[i]),
                    "index": row,
                    "group": None if group is None else str(group[i]),
                    "split": w.split,
                }
                _add(tar, f"{key}.meta.json", json.dumps(meta).encode("utf-8"))
        raw = buf.getvalue()
        tmp = out_dir / f".{name}.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, out_dir / name)
        result.shards.append((name, len(picked), hashlib.sha256(raw).hexdigest()))
    return result


# --------------------------------------------------------------------------------------------
# Parent side


def _log(message: str) -> None:
    print(f"write_shards: {message}", file=sys.stderr, flush=True)


def _carve_val(archive: Archive, split: np.ndarray, val_fraction: float, seed: int) -> dict[str, Any]:
    """Move about `val_fraction` of train into val, whole groups at a time when there are groups.

    Changes `split` in place; returns the manifest's `val_split` record.
    """
    train_code, val_code = SPLIT_CODES["train"], SPLIT_CODES["val"]
    if (split == val_code).any():
        return {"source": "archive", "by": None, "fraction": None, "num_groups": None}
    if val_fraction <= 0:
        _log("archive has no val split and val_fraction is 0: no val split")
        return {"source": "none", "by": None, "fraction": 0.0, "num_groups": None}
    n_train = int(np.count_nonzero(split == train_code))
    goal = val_fraction * n_train
    rng = np.random.default_rng([seed, _TAG_VAL, 0, 0])
    if archive.has_group:
        # Group codes (4 B per sample), not the group strings, and no row-index array: everything
        # else goes block by block. Groups are ranked by name, as np.unique(group[train]) ranks
        # them, so the random draw below picks the same groups as it always has.
        codes, all_names = archive.group_codes()
        all_counts = np.zeros(len(all_names), dtype=np.int64)
        for lo in range(0, len(split), _BLOCK):
            in_train = split[lo : lo + _BLOCK] == train_code
            all_counts += np.bincount(codes[lo : lo + _BLOCK][in_train], minlength=len(all_names))
        present = sorted(np.flatnonzero(all_counts).tolist(), key=all_names.__getitem__)
        names = [all_names[c] for c in present]
        counts = all_counts[present]
        if len(names) < 2:
            _log(f"archive has no val split and only {len(names)} group: cannot carve a grouped val split; no val split")
            return {"source": "none", "by": "group", "fraction": val_fraction, "num_groups": 0}
        chosen: list[int] = []
        total = 0
        for g in rng.permutation(len(names)):
            if abs(total + counts[g] - goal) < abs(total - goal):
                chosen.append(int(g))
                total += int(counts[g])
        if not chosen:  # every group is bigger than twice the goal: take the one closest to it
            chosen = [int(np.argmin(np.abs(counts - goal)))]
        if len(chosen) == len(names):  # keep at least one group for training
            chosen = chosen[:-1]
        chosen_codes = np.zeros(len(all_names), dtype=bool)
        chosen_codes[np.asarray(present, dtype=np.int64)[chosen]] = True
        moved = 0
        for lo in range(0, len(split), _BLOCK):
            part = split[lo : lo + _BLOCK]  # a view: assigning through it changes `split`
            to_val = (part == train_code) & chosen_codes[codes[lo : lo + _BLOCK]]
            part[to_val] = val_code
            moved += int(to_val.sum())
        del codes
        _log(
            f"archive has no val split: moved {moved} of {n_train} train samples "
            f"({len(chosen)} of {len(names)} groups) to val, grouped by 'group' "
            f"(val_fraction={val_fraction}, seed={seed})"
        )
        return {"source": "carved", "by": "group", "fraction": val_fraction, "num_groups": len(chosen)}
    train = np.flatnonzero(split == train_code)
    k = int(round(goal))
    k = min(max(k, 1), len(train) - 1)
    if k < 1:
        _log("archive has no val split and too few train samples to carve one; no val split")
        return {"source": "none", "by": "random", "fraction": val_fraction, "num_groups": None}
    val_rows = rng.choice(train, size=k, replace=False)
    split[val_rows] = val_code
    _log(f"archive has no val split: moved {k} of {len(train)} random train samples to val (val_fraction={val_fraction}, seed={seed})")
    return {"source": "carved", "by": "random", "fraction": val_fraction, "num_groups": None}


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix two shard sets; with overwrite, remove only files this module writes."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    ours = [p for p in out.iterdir() if p.name == MANIFEST_NAME or _is_our_file(p.name)]
    if ours and not overwrite:
        raise ShardError(f"{out}: already holds shards ({len(ours)} files; pass overwrite=True / --overwrite to replace them)")
    for p in ours:
        p.unlink()


def _is_our_file(name: str) -> bool:
    bare = name[1:-4] if name.startswith(".") and name.endswith(".tmp") else name
    return bare == MANIFEST_NAME or any(bare.startswith(f"{s}-") and bare.endswith(".tar") for s in SPLITS)


def _plan(
    archive: Archive,
    archive_path: str,
    out_dir: str,
    split: np.ndarray,
    *,
    seed: int,
    samples_per_shard: int,
    window_size: int,
    mods: list[_ModInfo],
    has_month: bool,
    has_latlon: bool = False,
) -> tuple[dict[str, list[int]], Iterator[_Window]]:
    """Shard counts per window (known up front) and a lazy stream of window tasks."""
    counts: dict[str, list[int]] = {}
    has_group = archive.has_group
    layout: list[tuple[str, int, int, int, int]] = []  # split, window id, start, stop, first shard
    for name in SPLITS:
        code = SPLIT_CODES[name]
        n = int((split == code).sum())
        n_windows = -(-n // window_size)
        order = np.random.default_rng([seed, _TAG_WINDOW_ORDER, code, 0]).permutation(n_windows)
        first = 0
        counts[name] = []
        for w in order.tolist():
            start, stop = w * window_size, min(n, (w + 1) * window_size)
            layout.append((name, w, start, stop, first))
            k = -(-(stop - start) // samples_per_shard)
            counts[name].append(k)
            first += k

    def tasks() -> Iterator[_Window]:
        current, ends = None, np.empty(0, dtype=np.int64)
        for name, w, start, stop, first in layout:
            if name != current:
                current, ends = name, _block_ends(split, SPLIT_CODES[name])
            rows = _split_rows(split, SPLIT_CODES[name], ends, start, stop)
            yield _Window(
                archive=archive_path,
                out_dir=out_dir,
                split=name,
                window=w,
                rows=rows,
                has_group=has_group,
                first_shard=first,
                seed=seed,
                samples_per_shard=samples_per_shard,
                modalities=mods,
                task=archive.task,
                has_month=has_month,
                with_stats=name == "train",
                has_latlon=has_latlon,
            )

    return counts, tasks()


_BLOCK = 1 << 20  # archive rows per block when the parent scans per-sample vectors


def _block_ends(split: np.ndarray, code: int) -> np.ndarray:
    """ends[b] = number of rows with split `code` in blocks 0..b (blocks of `_BLOCK` rows)."""
    counts = [int(np.count_nonzero(split[lo : lo + _BLOCK] == code)) for lo in range(0, len(split), _BLOCK)]
    return np.cumsum(np.asarray(counts, dtype=np.int64))


def _split_rows(split: np.ndarray, code: int, ends: np.ndarray, start: int, stop: int) -> np.ndarray:
    """np.flatnonzero(split == code)[start:stop], reading only the blocks that hold those rows:
    the parent never holds an index array as long as a split (8 B per sample)."""
    if stop <= start:
        return np.empty(0, dtype=np.int64)
    first = int(np.searchsorted(ends, start, side="right"))
    last = int(np.searchsorted(ends, stop - 1, side="right"))
    lo, hi = first * _BLOCK, min(len(split), (last + 1) * _BLOCK)
    before = int(ends[first - 1]) if first > 0 else 0
    rows = np.flatnonzero(split[lo:hi] == code) + lo
    return rows[start - before : stop - before]


def _warm(_: int) -> int:
    return os.getpid()


def _start_pool(workers: int) -> ProcessPoolExecutor | None:
    """Start the worker processes before the archive is opened.

    Forked workers then inherit a small parent (imports only), not its per-sample ids / groups
    or freed-but-unreturned memory: their footprint stays constant with archive size.
    """
    if workers <= 1:
        return None
    # fork starts workers instantly; from 3.12 Python warns about forking a threaded process (zarr
    # runs an IO thread), so use forkserver there. The bytes written do not depend on the method.
    starts = multiprocessing.get_all_start_methods()
    if "fork" in starts and sys.version_info < (3, 12):
        start = "fork"
    else:
        start = "forkserver" if "forkserver" in starts else "spawn"
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context(start))
    if start == "fork":
        list(pool.map(_warm, range(workers)))
    return pool


def _run(tasks: Iterator[_Window], pool: ProcessPoolExecutor | None, workers: int, n_tasks: int, on_done) -> list[_WindowResult]:
    """Run window tasks in plan order, at most 2 x workers queued at once (bounded parent memory)."""
    results: list[_WindowResult | None] = [None] * n_tasks
    if pool is None or n_tasks <= 1:
        for i, task in enumerate(tasks):
            results[i] = _write_window(task)
            on_done(results[i])
        return results  # type: ignore[return-value]
    pending: deque[tuple[int, Future]] = deque()
    try:
        for i, task in enumerate(tasks):
            pending.append((i, pool.submit(_write_window, task)))
            while len(pending) >= 2 * workers:
                j, fut = pending.popleft()
                results[j] = fut.result()
                on_done(results[j])
        while pending:
            j, fut = pending.popleft()
            results[j] = fut.result()
            on_done(results[j])
    except BaseException:
        for _, fut in pending:
            fut.cancel()
        raise
    return results  # type: ignore[return-value]


def _band_stats(
    modality: str, bands: list[str], s: np.ndarray, ss: np.ndarray, c: np.ndarray, where: str
) -> tuple[dict[str, list], dict[str, list]]:
    """Manifest entries of one modality: normalisation stats, and the exact sums they came from
    (kept so that parts sharded by separate jobs can be merged exactly). A band without a single
    value in the train split has no statistics: its raw values would reach the model unscaled."""
    empty = [bands[i] if i < len(bands) else str(i) for i in np.flatnonzero(np.asarray(c) == 0)]
    if empty:
        raise ShardError(
            f"{where}: modality {modality!r}: band(s) {empty} have no valid value in the train split "
            "(all NaN there); drop the band from the archive or fill it"
        )
    mean, std = nan_safe_mean_std(s, ss, c)
    return {"mean": mean.tolist(), "std": std.tolist()}, {"sum": s.tolist(), "sumsq": ss.tolist(), "count": c.tolist()}


def write_shards(
    archive_path: str | Path,
    out_dir: str | Path,
    *,
    samples_per_shard: int = 512,
    seed: int = 0,
    workers: int = 2,
    val_fraction: float = 0.15,
    shuffle_window: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    row_range: tuple[int, int] | None = None,
) -> Manifest:
    """Write the archive's splits as shuffled tar shards and the manifest (see module docstring).

    Train statistics (per band, NaN-aware) are computed while writing, from train rows only
    (a carved val split is excluded), so normalisation never sees val or test.

    `row_range=(start, stop)` shards only archive rows [start, stop): K jobs shard K row ranges
    into K folders and `merge_shards` joins them (docs/PRETRAINING.md). Sample keys are archive
    rows, so the parts' keys never collide.
    """
    if samples_per_shard < 1:
        raise ShardError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not 0 <= val_fraction < 1:
        raise ShardError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ShardError(f"workers must be >= 1, got {workers}")
    if seed < 0:
        raise ShardError(f"seed must be >= 0, got {seed}")
    window_size = int(shuffle_window) if shuffle_window is not None else 16 * samples_per_shard
    if window_size < 1:
        raise ShardError(f"shuffle_window must be >= 1, got {shuffle_window}")

    archive_path = Path(archive_path).resolve()
    if not archive_path.exists():
        open_archive(archive_path)  # raises the archive module's error before any process starts
    pool = _start_pool(workers)
    try:
        return _write_shards(
            archive_path,
            Path(out_dir),
            pool,
            samples_per_shard,
            seed,
            workers,
            val_fraction,
            window_size,
            overwrite,
            progress,
            row_range,
        )
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _write_shards(
    archive_path: Path,
    out: Path,
    pool: ProcessPoolExecutor | None,
    samples_per_shard: int,
    seed: int,
    workers: int,
    val_fraction: float,
    window_size: int,
    overwrite: bool,
    progress: bool,
    row_range: tuple[int, int] | None = None,
) -> Manifest:
    archive = open_archive(archive_path)
    for name in archive.modalities:
        if "." in name or "/" in name or name in RESERVED_MEMBERS:
            raise ShardError(
                f"{archive_path}: modality name {name!r} cannot be a shard member name (no '.', '/', {list(RESERVED_MEMBERS)})"
            )
    _prepare_out(out, overwrite)

    split = archive.split.copy()
    rows = None
    if row_range is not None:
        start, stop = (int(v) for v in row_range)
        if not 0 <= start < stop <= len(split):
            raise ShardError(f"{archive_path}: row range {start}:{stop} is not inside the archive's rows 0:{len(split)}")
        rows = [start, stop]
    # Validation is carved from the WHOLE archive's train split, then restricted to the range: every
    # part makes the same choice, so a site whose rows span two parts is val in both or in neither.
    val_split = _carve_val(archive, split, val_fraction, seed)
    if rows is not None:
        split[: rows[0]] = split[rows[1] :] = _NO_SPLIT  # rows outside the range belong to no split
    mods = [_ModInfo(name, spec.kind) for name, spec in archive.modalities.items()]
    has_month = archive.month is not None
    has_latlon = archive.latlon is not None
    counts, tasks = _plan(
        archive,
        str(archive_path),
        str(out),
        split,
        seed=seed,
        samples_per_shard=samples_per_shard,
        window_size=window_size,
        mods=mods,
        has_month=has_month,
        has_latlon=has_latlon,
    )
    n_tasks = sum(len(c) for c in counts.values())
    n_shards = sum(sum(c) for c in counts.values())

    bar = tqdm(total=n_shards, unit="shard", desc=f"sharding {archive_path.name}", disable=not progress, file=sys.stderr)
    try:
        results = _run(tasks, pool, workers, n_tasks, lambda r: bar.update(len(r.shards)))
    finally:
        bar.close()

    # Results come back in plan order (split, then permuted windows), whatever the worker count.
    splits: dict[str, dict[str, Any]] = {}
    pos = 0
    for name in SPLITS:
        shards = []
        for _ in counts[name]:
            shards.extend({"name": s, "num_samples": n, "sha256": h} for s, n, h in results[pos].shards)
            pos += 1
        shards.sort(key=lambda s: s["name"])
        splits[name] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}

    train_results = [r for r in results if r.band_sums is not None]
    stats = {}
    sums: dict[str, Any] = {}
    for m in mods:
        if m.kind == "categorical":
            continue
        c_bands = archive.array(m.name).shape[channel_axis(m.kind)]
        s, ss, c = (np.zeros(c_bands), np.zeros(c_bands), np.zeros(c_bands))
        for r in train_results:
            s += r.band_sums[m.name][0]
            ss += r.band_sums[m.name][1]
            c += r.band_sums[m.name][2]
        try:
            stats[m.name], sums[m.name] = _band_stats(m.name, list(archive.modalities[m.name].bands), s, ss, c, str(archive_path))
        except ShardError:
            for split_info in splits.values():  # unusable without a manifest: leave nothing behind
                for entry in split_info["shards"]:
                    (out / entry["name"]).unlink(missing_ok=True)
            raise

    manifest = Manifest(
        path=out,
        task=archive.task,
        class_names=list(archive.class_names),
        target_name=archive.target_name,
        target_unit=archive.target_unit,
        target_shape=list(archive.target.shape[1:]),
        modalities={
            name: {
                "shape": list(archive.array(name).shape[1:]),
                "dtype": str(np.dtype(archive.array(name).dtype)),
                **spec.attrs(),
            }
            for name, spec in archive.modalities.items()
        },
        has_month=has_month,
        stats=stats,
        target_stats=_merge_target_stats(archive, [r.target_sums for r in train_results]),
        splits=splits,
        seed=seed,
        samples_per_shard=samples_per_shard,
        archive=str(archive_path),
        shuffle_window=window_size,
        val_split=val_split,
        train_sums={"modalities": sums, "target": _target_sums_json([r.target_sums for r in train_results])},
        rows=rows,
        fold=archive.attrs.get("fold"),
        has_latlon=has_latlon,
    )
    _write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
    if progress:
        _log(f"{out}: " + ", ".join(f"{s} {splits[s]['num_samples']} samples / {len(splits[s]['shards'])} shards" for s in SPLITS))
    return manifest


def _merge_target_stats(archive: Archive, parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    parts = [p for p in parts if p is not None]
    if archive.task == "regression":
        s = sum((p["sum"] for p in parts), np.zeros(1))
        ss = sum((p["sumsq"] for p in parts), np.zeros(1))
        c = sum((p["count"] for p in parts), np.zeros(1))
        mean, std = nan_safe_mean_std(s, ss, c)
        return {"mean": float(mean[0]), "std": float(std[0])}
    if archive.task == "multilabel":
        k = archive.target.shape[1]
        pos = sum((p["positive"] for p in parts), np.zeros(k, dtype=np.int64))
        return {"positive_counts": [int(v) for v in pos], "num_samples": int(sum(p["num_samples"] for p in parts))}
    k = len(archive.class_names) or (2 if archive.task == "binary" else 0)
    k = max([k] + [len(p["counts"]) for p in parts])
    counts = np.zeros(k, dtype=np.int64)
    for p in parts:
        counts[: len(p["counts"])] += p["counts"]
    return {"class_counts": [int(v) for v in counts]}


def _target_sums_json(parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """The train split's target sums as JSON: the additive form of `target_stats`."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return {}
    if "sum" in parts[0]:
        return {key: float(sum(float(p[key][0]) for p in parts)) for key in ("sum", "sumsq", "count")}
    if "positive" in parts[0]:
        k = max(len(p["positive"]) for p in parts)
        pos = np.zeros(k, dtype=np.int64)
        for p in parts:
            pos[: len(p["positive"])] += p["positive"]
        return {"positive_counts": pos.tolist(), "num_samples": int(sum(p["num_samples"] for p in parts))}
    k = max(len(p["counts"]) for p in parts)
    counts = np.zeros(k, dtype=np.int64)
    for p in parts:
        counts[: len(p["counts"])] += p["counts"]
    return {"class_counts": counts.tolist()}


# --------------------------------------------------------------------------------------------
# Merging shards written by separate jobs

_SAME_IN_EVERY_PART = ("task", "class_names", "target_shape", "has_month", "has_latlon")


def merge_shards(out_dir: str | Path, parts: list[str | Path], *, overwrite: bool = False, copy: bool = False) -> Manifest:
    """One shard set from K parts (e.g. K Slurm array jobs over archive row ranges).

    Part i's shard `train-000012.tar` becomes `OUT/train-p{i:03d}-000012.tar` (hard link; a copy
    with `copy=True` or across file systems), so names never collide; train statistics are merged
    exactly from the parts' float64 sums (`train_sums`), never from their means. Parts must share
    task, modalities (kind, shape, bands) and months; row ranges, when recorded, must not overlap.
    """
    out = Path(out_dir)
    if not parts:
        raise ShardError("merge_shards: no part to merge")
    manifests = [load_manifest(p) for p in parts]
    first = manifests[0]
    for m in manifests:
        for key in _SAME_IN_EVERY_PART:
            if getattr(m, key) != getattr(first, key):
                raise ShardError(f"{m.path}: {key} {getattr(m, key)!r} differs from {first.path}'s {getattr(first, key)!r}")
        layout = {k: (v["kind"], v["shape"], v["bands"]) for k, v in m.modalities.items()}
        if layout != {k: (v["kind"], v["shape"], v["bands"]) for k, v in first.modalities.items()}:
            raise ShardError(f"{m.path}: modalities {layout} differ from those of {first.path}")
        if not m.train_sums:
            raise ShardError(f"{m.path}: manifest has no 'train_sums' (written by an older version); shard this part again")
        if m.path.resolve() == out.resolve():
            raise ShardError(f"{out}: the merged folder cannot be one of the parts")
    ranges = sorted((tuple(m.rows), str(m.path)) for m in manifests if m.rows is not None)
    if len({m.archive for m in manifests}) == 1:
        for (a, pa), (b, pb) in zip(ranges, ranges[1:]):
            if b[0] < a[1]:
                raise ShardError(f"{pa} (rows {a[0]}:{a[1]}) and {pb} (rows {b[0]}:{b[1]}) overlap: samples would repeat")
    _prepare_out(out, overwrite)

    splits: dict[str, dict[str, Any]] = {}
    for split in SPLITS:
        shards = []
        for i, m in enumerate(manifests):
            for entry in m.splits[split]["shards"]:
                name = f"{split}-p{i:03d}-{entry['name'].removeprefix(f'{split}-')}"
                _link_or_copy(m.path / entry["name"], out / name, copy)
                shards.append({**entry, "name": name})
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}

    stats, sums = {}, {}
    for name in first.stats:
        s, ss, c = (
            sum(np.asarray(m.train_sums["modalities"][name][k], dtype=np.float64) for m in manifests) for k in ("sum", "sumsq", "count")
        )
        stats[name], sums[name] = _band_stats(name, list(first.modalities[name]["bands"]), s, ss, c, f"merge into {out}")
    target_parts = [m.train_sums.get("target") or {} for m in manifests]
    target_stats, target_sums = _merge_target_json(first.task, [p for p in target_parts if p])

    manifest = Manifest(
        path=out,
        task=first.task,
        class_names=list(first.class_names),
        target_name=first.target_name,
        target_unit=first.target_unit,
        target_shape=list(first.target_shape),
        modalities=dict(first.modalities),
        has_month=first.has_month,
        has_latlon=first.has_latlon,
        stats=stats,
        target_stats=target_stats,
        splits=splits,
        seed=first.seed,
        samples_per_shard=max(m.samples_per_shard for m in manifests),
        archive=first.archive if len({m.archive for m in manifests}) == 1 else "",
        shuffle_window=max(m.shuffle_window for m in manifests),
        val_split={"source": "merged", "parts": [{"path": str(m.path), "rows": m.rows, **m.val_split} for m in manifests]},
        train_sums={"modalities": sums, "target": target_sums},
        rows=None,
    )
    _write_json_atomic(out / MANIFEST_NAME, manifest.to_json())
    return manifest


def _link_or_copy(src: Path, dst: Path, copy: bool) -> None:
    if not src.exists():
        raise ShardError(f"{src}: listed in its manifest but missing")
    if not copy:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass  # another file system, or links not allowed: copy
    shutil.copyfile(src, dst)


def _merge_target_json(task: str, parts: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Merged target_stats and target sums from the parts' JSON target sums."""
    if task == "regression":
        s, ss, c = (np.array([sum(p[k] for p in parts)], dtype=np.float64) for k in ("sum", "sumsq", "count"))
        mean, std = nan_safe_mean_std(s, ss, c)
        return {"mean": float(mean[0]), "std": float(std[0])}, {"sum": float(s[0]), "sumsq": float(ss[0]), "count": float(c[0])}
    key = "positive_counts" if task == "multilabel" else "class_counts"
    k = max((len(p[key]) for p in parts), default=0)
    total = np.zeros(k, dtype=np.int64)
    for p in parts:
        total[: len(p[key])] += np.asarray(p[key], dtype=np.int64)
    merged: dict[str, Any] = {key: total.tolist()}
    if task == "multilabel":
        merged["num_samples"] = int(sum(p["num_samples"] for p in parts))
    return dict(merged), merged


# --------------------------------------------------------------------------------------------
# Verification


def verify_shards(out_dir: str | Path) -> list[str]:
    """Check shards against the manifest; returns the problems found (empty list = all good).

    Checks: every listed shard exists, its sha256 matches, it reads as a tar, its sample count
    matches, every sample has all its members, no sample key appears twice, no unlisted shard.
    """
    try:
        manifest = load_manifest(out_dir)
    except ShardError as exc:
        return [str(exc)]
    out = manifest.path
    expected = {f"{m}.npy" for m in manifest.modalities} | {"target.npy", "meta.json"}
    if manifest.has_month:
        expected.add("month.npy")
    if manifest.has_latlon:
        expected.add("latlon.npy")
    problems: list[str] = []
    seen: dict[str, str] = {}
    listed: set[str] = set()
    for split in SPLITS:
        total = 0
        for entry in manifest.splits[split]["shards"]:
            name = entry["name"]
            listed.add(name)
            file = out / name
            if not file.exists():
                problems.append(f"{file}: missing (listed in the manifest, split {split!r})")
                continue
            digest = hashlib.sha256()
            with open(file, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != entry["sha256"]:
                problems.append(f"{file}: sha256 {digest.hexdigest()[:12]}... does not match the manifest's {entry['sha256'][:12]}...")
            members: dict[str, set[str]] = {}
            try:
                with tarfile.open(file, mode="r:") as tar:
                    for info in tar:
                        key, _, ext = info.name.partition(".")
                        members.setdefault(key, set()).add(ext)
            except (tarfile.TarError, OSError, EOFError) as exc:
                problems.append(f"{file}: cannot be read as a tar ({exc})")
                continue
            if len(members) != entry["num_samples"]:
                problems.append(f"{file}: holds {len(members)} samples, the manifest says {entry['num_samples']}")
            incomplete = []
            for key, exts in members.items():
                if key in seen:
                    problems.append(f"{file}: sample key {key} also appears in {seen[key]}")
                seen[key] = name
                if exts != expected:
                    incomplete.append((key, exts))
            if incomplete:
                key, exts = incomplete[0]
                problems.append(
                    f"{file}: {len(incomplete)} sample(s) with wrong members, e.g. {key} has {sorted(exts)}, expected {sorted(expected)}"
                )
            total += entry["num_samples"]
        if total != manifest.splits[split]["num_samples"]:
            problems.append(
                f"{out / MANIFEST_NAME}: split {split!r} lists {total} samples in shards but num_samples {manifest.splits[split]['num_samples']}"
            )
    for p in sorted(out.glob("*.tar")):
        if p.name not in listed:
            problems.append(f"{p}: shard file not listed in the manifest")
    return problems


__all__ = [
    "merge_shards",
    "sample_key",
    "shard_name",
    "verify_shards",
    "write_shards",
]
