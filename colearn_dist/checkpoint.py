"""Checkpoints that survive preemption: atomic, a `latest` pointer, keep the last K.

DeepSpeed writes the model and optimizer state of a tag directory; we add what is needed to continue
*exactly* (step, epoch, loader position, every rank's RNG states, the config and its hash), then a
`complete` marker, and only then move the `latest` pointer. A job killed while writing leaves a
directory without the marker, which is never loaded and is removed by the next save (which says so).

Nothing in a run directory can run code: every `.pt` file is read weights-only (tensors, numbers,
strings, containers), DeepSpeed's own reads included (`weights_only_loads`), and the few plain data
classes DeepSpeed stores are allowlisted by name. The `latest` pointer is a tag name inside
`checkpoints/`; a pointer anywhere else is ignored. A checkpoint that fails to load is named, with
the file, and the run falls back to the newest older one that loads.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import pickle
import random
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

COMPLETE = "complete"
LATEST = "latest"
UNIVERSAL = "_universal"


class CheckpointError(RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names the file."""


_TAG = re.compile(r"step\d{9}")


def _deepspeed_globals() -> list[Any]:
    """The non-tensor objects DeepSpeed 0.19 puts in its checkpoints (ZeRO optimizer state: the loss
    scaler, each parameter's fragment address, the stage enum): plain data, safe to rebuild. Only a
    process that runs DeepSpeed reads its checkpoints; elsewhere (export, evaluate of best/*.pt)
    DeepSpeed is not imported for this, so its start-up notices stay off the command's stdout."""
    if "deepspeed" not in sys.modules:
        return []
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, fragment_address, ZeroStageEnum]


def _numpy_globals() -> list[Any]:
    """What a numpy array needs to unpickle (the numpy RNG state in rng files): arrays of plain
    dtypes only; an object array's items go through the same restricted unpickler."""
    multiarray = importlib.import_module("numpy._core.multiarray")
    return [multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]


def load_weights(path: str | Path, map_location: Any = "cpu") -> Any:
    """`torch.load` weights-only: tensors, numbers, strings, containers (and the allowlisted plain
    data classes). A pickled object that would run code is refused, a damaged file named."""
    try:
        with torch.serialization.safe_globals(_numpy_globals() + _deepspeed_globals()):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((line.strip() for line in first if "GLOBAL" in line or "Unsupported" in line), first[0] if first else "")
        raise CheckpointError(f"{path}: refused, it holds more than weights ({detail})") from exc
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{path}: cannot be read, damaged or truncated ({type(exc).__name__}: {exc})") from exc


_torch_load = torch.load


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every `torch.load` inside reads weights-only through `load_weights`, whatever its caller asks:
    DeepSpeed's checkpoint engine and universal-checkpoint loader call it with weights_only=False."""

    def load(f: Any, map_location: Any = None, *args: Any, **kwargs: Any) -> Any:
        return load_weights(f, map_location=map_location)

    torch.load = load
    try:
        yield
    finally:
        torch.load = _torch_load


def _check_readable(tag_dir: Path) -> None:
    """Cheap integrity check before DeepSpeed reads a directory (so that every rank can agree to fall
    back before any enters a load): each `.pt` file is a whole zip (truncation loses its directory)."""
    for file in sorted(tag_dir.rglob("*.pt")):
        try:
            with zipfile.ZipFile(file) as z:
                z.namelist()
        except (OSError, zipfile.BadZipFile) as exc:
            raise CheckpointError(f"{file}: damaged or truncated ({exc})") from exc


def _no_space(exc: BaseException, where: Path) -> bool:
    """A failed write that ran out of space: ENOSPC/EDQUOT, or torch's zip writer's bare message
    ("unexpected pos", "iostream error") on a device with (almost) no free space left."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return False
    return free < 64 * 2**20


def rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore `rng_state()` (as read back by `load_weights`)."""
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
    # where notes go (a removed incomplete directory, an ignored pointer, a fallback): train.log
    log: Callable[[str], None] = field(default=lambda message: print(message, file=sys.stderr), repr=False)

    @property
    def root(self) -> Path:
        return Path(self.run_dir) / "checkpoints"

    def latest(self) -> Path | None:
        """The checkpoint to resume from, or None (see `candidates`)."""
        found = self.candidates()
        return found[0] if found else None

    def candidates(self) -> list[Path]:
        """Complete checkpoints, the one to resume from first: the one `latest` points to, then the
        others newest first (the fallbacks if it does not load). A lost or damaged pointer falls back
        to the newest complete one, so it never silently restarts a run from step 0; a pointer that
        is not a tag of this run's `checkpoints/` (another run, /etc, a directory) is ignored, said
        so; an incomplete directory is never returned."""
        complete = [p for p in self._tags() if (p / COMPLETE).is_file()][::-1]
        pointer = self.root / LATEST
        if pointer.is_symlink() or pointer.is_dir():
            self.log(f"{pointer}: not a pointer file (a link or a directory); ignored, using the newest complete checkpoint")
        elif pointer.exists():
            try:
                name = pointer.read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                name = f"<unreadable: {exc}>"
            chosen = self.root / name
            if not _TAG.fullmatch(name):
                self.log(f"{pointer}: {name!r} is not a checkpoint of this run; ignored, using the newest complete checkpoint")
            elif chosen in complete:
                complete.remove(chosen)
                complete.insert(0, chosen)
        return complete

    def _tags(self) -> list[Path]:
        """Checkpoint directories in step order (universal conversions live beside them, not counted);
        a link is never one (it could lead out of the run)."""
        return sorted(p for p in self.root.glob("step*") if _TAG.fullmatch(p.name) and p.is_dir() and not p.is_symlink())

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
        try:
            engine.save_checkpoint(str(self.root), tag=tag, client_state=client, save_latest=False)
            torch.save(rng_state(), tag_dir / f"rng_rank{rank:05d}.pt")
            _barrier()
            if rank == 0:
                for name, value in (tensors or {}).items():
                    torch.save(value, tag_dir / f"extra_{name}.pt")
                (tag_dir / "state.json").write_text(json.dumps(_jsonable(state), indent=1))
                (tag_dir / COMPLETE).write_text("")
                _write_atomic(self.root / LATEST, tag)
        except (OSError, RuntimeError) as exc:
            if rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
            previous = self.latest()
            kept = f"; the previous checkpoint {previous.name} is kept" if previous is not None else ""
            if _no_space(exc, self.root):
                raise CheckpointError(f"no space left on {self.root} while writing checkpoint {tag}{kept}") from exc
            raise CheckpointError(f"{tag_dir}: checkpoint could not be written ({type(exc).__name__}: {exc}){kept}") from exc
        if rank == 0:
            self._prune(keep_tag=tag)
        _barrier()
        return tag_dir

    def load(self, engine: Any, tag_dir: Path, *, load_optimizer: bool = True) -> dict[str, Any]:
        """Restore model/optimizer/scheduler into `engine`, weights-only; returns the saved state. RNG
        states are restored for ranks that existed when it was saved (a new rank keeps its fresh seed).
        A damaged or unsafe file raises `CheckpointError` naming it."""
        _check_readable(tag_dir)
        with weights_only_loads():
            try:
                load_path, client = engine.load_checkpoint(
                    str(tag_dir.parent),
                    tag=tag_dir.name,
                    load_optimizer_states=load_optimizer,
                    load_lr_scheduler_states=load_optimizer,
                )
            except CheckpointError:
                raise
            except Exception as exc:  # DeepSpeed's own checks (shapes, missing files)
                raise CheckpointError(f"{tag_dir}: DeepSpeed could not load it ({type(exc).__name__}: {exc})") from exc
        if load_path is None:
            raise CheckpointError(f"{tag_dir}: DeepSpeed could not load this checkpoint (a model or optimizer file is missing)")
        rng_file = tag_dir / f"rng_rank{_rank():05d}.pt"
        if rng_file.exists():
            rng = load_weights(rng_file)
            try:
                set_rng_state(rng)
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{rng_file}: not an RNG state ({type(exc).__name__}: {exc})") from exc
        return client["colearn"]

    @staticmethod
    def load_tensors(tag_dir: Path, name: str) -> dict[str, Any] | None:
        """What `save(tensors={name: …})` wrote (tensors and plain values only), or None."""
        path = tag_dir / f"extra_{name}.pt"
        return load_weights(path) if path.exists() else None

    def state(self, tag_dir: Path) -> dict[str, Any]:
        """The JSON state of a checkpoint (step, epoch, loader, config …), without loading weights."""
        file = tag_dir / "state.json"
        try:
            return json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{file}: cannot be read ({type(exc).__name__}: {exc})") from exc

    def to_universal(self, tag_dir: Path) -> Path:
        """A ZeRO (stage ≥ 1) checkpoint converted with DeepSpeed's `ds_to_universal`, whose optimizer
        state any world size can load (collective; rank 0 converts once, beside the original)."""
        out = tag_dir.with_name(tag_dir.name + UNIVERSAL)
        if _rank() == 0 and not (out / COMPLETE).exists():
            shutil.rmtree(out, ignore_errors=True)
            cmd = [sys.executable, "-c", _UNIVERSAL_MAIN, "--input_folder", str(tag_dir)]
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
                if p not in complete:
                    self.log(f"removed {p}: incomplete checkpoint (no '{COMPLETE}' marker; a save that was interrupted)")
                shutil.rmtree(p, ignore_errors=True)
                shutil.rmtree(p.with_name(p.name + UNIVERSAL), ignore_errors=True)


# DeepSpeed's converter, run with its reads weights-only like ours.
_UNIVERSAL_MAIN = (
    "import runpy, sys; from colearn_dist.checkpoint import weights_only_loads\n"
    "with weights_only_loads(): runpy.run_module('deepspeed.checkpoint.ds_to_universal', run_name='__main__')"
)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (int, float, str, bool)) or obj is None:
        return obj
    return repr(obj)
