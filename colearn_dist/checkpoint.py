"""Checkpoints that survive preemption: atomic, a `latest` pointer, keep the last K.

DeepSpeed writes the model and optimizer state of a tag directory; we add what is needed to continue
*exactly* (step, epoch, loader position, every rank's RNG states, the config and its hash), then a
`complete` marker, and only then move the `latest` pointer. A job killed while writing leaves a
directory without the marker, which is never loaded and is removed by the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "complete"
LATEST = "latest"
UNIVERSAL = "_universal"


class CheckpointError(RuntimeError):
    pass


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass
class Checkpointer:
    """Saves and finds checkpoints under `run_dir/checkpoints`."""

    run_dir: Path
    keep: int = 2

    @property
    def root(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def latest(self) -> Path | None:
        """The checkpoint to resume from, or None: the one `latest` points to if it is complete, else
        (pointer lost or pointing at a removed directory) the newest complete one, so a damaged pointer
        never silently restarts a run from step 0. An incomplete directory is never returned."""
        pointer = self.root / LATEST
        if pointer.exists():
            tag_dir = self.root / pointer.read_text().strip()
            if (tag_dir / COMPLETE).exists():
                return tag_dir
        complete = [p for p in self._tags() if (p / COMPLETE).exists()]
        return complete[-1] if complete else None

    def _tags(self) -> list[Path]:
        """Checkpoint directories in step order (universal conversions live beside them, not counted)."""
        return sorted(p for p in self.root.glob("step*") if p.is_dir() and not p.name.endswith(UNIVERSAL))

    @staticmethod
    def tag(step: int) -> str:
        return f"step{step:09d}"

    def save(self, engine: Any, step: int, state: dict[str, Any], tensors: dict[str, Any] | None = None) -> Path:
        """Collective: every rank calls it. `state` is the same on every rank (step, epoch, loader, config);
        `tensors` (name → a dict of tensors and numbers, the same on every rank, e.g. the weight
        average) are written by rank 0 as `extra_<name>.pt` before the checkpoint is marked complete."""
        tag = self.tag(step)
        tag_dir = self.root / tag
        rank = _rank()
        if rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a half-written earlier attempt at the same step
        _barrier()
        # universal_checkpoint_info lets DeepSpeed's ds_to_universal re-partition ZeRO optimizer
        # state for another world size (see `to_universal`).
        client = {"colearn": state, "universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
        engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
        torch.save(rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
        _barrier()
        if rank == 0:
            for name, value in (tensors or {}).items():
                torch.save(value, tag_dir / f"extra_{name}.pt")
            (tag_dir / "state.json").write_text(json.dumps(_jsonable(state), indent=1))
            (tag_dir / COMPLETE).write_text("")
            _write_atomic(self.root / LATEST, tag)
            self._prune(keep_tag=tag)
        _barrier()
        return tag_dir

    def load(self, engine: Any, tag_dir: Path, *, load_optimizer: bool = True) -> dict[str, Any]:
        """Restore model/optimizer/scheduler into `engine`; returns the saved state. RNG states are
        restored for ranks that existed when it was saved (a new rank keeps its fresh seed)."""
        load_path, client = engine.load_checkpoint(
            str(tag_dir.parent),
            tag=tag_dir.name,
            load_optimizer_states=load_optimizer,
            load_lr_scheduler_states=load_optimizer,
        )
        if load_path is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        rng_file = tag_dir / f"rng_rank{_rank():05d}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=False))
        return client["colearn"]

    @staticmethod
    def load_tensors(tag_dir: Path, name: str) -> dict[str, Any] | None:
        """What `save(tensors={name: …})` wrote (tensors and plain values only), or None."""
        path = tag_dir / f"extra_{name}.pt"
        return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None

    def to_universal(self, tag_dir: Path) -> Path:
        """A ZeRO (stage ≥ 1) checkpoint converted with DeepSpeed's `ds_to_universal`, whose optimizer
        state any world size can load (collective; rank 0 converts once, beside the original)."""
        out = tag_dir.with_name(tag_dir.name + UNIVERSAL)
        if _rank() == 0 and not (out / COMPLETE).exists():
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir)]
            cmd += ["--output_folder", str(out), "--num_extract_workers", "1", "--num_merge_workers", "1"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise CheckpointError(f"{tag_dir}: conversion to a universal checkpoint failed:\n{done.stderr[-2000:]}")
            for extra in [*tag_dir.glob("rng_rank*.pt"), *tag_dir.glob("extra_*.pt")]:
                shutil.copy(extra, out / extra.name)
            (out / COMPLETE).write_text("")
        _barrier()
        return out

    def _prune(self, keep_tag: str) -> None:
        """Remove incomplete directories and all but the newest `keep` complete ones (0 keeps all),
        each with its universal conversion."""
        tags = self._tags()
        complete = [p for p in tags if (p / COMPLETE).exists()]
        old = complete[: -self.keep] if self.keep > 0 else []
        for p in tags:
            if p.name != keep_tag and (p not in complete or p in old):
                shutil.rmtree(p, ignore_errors=True)
                shutil.rmtree(p.with_name(p.name + UNIVERSAL), ignore_errors=True)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return repr(obj)
