"""Import the netCDF files of the MDiCo reference code (fmenat/MDiCo, written by xarray + h5netcdf).

Layout (netCDF4 = HDF5, read with h5py, no xarray needed):

* dimension / coordinate variable `identifier` [N]: sample ids (strings or integers);
* one variable per view, [N, ...] with dimensions `identifier`, `<view>-D1`, `<view>-D2`, …;
* `target` [N] or [N, K] (dimensions `identifier`, `dim_target`); `train_mask` [N] bool (stored as int8):
  true = train, false = the held-out part (val in the reference code's k-fold; `heldout` says where
  it goes, test by default);
* global attributes `view_names` (older files) or `modality_names`: the views in order, and
  `target_names`: class names (a list) or the target's name (one string, e.g. "lfmc").

The reference scripts write one file per split (`<name>_train.nc`, `<name>_val.nc`, `<name>_test.nc`):
given the train file, its val / test siblings are read too, into the val / test splits. A file with
nothing held out (LFMC, CropHarvest: the paper cross-validates them) gets fold `fold` of a seeded
`folds`-fold partition as its test split.

Views become modalities by rank: [N, C] → static, [N, T, C] → series, [N, H, W, C] → image (the
reference stores aerial patches channels last; the archive wants [N, C, H, W]), [N, T, H, W, C] →
series averaged over pixels. `kinds` overrides (e.g. {"S1Ind": "series"} reads [N, T] as [N, T, 1]).
A requested name "A_B" that is not a view concatenates views A and B along channels, as the reference
code does (the paper's pairs: CropHarvest S1 vs S2_S2VI, LFMC S1_S1Ind vs S2_S2Ind, TreeSatAI-TS
S2_S2mask vs aerial). The views `coords` (lon, lat) and `year` are metadata: `coords` becomes `latlon`.

Views are read into memory whole, as the reference code loads them: fine for CropHarvest and LFMC; for
TreeSatAI-TS at full aerial resolution prefer the `treesatai` importer on the original files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..archive import SPLIT_CODES, SPLITS, TASKS, ArchiveError, ModalitySpec, write_archive
from ._common import kfold_split, nanmean, note, open_h5, shape_text

IDENTIFIER = "identifier"
TARGET = "target"
TRAIN_MASK = "train_mask"
VIEW_ATTRS = ("view_names", "modality_names")
METADATA_VIEWS = ("coords", "year")
KINDS = ("series", "static", "image")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _names(value: Any) -> list[str]:
    """A netCDF attribute holding one string or a list of strings, as a list."""
    if value is None:
        return []
    if isinstance(value, (str, bytes)):
        return [_text(value)]
    return [_text(v) for v in np.asarray(value).ravel().tolist()]


class _File:
    """One reference netCDF file, read fully (views are the size of the dataset, as the reference loads them)."""

    def __init__(self, file: Path, split: str):
        self.file = file
        self.split = split
        what = (
            f"the MDiCo netCDF layout: dimension {IDENTIFIER!r}, one variable per view, {TARGET!r}, {TRAIN_MASK!r}, attribute 'view_names'"
        )
        with open_h5(file, what) as h5:
            attrs = dict(h5.attrs)
            views_attr = next((a for a in VIEW_ATTRS if a in attrs), None)
            if views_attr is None:
                raise ArchiveError(f"{file}: global attribute 'view_names' (or 'modality_names') is missing; expected {what}")
            self.views = _names(attrs[views_attr])
            self.target_names = _names(attrs.get("target_names"))
            if TARGET not in h5:
                raise ArchiveError(f"{file}: variable {TARGET!r} is missing (expected shape [N] or [N, K])")
            self.target = np.asarray(h5[TARGET][()])
            if self.target.ndim not in (1, 2):
                raise ArchiveError(f"{file}: variable {TARGET!r} has shape {shape_text(self.target.shape)}, expected [N] or [N, K]")
            self.n = self.target.shape[0]
            self.ids = self._ids(h5)
            self.train_mask = self._mask(h5)
            self.arrays: dict[str, np.ndarray] = {}
            for view in self.views:
                if view not in h5:
                    raise ArchiveError(
                        f"{file}: variable {view!r} is missing (listed in attribute {views_attr!r}); expected shape [N, ...]"
                    )
                arr = np.asarray(h5[view][()])
                if arr.ndim < 1 or arr.shape[0] != self.n:
                    raise ArchiveError(
                        f"{file}: variable {view!r} has shape {shape_text(arr.shape)}, expected [{self.n}, ...] "
                        f"(N = {self.n} from {TARGET!r})"
                    )
                if arr.dtype.kind not in "fiub":
                    raise ArchiveError(f"{file}: variable {view!r} has dtype {arr.dtype}, expected numbers")
                self.arrays[view] = arr

    def _ids(self, h5: Any) -> np.ndarray:
        if IDENTIFIER not in h5:
            return np.array([f"{self.file.stem}:{i}" for i in range(self.n)])
        raw = np.asarray(h5[IDENTIFIER][()])
        if raw.shape != (self.n,):
            raise ArchiveError(f"{self.file}: variable {IDENTIFIER!r} has shape {shape_text(raw.shape)}, expected [{self.n}]")
        ids = np.array([_text(v) for v in raw.tolist()])
        if len(np.unique(ids)) != self.n:
            raise ArchiveError(f"{self.file}: variable {IDENTIFIER!r} has duplicate sample ids")
        return ids

    def _mask(self, h5: Any) -> np.ndarray:
        if TRAIN_MASK not in h5:
            return np.ones(self.n, dtype=bool)
        mask = np.asarray(h5[TRAIN_MASK][()])
        if mask.shape != (self.n,) or not set(np.unique(mask).tolist()) <= {0, 1}:
            raise ArchiveError(
                f"{self.file}: variable {TRAIN_MASK!r} must be [{self.n}] of 0/1 (bool), got {mask.dtype} {shape_text(mask.shape)}"
            )
        return mask.astype(bool)


def _siblings(src: Path) -> list[tuple[Path, str]]:
    """The file itself (split "train"), plus `_val` / `_test` siblings of a `_train` file."""
    files = [(src, "train")]
    if re.search(r"train", src.name):
        for split in ("val", "test"):
            other = src.with_name(src.name.replace("train", split, 1))
            if other.exists():
                files.append((other, split))
    return files


def _modality(name: str, arr: np.ndarray, kind: str | None, where: str) -> tuple[np.ndarray, str]:
    """A view as the archive wants it, [N, ...] float, with its kind."""
    arr = arr.astype(np.float32)
    if kind is None:
        kind = {2: "static", 3: "series", 4: "image", 5: "series"}.get(arr.ndim)
        if kind is None:
            raise ArchiveError(
                f"{where}: view {name!r} has shape {shape_text(arr.shape)}; expected [N, C], [N, T, C], [N, H, W, C] or [N, T, H, W, C]"
            )
    if kind == "series":
        if arr.ndim == 2:
            return arr[:, :, None], kind
        if arr.ndim == 3:
            return arr, kind
        if arr.ndim == 5:
            return nanmean(arr, axis=(2, 3)), kind
    elif kind == "static":
        if arr.ndim == 2:
            return arr, kind
        if arr.ndim == 1:
            return arr[:, None], kind
    elif kind == "image":
        if arr.ndim == 4:
            return np.moveaxis(arr, -1, 1), kind
    else:
        raise ArchiveError(f"{where}: kind {kind!r} for view {name!r} is not one of {list(KINDS)}")
    layouts = {"series": "[N, T], [N, T, C] or [N, T, H, W, C]", "static": "[N] or [N, C]", "image": "[N, H, W, C]"}
    raise ArchiveError(f"{where}: view {name!r} has shape {shape_text(arr.shape)}, expected {layouts[kind]} for kind {kind!r}")


def _kinds(kinds: Mapping[str, str] | str | Path | None) -> dict[str, str]:
    """view → kind, from a mapping or a YAML file."""
    where = "kinds"
    if isinstance(kinds, (str, Path)):
        where = str(kinds)
        path = Path(kinds)
        if not path.is_file():
            raise ArchiveError(f"{path}: no such YAML file (view → kind)")
        try:
            kinds = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ArchiveError(f"{path}: not valid YAML ({exc})") from exc
    kinds = kinds or {}
    if not isinstance(kinds, Mapping):
        raise ArchiveError(f"{where}: expected a mapping view → kind ({' | '.join(KINDS)}), got {kinds!r}")
    for name, kind in kinds.items():
        if kind not in KINDS:
            raise ArchiveError(f"{where}: key {name!r}: kind {kind!r} is not one of {list(KINDS)}")
    return {str(k): str(v) for k, v in kinds.items()}


def _infer_task(target: np.ndarray, target_names: list[str]) -> str:
    if target.ndim == 2 and target.shape[1] > 1:
        return "multilabel"
    values = target.ravel()
    if values.dtype.kind == "f" and not np.all(np.isfinite(values) & (values == np.round(values))):
        return "regression"
    if values.dtype.kind == "f" and len(target_names) <= 1:
        return "regression"
    return "binary" if set(np.unique(values).tolist()) <= {0, 1} and len(target_names) <= 2 else "multiclass"


def import_mdico_netcdf(
    src: str | Path,
    out_path: str | Path,
    *,
    modalities: Sequence[str] | None = None,
    kinds: Mapping[str, str] | str | Path | None = None,
    task: str | None = None,
    heldout: str = "test",
    folds: int = 10,
    fold: int = 0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write an archive from a reference netCDF file (and its val / test siblings); see the module docstring."""
    src = Path(src)
    if task is not None and task not in TASKS:
        raise ArchiveError(f"task {task!r} is not one of {list(TASKS)}")
    if heldout not in SPLITS:
        raise ArchiveError(f"heldout must be one of {list(SPLITS)}, got {heldout!r}")
    files = [_File(f, split) for f, split in _siblings(src)]
    first = files[0]
    if len(files) > 1:
        note("mdico_netcdf", "also reading " + ", ".join(f"{f.file.name} ({f.split})" for f in files[1:]))
    for f in files[1:]:
        if f.views != first.views:
            raise ArchiveError(f"{f.file}: views {f.views} differ from {first.file}'s {first.views}")
    kinds = _kinds(kinds)
    where = str(first.file)
    wanted = list(modalities) if modalities else [v for v in first.views if v not in METADATA_VIEWS]
    unknown_kinds = sorted(set(kinds) - set(wanted))
    if unknown_kinds:
        raise ArchiveError(f"{where}: kinds given for {unknown_kinds}, which are not imported modalities ({wanted})")

    def view(name: str) -> np.ndarray:
        return np.concatenate([f.arrays[name] for f in files])

    mods: dict[str, tuple[np.ndarray, ModalitySpec]] = {}
    for name in wanted:
        if "." in name or "/" in name:
            raise ArchiveError(f"{where}: modality name {name!r} must not contain '.' or '/'")
        parts = [name] if name in first.views else name.split("_")
        missing = [p for p in parts if p not in first.views]
        if missing:
            raise ArchiveError(f"{where}: view {missing[0]!r} is missing (requested {name!r}); views are {first.views}")
        pieces = [_modality(p, view(p), kinds.get(name), where) for p in parts]
        kind = pieces[0][1]
        arrays = [a for a, _ in pieces]
        axis = 1 if kind == "image" else -1
        try:
            if any(k != kind for _, k in pieces):
                raise ValueError("different kinds")
            data = np.concatenate(arrays, axis=axis) if len(arrays) > 1 else arrays[0]
        except ValueError:
            shapes = {p: f"{k} {shape_text(a.shape)}" for p, (a, k) in zip(parts, pieces)}
            raise ArchiveError(f"{where}: cannot concatenate views {parts} for {name!r} along channels: {shapes}") from None
        bands = tuple(f"{p}_{i}" for p, a in zip(parts, arrays) for i in range(a.shape[axis]))
        mods[name] = (data, ModalitySpec(name, kind, bands, time_step="step" if kind == "series" else None))

    target = np.concatenate([f.target for f in files])
    task = task or _infer_task(target, first.target_names)
    if task != "multilabel" and target.ndim == 2:
        if target.shape[1] != 1:
            raise ArchiveError(f"{where}: variable {TARGET!r} has shape {shape_text(target.shape)}; task {task!r} needs [N] or [N, 1]")
        target = target[:, 0]
    class_names: tuple[str, ...] = ()
    target_name = "target"
    if task == "regression" or (len(first.target_names) == 1 and task != "multilabel"):
        target_name = first.target_names[0] if first.target_names else "target"
    else:
        class_names = tuple(first.target_names)
    if task in ("binary", "multiclass") and target.dtype.kind == "f":
        target = target.astype(np.int64)

    split = np.concatenate(
        [
            np.where(f.train_mask, SPLIT_CODES["train"], SPLIT_CODES[heldout]) if f.split == "train" else np.full(f.n, SPLIT_CODES[f.split])
            for f in files
        ]
    ).astype(np.uint8)
    if (split == SPLIT_CODES["train"]).all():
        # Nothing held out (the reference k-fold files): the paper cross-validates, so hold out one fold.
        split = kfold_split(len(split), folds, fold, seed, where=where)
        note("mdico_netcdf", f"{where}: no held-out samples; test = fold {fold} of {folds} (random, seed {seed})")
    ids = np.concatenate([f.ids for f in files])
    if len(np.unique(ids)) != len(ids):
        raise ArchiveError(f"{where}: sample ids repeat across {[f.file.name for f in files]}")
    latlon = None
    if "coords" in first.views:
        coords = view("coords").astype(np.float64)
        if coords.ndim == 2 and coords.shape[1] == 2:
            latlon = coords[:, ::-1]  # the reference stores (lon, lat)
    return write_archive(
        out_path,
        mods,
        target=target,
        task=task,
        split=split,
        ids=ids,
        class_names=class_names,
        latlon=latlon,
        target_name=target_name,
        description=f"MDiCo reference netCDF imported from {', '.join(f.file.name for f in files)}",
        overwrite=overwrite,
    )


__all__ = ["import_mdico_netcdf"]
