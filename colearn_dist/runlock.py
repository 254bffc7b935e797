"""One writer per run directory: a lock its trainer holds for as long as it runs.

The lock is `flock(2)` on `run_dir/LOCK`, which the kernel releases when its holder dies (SIGKILL,
a node that reboots), so a stale lock never blocks a restart; the file names the holder (host, pid,
Slurm job) for the message a second writer gets. On a shared filesystem flock must work across
nodes (NFSv4, Lustre mounted with `flock`, GPFS, BeeGFS do).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

LOCK_NAME = "LOCK"
# Locks this process holds: lock file → [fd, holders]. A process may open a run twice (a notebook,
# a test resuming in-process); only another process is a second writer.
_HELD: dict[str, list[int]] = {}


class RunLockedError(RuntimeError):
    """Another process is writing this run; the message names it."""


def _holder() -> dict[str, Any]:
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if array else os.environ.get("SLURM_JOB_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": job, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def describe(holder: dict[str, Any]) -> str:
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}, since {holder.get('since', '?')}"


class RunLock:
    """`acquire()` or `RunLockedError`; `release()` (also when the process ends, by the kernel)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._key: str | None = None
        self.stale: dict[str, Any] | None = None  # the dead holder whose lock was taken over

    def acquire(self) -> None:
        if self._key is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD:
            _HELD[key][1] += 1
            self._key = key
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent}: another process is writing this run ({describe(holder)}); "
                "wait for it to end or cancel it (two writers would corrupt its checkpoints)"
            ) from None
        previous = self._read(fd)
        self.stale = previous or None  # a holder that ended cleanly leaves the file empty
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        os.fsync(fd)
        _HELD[key] = [fd, 1]
        self._key = key

    def release(self) -> None:
        if self._key is None:
            return
        key, self._key = self._key, None
        held = _HELD[key]
        held[1] -= 1
        if held[1] > 0:
            return
        del _HELD[key]
        try:
            os.ftruncate(held[0], 0)
        finally:
            os.close(held[0])  # closing releases the flock

    @staticmethod
    def _read(fd: int) -> dict[str, Any]:
        raw = os.pread(fd, 4096, 0)
        try:
            data = json.loads(raw) if raw.strip() else {}
        except ValueError:
            data = {"host": "?", "pid": "?"}
        return data if isinstance(data, dict) else {}
