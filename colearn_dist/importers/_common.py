"""Small pieces the benchmark importers share: HDF5 access with clear errors, k-fold test splits, notes."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..archive import SPLIT_CODES, SPLITS, ArchiveError


def h5py_module(where: str | Path) -> Any:
    """h5py, or an error that says which file needed it (it is a dependency, but a broken install happens)."""
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py is a declared dependency
        raise ArchiveError(f"{where}: reading HDF5 / netCDF4 needs h5py (pip install h5py)") from exc
    return h5py


def open_h5(file: Path, what: str) -> Any:
    """Open an HDF5 file read-only; a missing or unreadable file names itself and what it should hold."""
    h5py = h5py_module(file)
    if not file.exists():
        raise ArchiveError(f"{file}: missing ({what})")
    try:
        return h5py.File(file, "r")
    except OSError as exc:
        raise ArchiveError(f"{file}: cannot read as HDF5 ({exc}); expected {what}") from exc


def shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def kfold_split(n: int, folds: int, fold: int, seed: int, groups: np.ndarray | None = None, where: str = "") -> np.ndarray:
    """Split codes with fold `fold` of a seeded `folds`-fold partition as test, the rest train.

    The MDiCo paper evaluates these benchmarks by 10-fold cross-validation over shuffled samples; one
    archive holds one fold (import again with --fold k for the others). With `groups`, whole groups
    (e.g. LFMC sites) go to one fold, so no site is in both train and test.
    """
    if folds < 2:
        raise ArchiveError(f"{where}: folds must be ≥ 2 (fold {fold} of {folds} is the test split), got {folds}")
    if not 0 <= fold < folds:
        raise ArchiveError(f"{where}: fold must be in 0..{folds - 1}, got {fold}")
    rng = np.random.default_rng(seed)
    split = np.full(n, SPLIT_CODES["train"], dtype=np.uint8)
    if groups is None:
        parts = np.array_split(rng.permutation(n), folds)
        split[parts[fold]] = SPLIT_CODES["test"]
    else:
        names, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
        if len(names) < folds:
            raise ArchiveError(f"{where}: {len(names)} groups cannot make {folds} grouped folds")
        chosen = np.array_split(rng.permutation(len(names)), folds)[fold]
        split[np.isin(inverse, chosen)] = SPLIT_CODES["test"]
    if not (split == SPLIT_CODES["train"]).any():
        raise ArchiveError(f"{where}: fold {fold} of {folds} leaves no train sample ({n} samples)")
    return split


def split_codes(where: str, split: np.ndarray) -> np.ndarray:
    """A user's [N] split (names train/val/test or codes 0/1/2) as archive codes; `where` names the source."""
    if split.ndim != 1:
        raise ArchiveError(f"{where} has shape {list(split.shape)}, expected [N]")
    if split.dtype.kind in "US" or split.dtype.kind == "O":
        split = split.astype(str)
        unknown = sorted(set(split.tolist()) - set(SPLITS))
        if unknown:
            raise ArchiveError(f"{where} has unknown values {unknown}; expected {list(SPLITS)}")
        return np.array([SPLIT_CODES[s] for s in split.tolist()], dtype=np.uint8)
    if split.dtype.kind not in "iub":
        raise ArchiveError(f"{where} has dtype {split.dtype}; expected names {list(SPLITS)} or codes {SPLIT_CODES}")
    unknown = sorted(set(np.unique(split).tolist()) - set(SPLIT_CODES.values()))
    if unknown:
        raise ArchiveError(f"{where} has unknown codes {unknown}; expected {SPLIT_CODES}")
    return split.astype(np.uint8)


def nanmean(x: np.ndarray, axis: int | tuple[int, ...]) -> np.ndarray:
    """np.nanmean without the warning for all-NaN slices: NaN is the right answer there (no observation)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(x, axis=axis)


def note(name: str, message: str) -> None:
    """What an importer dropped or changed, on stderr so stdout keeps the archive summary."""
    print(f"{name}: {message}", file=sys.stderr, flush=True)


__all__ = ["h5py_module", "kfold_split", "nanmean", "note", "open_h5", "shape_text", "split_codes"]
