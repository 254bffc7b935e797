"""Import any dataset that can be saved as plain numpy arrays (a folder of `.npy` or one `.npz`).

The array's rank and dtype decide the modality kind, so a user only has to name the arrays:
3-D -> series [N, T, C]; 2-D float -> static [N, C]; 2-D integer/bool -> categorical [N, T] with
num_classes = max + 1. `latlon` and `month`, when present, go to the archive's optional arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..archive import TASKS, ArchiveError, ModalitySpec, write_archive
from ._common import split_codes

OPTIONAL_KEYS = ("latlon", "month")


class _Source:
    """Arrays by key, with a label per key that names the file (and the key inside an .npz)."""

    def __init__(self, src: Path):
        self.src = src
        self.arrays: dict[str, np.ndarray] = {}
        self.labels: dict[str, str] = {}
        if src.is_dir():
            files = sorted(src.glob("*.npy"))
            if not files:
                raise ArchiveError(f"{src}: folder holds no .npy file")
            for file in files:
                self.labels[file.stem] = str(file)
                self.arrays[file.stem] = self._read(lambda f=file: np.load(f, allow_pickle=False), file.stem)
        elif src.is_file() and src.suffix == ".npz":
            try:
                npz = np.load(src, allow_pickle=False)
            except Exception as exc:
                raise ArchiveError(f"{src}: cannot read as .npz ({exc})") from exc
            with npz:
                for key in npz.files:
                    self.labels[key] = f"{src}[{key!r}]"
                    self.arrays[key] = self._read(lambda k=key: npz[k], key)
        else:
            raise ArchiveError(f"{src}: expected a folder of .npy files or one .npz file")

    def _read(self, load, key: str) -> np.ndarray:
        try:
            return np.asarray(load())
        except Exception as exc:  # object arrays (pickles), truncated files, not numpy at all
            raise ArchiveError(f"{self.labels[key]}: cannot read key {key!r} ({exc})") from exc

    def label(self, key: str) -> str:
        return self.labels.get(key, f"{self.src} key {key!r}")

    def get(self, key: str, *, required: bool = False) -> np.ndarray | None:
        if key not in self.arrays:
            if required:
                raise ArchiveError(f"{self.src}: key {key!r} is missing (found {sorted(self.arrays)})")
            return None
        return self.arrays[key]


def _modality(src: _Source, key: str, arr: np.ndarray) -> tuple[np.ndarray, ModalitySpec]:
    where = f"{src.label(key)}: key {key!r}"
    if arr.dtype.kind not in "fiub":
        raise ArchiveError(f"{where} has dtype {arr.dtype}; modalities must be numeric")
    if arr.ndim == 3:
        if arr.dtype.kind != "f":
            arr = arr.astype(np.float32)
        bands = tuple(f"{key}_{i}" for i in range(arr.shape[-1]))
        return arr, ModalitySpec(key, "series", bands)
    if arr.ndim == 2 and arr.dtype.kind == "f":
        bands = tuple(f"{key}_{i}" for i in range(arr.shape[-1]))
        return arr, ModalitySpec(key, "static", bands)
    if arr.ndim == 2:
        if arr.size and arr.min() < 0:
            raise ArchiveError(f"{where} is integer (categorical) but has negative values")
        num_classes = int(arr.max()) + 1 if arr.size else 1
        dtype = np.uint8 if num_classes <= 256 else np.int64
        return arr.astype(dtype), ModalitySpec(key, "categorical", (key,), ("class",), num_classes=num_classes)
    raise ArchiveError(
        f"{where} has shape {list(arr.shape)}; expected [N, T, C] (series), [N, C] float (static) or [N, T] integer (categorical)"
    )


def import_generic(
    src: str | Path,
    out_path: str | Path,
    *,
    modalities: Sequence[str] | None = None,
    task: str,
    target_key: str = "target",
    split_key: str = "split",
    ids_key: str = "ids",
    group_key: str = "group",
    class_names: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Write an archive from numpy arrays; every shape problem is reported before anything is written."""
    src = Path(src)
    if task not in TASKS:
        raise ArchiveError(f"task {task!r} is not one of {list(TASKS)}")
    source = _Source(src)
    reserved = {target_key, split_key, ids_key, group_key, *OPTIONAL_KEYS}
    names = list(modalities) if modalities is not None else [k for k in source.arrays if k not in reserved]
    if not names:
        raise ArchiveError(f"{src}: no modality arrays (found only {sorted(source.arrays)}, which are reserved keys)")
    for name in names:
        if name in reserved:
            raise ArchiveError(f"{src}: key {name!r} is reserved (target / split / ids / group / latlon / month), not a modality")
        if "." in name or "/" in name:
            raise ArchiveError(f"{source.label(name)}: modality name {name!r} must not contain '.' or '/'")
        source.get(name, required=True)

    target = source.get(target_key, required=True)
    n = target.shape[0] if target.ndim else 0
    if target.ndim == 0 or n == 0:
        raise ArchiveError(f"{source.label(target_key)}: key {target_key!r} has shape {list(target.shape)}, expected [N] or [N, K]")

    def expect_n(key: str, arr: np.ndarray) -> None:
        if arr.ndim == 0 or arr.shape[0] != n:
            raise ArchiveError(
                f"{source.label(key)}: key {key!r} has shape {list(arr.shape)}: {arr.shape[0] if arr.ndim else 0} samples, "
                f"but {target_key!r} has {n}"
            )

    mods: dict[str, tuple[np.ndarray, ModalitySpec]] = {}
    for name in names:
        arr = source.arrays[name]
        expect_n(name, arr)
        mods[name] = _modality(source, name, arr)

    split_arr = source.get(split_key)
    if split_arr is None:
        split = np.zeros(n, dtype=np.uint8)
    else:
        expect_n(split_key, split_arr)
        split = split_codes(f"{source.label(split_key)}: key {split_key!r}", split_arr)
    ids = source.get(ids_key)
    if ids is None:
        ids = np.array([str(i) for i in range(n)])
    else:
        expect_n(ids_key, ids)
        ids = ids.astype(str)
        if len(np.unique(ids)) != n:
            raise ArchiveError(f"{source.label(ids_key)}: key {ids_key!r} has duplicate sample ids")
    group = source.get(group_key)
    if group is not None:
        expect_n(group_key, group)
        group = group.astype(str)
    optional = {}
    for key in OPTIONAL_KEYS:
        arr = source.get(key)
        if arr is not None:
            expect_n(key, arr)
            optional[key] = arr
    if "latlon" in optional and optional["latlon"].shape[1:] != (2,):
        raise ArchiveError(f"{source.label('latlon')}: key 'latlon' has shape {list(optional['latlon'].shape)}, expected [N, 2]")
    if "month" in optional and optional["month"].ndim != 2:
        raise ArchiveError(f"{source.label('month')}: key 'month' has shape {list(optional['month'].shape)}, expected [N, T]")

    return write_archive(
        out_path,
        mods,
        target=target,
        task=task,
        split=split,
        ids=ids,
        class_names=tuple(class_names),
        group=group,
        target_name=target_key,
        description=f"imported from {src.name} by import_generic",
        overwrite=overwrite,
        **optional,
    )


__all__ = ["import_generic"]
