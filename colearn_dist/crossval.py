"""k-fold cross-validation over methods × seeds: fold archives → shards → runs → one cross-fold table.

One validation split of a few sites cannot tell methods apart by fractions of an RMSE; k folds give
k paired comparisons, which is what a claim "method A beats B for sensor s" needs (a paired test
over folds, `report.cross_fold`). Every sample of the archive (train, val and test alike) is
assigned to one of k folds — whole groups (sites, location cells) per fold where the archive has
groups, so each test fold shifts geographically like a real deployment; fold i is the test split of
experiment i, and the sharder carves that experiment's validation split out of the other folds the
usual way (grouped). Fold archives are copies of the archive with another `split` array and a
`fold` attribute that the shards' manifest carries on, so `evaluate` knows which runs form one
cross-validation; k copies of the archive is the disk price (fine for the benchmark-sized archives
cross-validation is for).

`inner=True` draws the folds from the archive's train and val samples only and leaves its test
split out of every fold archive: a cross-validation for choosing settings (an epoch rule, a loss
weight) without reading the test split that is scored once at the end.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from .archive import SPLIT_CODES, ArchiveError, open_archive
from .importers._common import kfold_split
from .shards import write_shards
from .sweep import PlannedRun, plan_sweep


def fold_split(archive_path: str | Path, folds: int, fold: int, seed: int = 0, inner: bool = False) -> tuple[np.ndarray, str, np.ndarray]:
    """Split codes of experiment `fold` (its fold as test, every other sample train), how the folds
    were drawn ("group" or "random") and the archive rows they cover (all, or with `inner` the
    rows outside the archive's test split)."""
    archive = open_archive(archive_path, check_values=False)
    rows = np.flatnonzero(np.asarray(archive.split[:]) != SPLIT_CODES["test"]) if inner else np.arange(archive.num_samples)
    groups = None if archive.group is None else np.asarray(archive.group)[rows]
    split = kfold_split(len(rows), folds, fold, seed, groups, where=str(archive_path))
    return split, "group" if groups is not None else "random", rows


def _keep_rows(group: zarr.Group, rows: np.ndarray, num_samples: int) -> None:
    """Keep only `rows` of every per-sample array under `group` (those whose first dimension is
    `sample`; in archives without dimension names, those with `num_samples` rows)."""
    for _, member in group.members():
        if isinstance(member, zarr.Group):
            _keep_rows(member, rows, num_samples)
            continue
        dims = getattr(member.metadata, "dimension_names", None)
        if (dims[0] == "sample") if dims else (member.ndim > 0 and member.shape[0] == num_samples):
            values = member[:][rows]
            member.resize((len(rows), *member.shape[1:]))
            member[:] = values


def write_fold_archive(archive_path: str | Path, out: str | Path, folds: int, fold: int, seed: int = 0, inner: bool = False) -> Path:
    """A copy of the archive whose test split is fold `fold` of `folds` (see the module docstring)."""
    src, out = Path(archive_path), Path(out)
    split, by, rows = fold_split(src, folds, fold, seed, inner)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    root = zarr.open_group(str(out), mode="r+")
    if inner:
        _keep_rows(root, rows, root["split"].shape[0])
    root["split"][:] = split
    root.attrs["fold"] = {"dataset": src.stem, "index": fold, "of": folds, "by": by, "seed": seed, **({"inner": True} if inner else {})}
    open_archive(out)
    return out


def plan_crossval(
    config: str | Path,
    archive: str | Path,
    root: str | Path,
    *,
    folds: int = 10,
    methods: list[str],
    seeds: list[int],
    overrides: list[str] | None = None,
    fold_seed: int = 0,
    inner: bool = False,
    samples_per_shard: int = 256,
    progress: bool = True,
) -> list[PlannedRun]:
    """Fold archives and shards under ROOT/data/, then one sweep per fold under ROOT/fold<i>/."""
    root = Path(root)
    if folds < 2:
        raise ArchiveError(f"--folds must be ≥ 2, got {folds}")
    runs: list[PlannedRun] = []
    for i in range(folds):
        name = f"{Path(archive).stem}-fold{i}"
        shards = root / "data" / name
        if not (shards / "manifest.json").exists():
            fold_archive = write_fold_archive(archive, root / "data" / f"{name}.zarr", folds, i, fold_seed, inner)
            write_shards(fold_archive, shards, samples_per_shard=samples_per_shard, seed=0, progress=progress, overwrite=True)
        sets = [*(overrides or []), f"data.shards={shards}"]
        runs += plan_sweep(config, methods, seeds, sets, root / f"fold{i}")
    return runs
