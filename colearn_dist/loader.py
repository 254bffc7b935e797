"""Shards → batches: the WebDataset pipeline, the rank/worker split, normalisation, resumable position.

How one epoch is read
---------------------
1. *Stream.* The split's shards are put in an order — a permutation seeded by (seed, epoch) when
   shuffling, else manifest order — and their samples are concatenated into one stream of
   positions 0..N-1 (position = rank in that order, counted inside each tar).
2. *Plan* (`plan_epoch`, pure arithmetic). The stream is cut into contiguous ranges, one per rank,
   then each rank's range into contiguous runs of whole batches, one per DataLoader worker
   ("reader"). Every sample belongs to exactly one reader, so it is read once per epoch.
   - plan "train": every rank does the same number of steps S = max(1, N // (world·batch)); a rank's
     n_r samples (ranks differ by ≤ 1) are cut into S batches whose sizes differ by ≤ 1, so no batch
     is smaller than batch_size (BatchNorm) nor larger than 2·batch_size, and no sample is dropped.
   - plan "eval": per-rank contiguous ranges, batches of exactly batch_size except each rank's last.
3. *Reader.* A reader opens only the shards overlapping its range (read whole, sha256-checked,
   members grouped by key as webdataset does; `_tar_samples` parses the headers itself because
   tarfile's parsing was 75% of the loader's time), keeps the samples at its positions and skips
   the rest without decoding,
   runs the raw (undecoded) samples through a deterministic shuffle buffer seeded by (seed, epoch,
   leg, rank, worker), cuts the buffer's output into its planned batch sizes, then decodes and
   collates each batch with vectorised numpy.
4. *Order.* With `workers` > 0 the torch DataLoader takes batches from its workers round-robin
   (worker 0, 1, …, K-1, 0, …; `in_order=True`), skipping workers that have finished. Worker w owns
   the rank's batches as one contiguous run and runs are sized so the first workers hold at most one
   batch more, so consumer batch k is always batch k // K of worker k % K: the order is
   deterministic and a resumed loader can tell what each worker had already yielded.

Position and resume
-------------------
`position()` is a JSON-able dict: ``{"epoch": e, "batch": k, "samples": n, "legs": [...], ...}``
where k counts batches already yielded to the consumer in epoch e (the batch the consumer holds
counts) and n the samples consumed in epoch e by all ranks together (ranks consume in lockstep in
training). Once the last batch of an epoch is yielded the position becomes (e + 1, 0).

An epoch may be read in several *legs*: a leg is one reading configuration (world size, workers,
batch size, plan, shuffle buffer) and the number of steps taken with it. `set_position` then:
- same configuration as the position's last leg → that leg continues: each reader restarts its
  stream at the epoch start, replays the shuffle buffer over raw samples and drops what its worker
  had yielded (from the round-robin rule) before decoding, so the remaining batches are exactly
  those of an uninterrupted loader, in the same order;
- different configuration (e.g. world size 2 → 1) → the samples every earlier leg consumed are
  recomputed from the plan and a simulation of the shuffle buffers on positions (no shard is read),
  the epoch's remaining samples, in stream order, become the stream of a new leg that is planned and
  split among the new ranks and workers. Nothing is lost or repeated.
The seed and shuffle flag must not change mid-epoch (they define the stream); a position that says
otherwise is refused. ``{"epoch": e, "batch": k}`` alone is read as k steps with this loader's
configuration.

Memory cache and read-ahead
---------------------------
With `cache_bytes` > 0 and a split whose decoded size (estimated from the manifest) fits, the first
`iter()` reads and decodes every sample of the split once (in-process, manifest order) and keeps the
normalised tensors; every batch after that is a row gather from them. The batches are the same, in
the same order, as the readers would yield: each reader's rows are its planned positions in the
order its shuffle buffer emits them (`buffer_order`, the same draws) and readers interleave
round-robin exactly as the DataLoader does. No worker process is started then. A split with
unreadable samples in skip mode is not cached (the streaming path keeps its accounting).
Without the cache and `workers` = 0, a thread reads `prefetch` batches ahead of the consumer.

Corrupt shards
--------------
`on_corrupt="error"`: a tar, checksum (`verify`) or decode failure raises `CorruptShardError`
naming the shard. `on_corrupt="skip"`: the unreadable samples are dropped — their places in the
plan are kept (placeholders flow through the shuffle buffer), so step counts stay equal across
ranks and positions stay exact; batches that lost samples are smaller. Each batch then carries
``"skipped"`` (samples dropped from it), the loader warns once per shard (`RuntimeWarning`) and
adds the count to `loader.skipped`; both work with workers because the counts travel in batches.
The trainer logs each damaged shard and the skipped count (train.log, TensorBoard
`train/data/skipped_samples`) and skips, on every rank at once, a batch left with fewer than 2
samples (BatchNorm). A shard whose sha256 differs is dropped whole: without per-sample checksums
none of its samples can be trusted.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import multiprocessing
import queue
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds

from .batch import denormalise, norm_stats, normalise
from .manifest import Modality, load_manifest

PLANS = ("train", "eval")
_LEG_KEYS = ("world_size", "workers", "batch_size", "plan", "shuffle_buffer")


class CorruptShardError(OSError):
    """A shard that cannot be read as the manifest describes it; the message names the shard."""


# --------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class ReaderPlan:
    """One reader's share of a rank: stream indices [start, stop) cut into `batch_sizes`."""

    worker: int
    start: int
    stop: int
    batch_sizes: tuple[int, ...]


@dataclass(frozen=True)
class RankPlan:
    rank: int
    start: int
    stop: int
    batch_sizes: tuple[int, ...]
    readers: tuple[ReaderPlan, ...]

    @property
    def num_batches(self) -> int:
        return len(self.batch_sizes)


def split_evenly(n: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous pieces of `n`, differing by ≤ 1, larger ones first."""
    if parts < 1:
        raise ValueError(f"cannot split {n} into {parts} parts")
    base, extra = divmod(n, parts)
    return [base + (i < extra) for i in range(parts)]


def plan_epoch(
    num_samples: int,
    *,
    batch_size: int,
    world_size: int = 1,
    workers: int = 0,
    plan: str = "train",
) -> list[RankPlan]:
    """The batches of every rank and reader for a stream of `num_samples` (see the module docstring).

    Indices are positions in the stream; readers = max(workers, 1) per rank. Worker w of a rank
    gets a contiguous run of its batches; run lengths differ by ≤ 1, longer runs first, which keeps
    the DataLoader's round-robin order equal to "batch k is worker k % K's batch k // K".
    """
    if batch_size < 1 or world_size < 1 or workers < 0:
        raise ValueError(f"bad plan arguments: batch_size={batch_size}, world_size={world_size}, workers={workers}")
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    if plan == "train" and num_samples < world_size:
        raise ValueError(f"plan 'train' needs at least one sample per rank: {num_samples} sample(s) for world size {world_size}")
    rank_sizes = split_evenly(num_samples, world_size)
    steps = max(1, num_samples // (world_size * batch_size))
    readers = max(workers, 1)
    out = []
    start = 0
    for rank, n in enumerate(rank_sizes):
        if plan == "train":
            sizes = split_evenly(n, steps)
        else:
            sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
        runs = split_evenly(len(sizes), readers)
        reader_plans = []
        b0, s0 = 0, start
        for w, run in enumerate(runs):
            bs = tuple(sizes[b0 : b0 + run])
            reader_plans.append(ReaderPlan(w, s0, s0 + sum(bs), bs))
            b0 += run
            s0 += sum(bs)
        out.append(RankPlan(rank, start, start + n, tuple(sizes), tuple(reader_plans)))
        start += n
    return out


def batches_yielded_per_reader(consumed: int, readers: int) -> list[int]:
    """How many batches each reader had yielded when the consumer had taken `consumed` (round-robin)."""
    return [max(0, (consumed - w + readers - 1) // readers) for w in range(readers)]


def consumed_per_reader(rank: RankPlan, steps: int) -> list[int]:
    """Samples each reader of `rank` had delivered after the consumer took `steps` batches."""
    done = batches_yielded_per_reader(min(steps, rank.num_batches), len(rank.readers))
    return [sum(r.batch_sizes[:k]) for r, k in zip(rank.readers, done)]


def shard_order(num_shards: int, *, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The epoch's shard order: a permutation by (seed, epoch) when shuffling, else manifest order."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng(_derive(seed, "shards", epoch)).permutation(num_shards).tolist()


def _derive(*parts: Any) -> int:
    """A 63-bit seed from any tuple, stable across processes and Python versions (unlike hash())."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _reader_seed(seed: int, epoch: int, leg: int, rank: int, worker: int) -> int:
    return _derive(seed, "buffer", epoch, leg, rank, worker)


def _shuffled(items: Iterator[Any], bufsize: int, seed: int) -> Iterator[Any]:
    """webdataset's shuffle buffer, full before the first output; its draws depend only on counts,
    so running it on positions predicts what it does to samples."""
    return wds.shuffle(bufsize, bufsize, seed=seed)(iter(items))


def buffer_order(n: int, bufsize: int, seed: int, limit: int | None = None) -> np.ndarray:
    """Which of `n` inputs the shuffle buffer emits first, second, … (the first `limit` of them)."""
    it = _shuffled(iter(range(n)), bufsize, seed)
    return np.fromiter(itertools.islice(it, limit if limit is not None else n), dtype=np.int64)


# ---------------------------------------------------------------------------------------- decoding
@dataclass(frozen=True)
class _DecodeSpec:
    """Everything a reader process needs to decode; small and picklable (spawn)."""

    modalities: tuple[Modality, ...]
    norms: tuple[tuple[np.ndarray, np.ndarray] | None, ...]  # per modality: batch.norm_stats
    task: str
    target_shape: tuple[int, ...]
    has_month: bool
    month_shape: tuple[int, ...]
    skip_corrupt: bool
    has_latlon: bool = False


_NPY_LAYOUTS: dict[bytes, tuple[np.dtype, tuple[int, ...], int, int]] = {}


def _load_npy(raw: dict[str, Any], member: str) -> np.ndarray:
    """np.load(..., allow_pickle=False), with its header parse (ast.literal_eval, most of its cost)
    done once per distinct header: every sample of a modality shares one, so the rest is a view."""
    if member not in raw:
        raise KeyError(f"member {member!r} missing")
    b = raw[member]
    if b[:6] != b"\x93NUMPY" or b[6] not in (1, 2, 3):
        return np.load(io.BytesIO(b), allow_pickle=False)  # not .npy: np.load says why
    size = 2 if b[6] == 1 else 4
    offset = 8 + size + int.from_bytes(b[8 : 8 + size], "little")
    layout = _NPY_LAYOUTS.get(b[:offset])
    if layout is None:
        arr = np.load(io.BytesIO(b), allow_pickle=False)
        if arr.dtype.hasobject or not arr.flags.c_contiguous or len(_NPY_LAYOUTS) > 1024:
            return arr
        _NPY_LAYOUTS[bytes(b[:offset])] = (arr.dtype, arr.shape, offset, int(arr.size))
        return arr
    dtype, shape, offset, count = layout
    if len(b) != offset + count * dtype.itemsize:
        raise ValueError(f"{member}: {len(b) - offset} data bytes, its header says {count * dtype.itemsize}")
    return np.frombuffer(b, dtype=dtype, count=count, offset=offset).reshape(shape)


def _decode_one(
    raw: dict[str, Any], spec: _DecodeSpec
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray | None, dict, np.ndarray | None]:
    arrays = {}
    for m in spec.modalities:
        a = _load_npy(raw, f"{m.name}.npy")
        if a.shape != m.shape:
            raise ValueError(f"{m.name}: shape {a.shape}, manifest says {m.shape}")
        arrays[m.name] = a
    target = _load_npy(raw, "target.npy")
    if target.shape != spec.target_shape:
        raise ValueError(f"target: shape {target.shape}, manifest says {spec.target_shape}")
    month = _load_npy(raw, "month.npy") if spec.has_month else None
    latlon = _load_npy(raw, "latlon.npy") if spec.has_latlon else None
    if latlon is not None and latlon.shape != (2,):
        raise ValueError(f"latlon: shape {latlon.shape}, expected (2,)")
    if "meta.json" not in raw:
        raise KeyError("member 'meta.json' missing")
    meta = json.loads(raw["meta.json"])
    if int(meta["index"]) != int(raw["__key__"].rsplit("/", 1)[-1]):
        raise ValueError(f"meta index {meta['index']} does not match key {raw['__key__']}")
    return arrays, target, month, meta, latlon


def _collate(raws: Sequence[dict[str, Any]], spec: _DecodeSpec) -> dict[str, Any]:
    """Decode a batch of raw samples; stack per field, normalise each field once for the batch."""
    decoded = []
    skipped = 0
    corrupt: list[tuple[str, str]] = []
    for raw in raws:
        if "__corrupt__" in raw:
            skipped += 1
            continue
        try:
            decoded.append(_decode_one(raw, spec))
        except Exception as exc:
            where = f"{raw.get('__url__')}: sample {raw.get('__key__')}: {type(exc).__name__}: {exc}"
            if not spec.skip_corrupt:
                raise CorruptShardError(where) from exc
            skipped += 1
            corrupt.append((str(raw.get("__url__")), f"sample {raw.get('__key__')}: {exc}"))

    b = len(decoded)
    inputs, valid, present = {}, {}, {}
    for m, norm in zip(spec.modalities, spec.norms):
        if b:
            x = np.stack([d[0][m.name] for d in decoded])
        else:
            x = np.zeros((0,) + m.shape, dtype=np.int64 if m.kind == "categorical" else np.float32)
        if norm is None:
            t = torch.from_numpy(x.astype(np.int64, copy=False))
            ok = torch.ones(t.shape, dtype=torch.bool) if m.missing_value is None else t != m.missing_value
        else:
            t, ok = normalise(torch.from_numpy(x.astype(np.float32, copy=False)), torch.from_numpy(norm[0]), torch.from_numpy(norm[1]))
        inputs[m.name] = t
        valid[m.name] = ok
        present[m.name] = ok.reshape(b, int(np.prod(m.shape))).any(dim=1)

    if b:
        target = np.stack([d[1] for d in decoded])
    else:
        target = np.zeros((0,) + spec.target_shape)
    if spec.task == "regression" or spec.task == "multilabel":
        target = target.astype(np.float32, copy=False)
    else:
        target = target.astype(np.int64, copy=False)
    batch: dict[str, Any] = {"inputs": inputs, "valid": valid, "present": present, "target": torch.from_numpy(target)}
    if spec.has_month:
        month = np.stack([d[2] for d in decoded]) if b else np.zeros((0,) + spec.month_shape)  # type: ignore[misc]
        batch["month"] = torch.from_numpy(month.astype(np.int64, copy=False))
    if spec.has_latlon:
        latlon = np.stack([d[4] for d in decoded]) if b else np.zeros((0, 2))  # type: ignore[misc]
        batch["latlon"] = torch.from_numpy(latlon.astype(np.float32))
    batch["index"] = torch.from_numpy(np.array([int(d[3]["index"]) for d in decoded], dtype=np.int64))
    batch["id"] = [str(d[3]["id"]) for d in decoded]
    if spec.skip_corrupt:
        batch["skipped"] = skipped
        batch["_corrupt"] = corrupt
    return batch


# ------------------------------------------------------------------------------------------ reader
@dataclass(frozen=True)
class _ReaderTask:
    """What one reader (rank, worker) reads in one leg of one epoch."""

    shard_paths: tuple[str, ...]  # in stream order
    shard_sha256: tuple[str, ...]
    shard_starts: np.ndarray  # stream position of each shard's first sample, len = shards + 1
    positions: np.ndarray  # sorted stream positions this reader owns
    batch_sizes: tuple[int, ...]
    skip_batches: int  # already yielded before a resume
    shuffle_buffer: int  # ≤ 1: no shuffling
    buffer_seed: int
    members: frozenset[str]
    verify: bool
    spec: _DecodeSpec = field(repr=False)


def _tar_samples(data: bytes, members: frozenset[str], url: str, checksums: bool = True) -> Iterator[dict[str, Any]]:
    """Samples of one tar held in memory: members grouped by key, as webdataset's `tar_file_expander`
    + `group_by_keys` do, at a fraction of the cost (tarfile's header parsing was 75% of the
    loader's time). Truncation is always detected; header checksums are verified unless the caller
    has already checked the whole file's sha256 (`checksums=False`)."""
    off, end = 0, len(data)
    sample: dict[str, Any] = {}
    key = None
    while off + 512 <= end:
        header = data[off : off + 512]
        if header == _ZERO_BLOCK:
            break
        if checksums and int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8) != sum(header) - sum(header[148:156]) + 256:
            raise CorruptShardError(f"tar header checksum mismatch at byte {off}")
        name = header[:100].split(b"\0", 1)[0].decode()
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        off += 512
        if off + size > end:
            raise CorruptShardError(f"tar ends inside member {name!r} (truncated?)")
        if header[156:157] in (b"0", b"\0"):
            k, _, ext = name.partition(".")
            if k != key:
                if sample:
                    yield sample
                key, sample = k, {"__key__": k, "__url__": url}
            if ext in members:
                sample[ext] = data[off : off + size]
        off += (size + 511) // 512 * 512
    if sample:
        yield sample


_ZERO_BLOCK = bytes(512)


def _raw_samples(task: _ReaderTask) -> Iterator[dict[str, Any]]:
    """The reader's raw samples in stream order; unreadable ones become placeholders (skip mode)."""
    shard_idx = np.searchsorted(task.shard_starts, task.positions, side="right") - 1
    for s in np.unique(shard_idx):
        path = task.shard_paths[s]
        wanted = task.positions[shard_idx == s] - task.shard_starts[s]
        expected = int(task.shard_starts[s + 1] - task.shard_starts[s])
        got = 0
        try:
            with open(path, "rb") as f:
                data = f.read()
            if task.verify:
                digest = hashlib.sha256(data).hexdigest()
                if task.shard_sha256[s] and digest != task.shard_sha256[s]:
                    raise CorruptShardError(f"sha256 {digest[:12]}… differs from the manifest's {task.shard_sha256[s][:12]}…")
            samples = _tar_samples(data, task.members, path, checksums=not task.verify)
            last = int(wanted[-1])
            pos = 0
            for offset, raw in enumerate(samples):
                if offset == wanted[pos]:
                    raw["__pos__"] = int(task.shard_starts[s]) + offset
                    got += 1
                    pos += 1
                    yield raw
                if offset >= last:
                    break
            if got < len(wanted):
                raise CorruptShardError(f"tar ends before sample {int(wanted[got])} of the manifest's {expected} (truncated?)")
        except Exception as exc:
            message = str(exc) if isinstance(exc, CorruptShardError) else f"{type(exc).__name__}: {exc}"
            if not task.spec.skip_corrupt:
                raise CorruptShardError(f"{path}: {message}") from exc
            for p in wanted[got:]:
                yield {"__corrupt__": path, "__reason__": message, "__pos__": int(task.shard_starts[s] + p), "__url__": path}


def _read(task: _ReaderTask) -> Iterator[dict[str, Any]]:
    """One reader: raw samples → shuffle buffer → drop consumed (undecoded) → planned batches → decode."""
    stream: Iterator[dict[str, Any]] = _raw_samples(task)
    if task.shuffle_buffer > 1:
        stream = _shuffled(stream, task.shuffle_buffer, task.buffer_seed)
    consumed = sum(task.batch_sizes[: task.skip_batches])
    stream = itertools.islice(stream, consumed, None)
    pending: list[tuple[str, str]] = []
    for size in task.batch_sizes[task.skip_batches :]:
        raws = list(itertools.islice(stream, size))
        if len(raws) != size:
            raise RuntimeError(f"reader got {len(raws)} samples for a planned batch of {size} (loader bug)")
        pending.extend((r["__corrupt__"], r["__reason__"]) for r in raws if "__corrupt__" in r)
        batch = _collate(raws, task.spec)
        if task.spec.skip_corrupt:
            batch["_corrupt"] = list(dict.fromkeys(pending + batch["_corrupt"]))
            pending = []
        yield batch


class _EpochDataset(torch.utils.data.IterableDataset):
    """The DataLoader's view of one leg: DataLoader worker i runs `tasks[i]`."""

    def __init__(self, tasks: list[_ReaderTask]):
        super().__init__()
        self.tasks = tasks

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        yield from _read(self.tasks[info.id if info is not None else 0])


def _no_collate(batch: Any) -> Any:
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def _default_mp_context() -> str:
    # fork starts in milliseconds; it is unsafe on macOS (system frameworks), the default elsewhere.
    if sys.platform == "linux" and "fork" in multiprocessing.get_all_start_methods():
        return "fork"
    return "spawn"


class _Prefetch:
    """Batches of `source` read ahead by a daemon thread (at most `depth` waiting), in order; a reader
    error is raised in the consumer. `_shutdown_workers` (the loader's end-of-iteration hook) stops it."""

    _END = object()

    def __init__(self, source: Iterator[dict[str, Any]], depth: int):
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True, name="shard-prefetch")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[dict[str, Any]]) -> None:
        try:
            for batch in source:
                if not self._put(batch):
                    return
            self._put(self._END)
        except BaseException as exc:  # handed to the consumer
            self._put(exc)

    def __iter__(self) -> _Prefetch:
        return self

    def __next__(self) -> dict[str, Any]:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # stays exhausted
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def _shutdown_workers(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def _decoded_bytes(manifest: Any, modalities: Sequence[str], num_samples: int, month_steps: int) -> int:
    """What a split's decoded batches hold in memory (inputs, valid masks, targets, months, ids), roughly."""
    per_sample = 8 + 64  # index, id string
    for name in modalities:
        meta = manifest.modalities[name]
        size = int(np.prod(meta["shape"]))
        per_sample += size * (8 if meta["kind"] == "categorical" else 4) + size + 1  # values, valid, present
    per_sample += 8 * int(np.prod(manifest.target_shape or (1,)))
    per_sample += 8 * month_steps if manifest.has_month else 0
    return per_sample * num_samples


class _SplitCache:
    """Every sample of a split decoded once, rows in manifest shard order; `take(rows)` is one batch."""

    def __init__(self, parts: list[dict[str, Any]], shard_starts: np.ndarray):
        self.shard_starts = shard_starts  # manifest shard i holds rows shard_starts[i]..shard_starts[i+1]
        first = parts[0]
        self.tensors: dict[str, Any] = {}
        for key, value in first.items():
            if isinstance(value, dict):
                self.tensors[key] = {m: torch.cat([p[key][m] for p in parts]) for m in value}
            elif isinstance(value, torch.Tensor):
                self.tensors[key] = torch.cat([p[key] for p in parts])
        self.ids = [i for p in parts for i in p["id"]]
        self.extra = {k: v for k, v in first.items() if k in ("skipped", "_corrupt")}

    def take(self, rows: np.ndarray) -> dict[str, Any]:
        index = torch.from_numpy(rows)
        batch: dict[str, Any] = {}
        for key, value in self.tensors.items():
            if isinstance(value, dict):
                batch[key] = {m: t.index_select(0, index) for m, t in value.items()}
            else:
                batch[key] = value.index_select(0, index)
        batch["id"] = [self.ids[r] for r in rows.tolist()]
        if "skipped" in self.extra:
            batch["skipped"] = 0
            batch["_corrupt"] = []
        return batch


def _round_robin(streams: list[Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The DataLoader's in-order interleaving of its workers: one batch from each in turn, finished ones skipped."""
    live = list(streams)
    while live:
        for it in list(live):
            try:
                yield next(it)
            except StopIteration:
                live.remove(it)


# ------------------------------------------------------------------------------------------ loader
class ShardLoader:
    """An iterable over the batches of one split for one rank (see the module docstring).

    Each `iter()` continues from `position()`; with `endless` it runs epoch after epoch.
    """

    def __init__(
        self,
        shards_dir: str | Path,
        split: str,
        *,
        batch_size: int,
        modalities: list[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        shuffle: bool | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        plan: Literal["train", "eval"] | None = None,
        endless: bool = False,
        on_corrupt: Literal["error", "skip"] = "error",
        verify: bool = True,
        mp_context: str | None = None,
        cache_bytes: int = 0,
        prefetch: int = 0,
    ):
        self.shards_dir = Path(shards_dir)
        self.manifest = load_manifest(self.shards_dir)
        if split not in self.manifest.splits:
            raise ValueError(f"{self.shards_dir}: no split {split!r}; the manifest has {sorted(self.manifest.splits)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        if workers < 0:
            raise ValueError(f"workers must be ≥ 0, got {workers}")
        if cache_bytes < 0 or prefetch < 0:
            raise ValueError(f"cache_bytes and prefetch must be ≥ 0, got {cache_bytes} and {prefetch}")
        if on_corrupt not in ("error", "skip"):
            raise ValueError(f"on_corrupt must be 'error' or 'skip', got {on_corrupt!r}")
        self.split = split
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.workers = int(workers)
        self.shuffle = (split == "train") if shuffle is None else bool(shuffle)
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.plan = plan or ("train" if split == "train" else "eval")
        if self.plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, got {self.plan!r}")
        self.endless = bool(endless)
        self.on_corrupt = on_corrupt
        self.verify = bool(verify)
        self.mp_context = mp_context or _default_mp_context()
        self.cache_bytes = int(cache_bytes)
        self.prefetch = int(prefetch)
        self._cache: _SplitCache | None = None
        self._cache_tried = False

        known = list(self.manifest.modalities)
        self.modalities = list(modalities) if modalities else known
        unknown = [m for m in self.modalities if m not in self.manifest.modalities]
        if unknown:
            raise ValueError(f"{self.shards_dir}: unknown modalit(y/ies) {unknown}; the shards have {known}")
        self._shards = list(self.manifest.splits[split]["shards"])
        self._spec = self._decode_spec()
        members = {f"{m}.npy" for m in self.modalities} | {"target.npy", "meta.json"}
        if self.manifest.has_month:
            members.add("month.npy")
        if self.manifest.has_latlon:
            members.add("latlon.npy")
        self._members = frozenset(members)

        self.skipped = 0  # samples dropped as unreadable (on_corrupt="skip"), all readers of this rank
        self.corrupt_shards: dict[str, str] = {}  # shard path → first reason seen
        self._epoch = 0
        self._legs: list[dict[str, Any]] = []  # finished legs of the current epoch
        self._leg_steps = 0  # steps of the current leg (its config is this loader's)

    # ------------------------------------------------------------------ public properties
    @property
    def num_samples(self) -> int:
        """Samples in the split (all ranks)."""
        return int(self.manifest.splits[self.split]["num_samples"])

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (a resumed epoch yields only what remains)."""
        return self._rank_plan(self.num_samples).num_batches

    def _leg_config(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "workers": self.workers,
            "batch_size": self.batch_size,
            "plan": self.plan,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def _rank_plan(self, n: int, rank: int | None = None) -> RankPlan:
        return plan_epoch(n, batch_size=self.batch_size, world_size=self.world_size, workers=self.workers, plan=self.plan)[
            self.rank if rank is None else rank
        ]

    # ------------------------------------------------------------------ normalisation
    def _decode_spec(self) -> _DecodeSpec:
        mods = tuple(self.manifest.modality(name) for name in self.modalities)
        steps = [tuple(m["shape"])[:1] for m in self.manifest.modalities.values() if m["kind"] in ("series", "categorical")]
        return _DecodeSpec(
            modalities=mods,
            norms=tuple(norm_stats(self.manifest, m.name) for m in mods),
            task=self.manifest.task,
            target_shape=tuple(self.manifest.target_shape or ()),
            has_month=bool(self.manifest.has_month),
            month_shape=steps[0] if steps else (0,),
            skip_corrupt=self.on_corrupt == "skip",
            has_latlon=bool(self.manifest.has_latlon),
        )

    def denormalise(self, modality: str, x: Any, valid: Any = None) -> np.ndarray:
        """Raw units from loader inputs (for tests and export); NaN where `valid` is False.

        Categorical inputs are raw codes already and come back unchanged (as int64)."""
        t = x.detach().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
        norm = norm_stats(self.manifest, modality)
        if norm is None:
            return t.numpy().astype(np.int64, copy=True)
        ok = None if valid is None else (valid.detach().cpu() if isinstance(valid, torch.Tensor) else torch.as_tensor(np.asarray(valid)))
        return denormalise(t, torch.from_numpy(norm[0]), torch.from_numpy(norm[1]), ok).numpy()

    # ------------------------------------------------------------------ position
    def position(self) -> dict[str, Any]:
        """Where the consumer is: JSON-able, to store in a checkpoint (see the module docstring)."""
        legs = [dict(leg) for leg in self._legs]
        if self._leg_steps:
            legs.append({**self._leg_config(), "steps": self._leg_steps})
        samples = self._consumed_count(legs)
        return {
            "epoch": self._epoch,
            "batch": sum(leg["steps"] for leg in legs),
            "samples": samples,
            "legs": legs,
            "split": self.split,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }

    def set_position(self, position: dict[str, Any]) -> None:
        """Continue from a saved `position()` (possibly saved with another world size or worker count)."""
        for key, mine in (("seed", self.seed), ("shuffle", self.shuffle), ("split", self.split), ("num_samples", self.num_samples)):
            if key in position and position[key] != mine:
                raise ValueError(
                    f"loader position has {key}={position[key]!r} but this loader has {mine!r}; "
                    "the epoch's sample stream would differ (resume from the next epoch instead)"
                )
        epoch = int(position["epoch"])
        if epoch < 0:
            raise ValueError(f"loader position: epoch must be ≥ 0, got {epoch}")
        if "legs" in position:
            legs = [dict(leg) for leg in position["legs"]]
            for leg in legs:
                missing = [k for k in (*_LEG_KEYS, "steps") if k not in leg]
                if missing:
                    raise ValueError(f"loader position: a leg lacks {missing}: {leg}")
            if sum(leg["steps"] for leg in legs) != int(position.get("batch", 0)):
                raise ValueError(f"loader position: legs' steps do not add up to batch={position.get('batch')}")
        else:
            batch = int(position.get("batch", 0))
            legs = [{**self._leg_config(), "steps": batch}] if batch else []
        legs = [leg for leg in legs if leg["steps"] > 0]
        # Check the legs are possible (raises on a step count beyond the plan).
        self._remaining(epoch, legs)
        self._epoch = epoch
        if legs and all(legs[-1][k] == v for k, v in self._leg_config().items()):
            self._legs, self._leg_steps = legs[:-1], int(legs[-1]["steps"])
        else:
            self._legs, self._leg_steps = legs, 0
        if legs and self._rank_batches_left() <= 0:
            self._next_epoch()

    def _consumed_count(self, legs: list[dict[str, Any]]) -> int:
        """Samples consumed by all ranks: plan arithmetic only, no shuffle simulation."""
        n = self.num_samples
        left = n
        for leg in legs:
            ranks = plan_epoch(left, **{k: leg[k] for k in _LEG_KEYS if k != "shuffle_buffer"})
            left -= sum(sum(consumed_per_reader(r, leg["steps"])) for r in ranks)
        return n - left

    def _epoch_stream(self, epoch: int) -> tuple[list[int], np.ndarray]:
        order = shard_order(len(self._shards), shuffle=self.shuffle, seed=self.seed, epoch=epoch)
        counts = np.array([int(self._shards[i]["num_samples"]) for i in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return order, starts

    def _leg_plan(
        self, remaining: np.ndarray, leg: dict[str, Any], epoch: int, leg_index: int
    ) -> list[tuple[RankPlan, list[tuple[np.ndarray, int]]]]:
        """Per rank: its plan for one leg, and per reader (stream positions, shuffle-buffer seed)."""
        ranks = plan_epoch(len(remaining), **{k: leg[k] for k in _LEG_KEYS if k != "shuffle_buffer"})
        return [
            (rp, [(remaining[r.start : r.stop], _reader_seed(self.seed, epoch, leg_index, rp.rank, r.worker)) for r in rp.readers])
            for rp in ranks
        ]

    def _remaining(self, epoch: int, legs: list[dict[str, Any]]) -> np.ndarray:
        """Stream positions of epoch `epoch` not consumed by `legs` (in stream order), from the plans
        and a simulation of the shuffle buffers on positions: no shard is read."""
        n = self.num_samples
        remaining = np.arange(n, dtype=np.int64)
        for i, leg in enumerate(legs):
            steps = int(leg["steps"])
            plans = self._leg_plan(remaining, leg, epoch, i)
            most = max(rp.num_batches for rp, _ in plans)
            if steps > most:
                raise ValueError(f"loader position: leg {i} has {steps} steps, its plan only {most}")
            used = np.zeros(n, dtype=bool)
            for rp, readers in plans:
                for (pos, bseed), m in zip(readers, consumed_per_reader(rp, steps)):
                    if not m:
                        continue
                    if self.shuffle and leg["shuffle_buffer"] > 1:
                        used[pos[buffer_order(len(pos), leg["shuffle_buffer"], bseed, limit=m)]] = True
                    else:
                        used[pos[:m]] = True
            remaining = remaining[~used[remaining]]
        return remaining

    def _rank_batches_left(self) -> int:
        base = self._remaining(self._epoch, self._legs)
        if not len(base):
            return 0
        return self._rank_plan(len(base)).num_batches - self._leg_steps

    def _next_epoch(self) -> None:
        self._epoch += 1
        self._legs, self._leg_steps = [], 0

    # ------------------------------------------------------------------ iteration
    def _tasks(self) -> list[_ReaderTask]:
        """This rank's reader tasks for the rest of the current epoch, in DataLoader-worker order."""
        order, starts = self._epoch_stream(self._epoch)
        base = self._remaining(self._epoch, self._legs)
        if not len(base):
            return []
        rp, readers = self._leg_plan(base, self._leg_config(), self._epoch, len(self._legs))[self.rank]
        k = len(readers)
        done = batches_yielded_per_reader(self._leg_steps, k)
        paths = tuple(str(self.shards_dir / self._shards[i]["name"]) for i in order)
        sha = tuple(str(self._shards[i].get("sha256") or "") for i in order)
        # Rotate so DataLoader worker 0 holds the consumer's next batch: round-robin then continues
        # exactly where the interrupted loader stopped.
        first = self._leg_steps % k
        tasks = []
        for i in range(k):
            r = rp.readers[(first + i) % k]
            pos, bseed = readers[r.worker]
            if len(r.batch_sizes) - done[r.worker] <= 0:
                continue  # always a suffix of the rotated order (longer runs first)
            tasks.append(
                _ReaderTask(
                    shard_paths=paths,
                    shard_sha256=sha,
                    shard_starts=starts,
                    positions=pos,
                    batch_sizes=r.batch_sizes,
                    skip_batches=done[r.worker],
                    shuffle_buffer=self.shuffle_buffer if self.shuffle else 0,
                    buffer_seed=bseed,
                    members=self._members,
                    verify=self.verify,
                    spec=self._spec,
                )
            )
        return tasks

    @property
    def cached(self) -> bool:
        """Whether batches come from the in-memory cache (decided at the first `iter()`)."""
        return self._cache is not None

    def cache_size(self) -> int:
        """Bytes the split takes decoded in memory (estimated from the manifest), to compare with `cache_bytes`."""
        return _decoded_bytes(self.manifest, self.modalities, self.num_samples, int(np.prod(self._spec.month_shape)))

    def _fill_cache(self) -> None:
        """Decode the whole split once, if it fits in `cache_bytes` (see the module docstring)."""
        self._cache_tried = True
        if not self.cache_bytes or self.cache_size() > self.cache_bytes:
            return
        counts = np.array([int(sh["num_samples"]) for sh in self._shards], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        n = int(starts[-1])
        if n == 0:
            return
        chunk = 4096
        task = _ReaderTask(
            shard_paths=tuple(str(self.shards_dir / sh["name"]) for sh in self._shards),
            shard_sha256=tuple(str(sh.get("sha256") or "") for sh in self._shards),
            shard_starts=starts,
            positions=np.arange(n, dtype=np.int64),
            batch_sizes=tuple(min(chunk, n - i) for i in range(0, n, chunk)),
            skip_batches=0,
            shuffle_buffer=0,
            buffer_seed=0,
            members=self._members,
            verify=self.verify,
            spec=self._spec,
        )
        parts = list(_read(task))
        if any(p.get("skipped", 0) for p in parts):
            return  # unreadable samples: the streaming path keeps their accounting and warnings
        self._cache = _SplitCache(parts, starts)

    def _cached_batches(self, tasks: list[_ReaderTask]) -> Iterator[dict[str, Any]]:
        """The readers' batches, served from the cache: same rows, same order (see the module docstring)."""
        cache = self._cache
        assert cache is not None
        order, _ = self._epoch_stream(self._epoch)
        # stream shard j is manifest shard order[j]: row of stream position p
        offset = cache.shard_starts[np.asarray(order, dtype=np.int64)] - tasks[0].shard_starts[:-1]

        def reader(task: _ReaderTask) -> Iterator[dict[str, Any]]:
            pos = task.positions
            if task.shuffle_buffer > 1:
                pos = pos[buffer_order(len(pos), task.shuffle_buffer, task.buffer_seed)]
            rows = pos + offset[np.searchsorted(task.shard_starts, pos, side="right") - 1]
            start = sum(task.batch_sizes[: task.skip_batches])
            for size in task.batch_sizes[task.skip_batches :]:
                yield cache.take(rows[start : start + size])
                start += size

        return _round_robin([reader(t) for t in tasks])

    def _epoch_batches(self) -> Iterator[dict[str, Any]]:
        tasks = self._tasks()
        if not tasks:
            return iter(())
        if not self._cache_tried:
            self._fill_cache()
        if self._cache is not None:
            return self._cached_batches(tasks)
        if self.workers == 0:
            return _Prefetch(_read(tasks[0]), self.prefetch) if self.prefetch else _read(tasks[0])
        loader = torch.utils.data.DataLoader(
            _EpochDataset(tasks),
            batch_size=None,
            num_workers=len(tasks),
            collate_fn=_no_collate,
            worker_init_fn=_worker_init,
            multiprocessing_context=self.mp_context,
            persistent_workers=False,
            prefetch_factor=2,
            in_order=True,
            # Its own generator: the DataLoader must not draw from the global RNG, or a run resumed
            # mid-epoch would get different dropout masks than the uninterrupted run.
            generator=torch.Generator().manual_seed(self.seed),
        )
        return iter(loader)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            if self.endless and len(self) == 0:
                raise ValueError(f"{self.split}: no batch for rank {self.rank}; an endless loader would never yield")
            left = self._rank_batches_left()
            if left <= 0:  # this rank has nothing in this epoch (small eval split): the epoch is over
                self._next_epoch()
            else:
                batches = self._epoch_batches()
                try:
                    for batch in batches:
                        self._account(batch)
                        self._leg_steps += 1
                        left -= 1
                        if left == 0:
                            self._next_epoch()  # before yielding: the consumer holding the last batch is at (e + 1, 0)
                        yield batch
                finally:
                    close = getattr(batches, "_shutdown_workers", None)
                    if close is not None:
                        close()
                if left > 0:
                    raise RuntimeError(f"{self.split}: readers ended {left} batch(es) early (loader bug)")
            if not self.endless:
                return

    def _account(self, batch: dict[str, Any]) -> None:
        """Fold corrupt-sample reports from any reader process into this loader (warn once per shard)."""
        for path, reason in batch.pop("_corrupt", ()):
            if path not in self.corrupt_shards:
                self.corrupt_shards[path] = reason
                warnings.warn(f"{path}: corrupt shard, skipping its unreadable samples ({reason})", RuntimeWarning, stacklevel=3)
        self.skipped += int(batch.get("skipped", 0))


__all__ = [
    "CorruptShardError",
    "PLANS",
    "RankPlan",
    "ReaderPlan",
    "ShardLoader",
    "batches_yielded_per_reader",
    "buffer_order",
    "consumed_per_reader",
    "plan_epoch",
    "shard_order",
    "split_evenly",
]
