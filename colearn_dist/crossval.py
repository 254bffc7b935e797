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
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import zarr

from .archive import ArchiveError, open_archive
from .importers._common import kfold_split
from .shards import write_shards
from .sweep import PlannedRun, plan_sweep


def fold_split(archive_path: str | Path, folds: int, fold: int, seed: int = 0) -> tuple[np.ndarray, str]:
    """Split codes of experiment `fold` (its fold as test, every other sample train) and how the folds
    were drawn ("group" or "random")."""
    archive = open_archive(archive_path, check_values=False)
    groups = archive.group
    split = kfold_split(archive.num_samples, folds, fold, seed, groups, where=str(archive_path))
    return split, "group" if groups is not None else "random"


def write_fold_archive(archive_path: str | Path, out: str | Path, folds: int, fold: int, seed: int = 0) -> Path:
    """A copy of the archive whose test split is fold `fold` of `folds` (see the module docstring)."""
    src, out = Path(archive_path), Path(out)
    split, by = fold_split(src, folds, fold, seed)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out)
    root = zarr.open_group(str(out), mode="r+")
    root["split"][:] = split
    root.attrs["fold"] = {"dataset": src.stem, "index": fold, "of": folds, "by": by, "seed": seed}
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
            fold_archive = write_fold_archive(archive, root / "data" / f"{name}.zarr", folds, i, fold_seed)
            write_shards(fold_archive, shards, samples_per_shard=samples_per_shard, seed=0, progress=progress, overwrite=True)
        sets = [*(overrides or []), f"data.shards={shards}"]
        runs += plan_sweep(config, methods, seeds, sets, root / f"fold{i}")
    return runs
