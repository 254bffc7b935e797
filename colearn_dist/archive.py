"""The multi-sensor archive: one zarr group, one array per modality (see docs/DESIGN.md).

Everything downstream (sharder, loader, model) trusts what `open_archive` has checked, so every
check lives here and every failure names the array and what is wrong with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

FORMAT = "colearn-archive"
# 2: each modality is a group (`modalities/<name>/<name>` plus coordinates) with named dimensions, so
# `xarray.open_zarr(archive, group="modalities/<name>")` opens it labelled; 1: a bare array
# `modalities/<name>` (still read).
VERSION = 2
# zarr v3 dimension_names of each kind's array (and of the coordinates beside it)
DIMS = {
    "series": ("sample", "time", "band"),
    "static": ("sample", "band"),
    "categorical": ("sample", "time"),
    "image": ("sample", "band", "y", "x"),
}
TASKS = ("binary", "multiclass", "multilabel", "regression")
KINDS = ("series", "static", "categorical", "image")
SPLITS = ("train", "val", "test")
SPLIT_CODES = {name: code for code, name in enumerate(SPLITS)}
# dimension names of the root arrays (`xarray.open_zarr(archive)` opens them as one Dataset)
ROOT_DIMS = {"target": ("sample", "class"), "latlon": ("sample", "latlon"), "month": ("sample", "time")}


class ArchiveError(ValueError):
    """An archive that cannot be used; the message names the file, the array and the problem."""


@dataclass(frozen=True)
class ModalitySpec:
    """What a modality's array holds; stored as the array's attributes."""

    name: str
    kind: str
    bands: tuple[str, ...]
    units: tuple[str, ...] = ()
    time_step: str | None = None
    num_classes: int | None = None
    missing_value: int | None = None
    # what a deployment must feed the sensor's model (the exported model's STAC item says it):
    # instrument or product ("Sentinel-2 MSI") and processing level ("L2A"); "" = not recorded
    sensor: str = ""
    processing_level: str = ""

    def attrs(self) -> dict[str, Any]:
        out = {
            "kind": self.kind,
            "bands": list(self.bands),
            "units": list(self.units) if self.units else [""] * len(self.bands),
            "time_step": self.time_step,
            "num_classes": self.num_classes,
            "missing_value": self.missing_value,
        }
        if self.sensor:
            out["sensor"] = self.sensor
        if self.processing_level:
            out["processing_level"] = self.processing_level
        return out

    @classmethod
    def from_attrs(cls, name: str, attrs: Mapping[str, Any]) -> ModalitySpec:
        return cls(
            name=name,
            kind=attrs.get("kind", ""),
            bands=tuple(attrs.get("bands", ())),
            units=tuple(attrs.get("units", ())),
            time_step=attrs.get("time_step"),
            num_classes=attrs.get("num_classes"),
            missing_value=attrs.get("missing_value"),
            sensor=str(attrs.get("sensor") or ""),
            processing_level=str(attrs.get("processing_level") or ""),
        )


@dataclass
class Archive:
    """An opened, validated archive. Arrays stay lazy (zarr) except the 1-byte `split` codes.

    `ids` and `group` (per-sample strings, ~100 B each in memory) are read from zarr on first
    access and cached: opening an archive of 10^8 samples must not hold 10^8 strings. Code that
    scales with the archive (the sharder) reads them per window, or uses `group_codes()`.
    """

    path: Path
    root: zarr.Group
    task: str
    class_names: tuple[str, ...]
    target_name: str
    target_unit: str
    modalities: dict[str, ModalitySpec]
    split: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    _ids: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    _group: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def num_samples(self) -> int:
        return int(self.split.shape[0])

    @property
    def ids(self) -> np.ndarray:
        """Sample ids (numpy str [N]); read from zarr on first access, then cached."""
        if self._ids is None:
            self._ids = _read_strings(self.root["ids"])
        return self._ids

    @property
    def has_group(self) -> bool:
        return "group" in self.root

    @property
    def group(self) -> np.ndarray | None:
        """Group names (numpy str [N]), None when the archive has none; read on first access, then cached."""
        if self._group is None and self.has_group:
            self._group = _read_strings(self.root["group"])
        return self._group

    def group_codes(self) -> tuple[np.ndarray, list[str]]:
        """(codes, names): `names[codes[i]]` is sample i's group, names in order of first appearance.

        Read chunk by chunk: memory ~4 B per sample plus the distinct names, never all the strings.
        Raises ArchiveError when the archive has no `group` array.
        """
        if not self.has_group:
            raise ArchiveError(f"{self.path}: array 'group' is missing (this archive has no groups)")
        codes = np.empty(self.num_samples, dtype=np.int32)
        lookup: dict[str, int] = {}
        for start, values in _iter_strings(self.root["group"]):
            codes[start : start + len(values)] = [lookup.setdefault(v, len(lookup)) for v in values]
        return codes, list(lookup)

    def array(self, modality: str) -> zarr.Array:
        return modality_array(self.root, modality)

    @property
    def target(self) -> zarr.Array:
        return self.root["target"]

    @property
    def month(self) -> zarr.Array | None:
        return self.root["month"] if "month" in self.root else None

    @property
    def latlon(self) -> zarr.Array | None:
        return self.root["latlon"] if "latlon" in self.root else None

    def split_indices(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == SPLIT_CODES[split])

    def split_counts(self) -> dict[str, int]:
        return {name: int((self.split == code).sum()) for name, code in SPLIT_CODES.items()}


def modality_key(root: zarr.Group, name: str) -> str:
    """Where a modality's array lives: `modalities/<name>/<name>` (version 2), `modalities/<name>` (version 1)."""
    key = f"modalities/{name}"
    return f"{key}/{name}" if isinstance(root.get(key), zarr.Group) else key


def modality_array(root: zarr.Group, name: str) -> zarr.Array:
    return root[modality_key(root, name)]


def create_modality(
    root: zarr.Group, name: str, spec: ModalitySpec, *, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...]
) -> zarr.Array:
    """The modality's (empty) array in its own group, dims named; `add_coordinates` adds the rest."""
    fill = np.nan if np.dtype(dtype).kind == "f" else None  # NaN = missing, the archive's own convention
    dims = DIMS.get(spec.kind)  # a wrong kind or rank is left for open_archive to name
    dims = dims if dims is not None and len(dims) == len(shape) else None
    arr = root.create_array(f"modalities/{name}/{name}", shape=shape, dtype=dtype, chunks=chunks, dimension_names=dims, fill_value=fill)
    arr.attrs.update(spec.attrs())
    return arr


def add_coordinates(root: zarr.Group, chunk_size: int = 1 << 16) -> None:
    """Give every modality group the coordinates xarray labels it with: `sample` (the ids), `band`
    (names), `time` (step index), `month` [sample, time] and `lat` / `lon` where the archive has them.
    Copied from the root arrays chunk by chunk (memory flat in N); costs ~10 B per sample and sensor
    (ids) plus the months and coordinates, small beside the data."""
    n = int(root["split"].shape[0])
    for name in root.attrs["modalities"]:
        group = root[f"modalities/{name}"]
        if not isinstance(group, zarr.Group):
            continue  # a version-1 archive: nothing to label
        arr = group[name]
        kind = arr.attrs["kind"]
        if kind not in DIMS or arr.ndim != len(DIMS[kind]):
            continue  # open_archive names the problem
        coords = []
        ids = group.create_array("sample", shape=(n,), dtype=str, chunks=(min(n, chunk_size),), dimension_names=("sample",))
        for start in range(0, n, chunk_size):
            ids[start : start + chunk_size] = root["ids"][start : start + chunk_size]
        if kind != "categorical":
            bands = list(arr.attrs["bands"])
            group.create_array("band", shape=(len(bands),), dtype=str, dimension_names=("band",))[:] = np.array(bands)
        if kind in ("series", "categorical"):
            steps = int(arr.shape[1])
            group.create_array("time", data=np.arange(steps, dtype=np.int64), dimension_names=("time",)).attrs["long_name"] = "time step"
            if "month" in root and int(root["month"].shape[1]) == steps:
                month = group.create_array(
                    "month", shape=(n, steps), dtype="uint8", chunks=(min(n, chunk_size), steps), dimension_names=("sample", "time")
                )
                month.attrs["long_name"] = "calendar month of the step"
                for start in range(0, n, chunk_size):
                    month[start : start + chunk_size] = np.asarray(root["month"][start : start + chunk_size]).astype(np.uint8)
                coords.append("month")
        if "latlon" in root:
            for axis, key in enumerate(("lat", "lon")):
                c = group.create_array(
                    key, shape=(n,), dtype="float64", chunks=(min(n, chunk_size),), dimension_names=("sample",), fill_value=np.nan
                )
                c.attrs["units"] = "degrees_north" if key == "lat" else "degrees_east"
                for start in range(0, n, chunk_size):
                    c[start : start + chunk_size] = np.asarray(root["latlon"][start : start + chunk_size, axis])
                coords.append(key)
        if coords:
            arr.attrs["coordinates"] = " ".join(coords)  # CF: the non-index coordinates xarray attaches


def channel_axis(kind: str) -> int:
    """Axis of the bands in a modality's [N, ...] array: last, except [N, C, H, W] images (channels first, as torch)."""
    return 1 if kind == "image" else -1


def _chunks(shape: tuple[int, ...], chunk_size: int) -> tuple[int, ...]:
    return (max(1, min(chunk_size, shape[0])),) + tuple(shape[1:])


def _write_strings(root: zarr.Group, key: str, values: Any) -> None:
    """Variable-length UTF-8: the one string type with a zarr v3 specification."""
    values = np.asarray(values).astype(str)
    arr = root.create_array(key, shape=values.shape, dtype=str, chunks=_chunks(values.shape, 1 << 20), dimension_names=("sample",))
    arr[:] = values


def _read_strings(arr: zarr.Array) -> np.ndarray:
    return np.array([str(v) for v in arr[:].tolist()])


_STRING_BATCH = 1 << 16  # strings turned into Python objects at a time


def _iter_strings(arr: zarr.Array) -> Iterator[tuple[int, list[str]]]:
    """(start, strings) of a 1-d string array, one zarr chunk read at a time and handed out in
    batches of `_STRING_BATCH`: memory is one decoded chunk plus one batch of Python strings."""
    n = int(arr.shape[0])
    step = max(1, int(arr.chunks[0]))
    for lo in range(0, n, step):
        block = np.asarray(arr[lo : min(n, lo + step)])
        for i in range(0, len(block), _STRING_BATCH):
            yield lo + i, [str(v) for v in block[i : i + _STRING_BATCH].tolist()]


def _id_hashes(values: list[str]) -> np.ndarray:
    """A 64-bit hash per string (Python's own: equal strings hash equally within a process, which
    is all the duplicate check needs; a collision is confirmed on the strings, never trusted)."""
    return np.fromiter(map(hash, values), dtype=np.int64, count=len(values))


def _find_duplicate_id(arr: zarr.Array) -> str | None:
    """One id that occurs more than once, or None; holds 8 B per id (its hash), not the strings.

    Pass 1 hashes every id; ids whose hash occurs twice are candidates. Pass 2 re-reads only the
    candidates' strings and confirms a real repeat, so a hash collision is never reported.
    """
    n = int(arr.shape[0])
    hashes = np.empty(n, dtype=np.int64)
    for start, values in _iter_strings(arr):
        hashes[start : start + len(values)] = _id_hashes(values)
    hashes.sort()  # in place: the check peaks at 9 B per id (np.unique would copy several times over)
    repeated = hashes[1:] == hashes[:-1]
    colliding = np.unique(hashes[1:][repeated])
    del hashes, repeated
    if len(colliding) == 0:
        return None
    seen: dict[int, set[str]] = {}
    for _, values in _iter_strings(arr):
        h = _id_hashes(values)
        for i in np.flatnonzero(np.isin(h, colliding)).tolist():
            bucket = seen.setdefault(int(h[i]), set())
            if values[i] in bucket:
                return values[i]
            bucket.add(values[i])
    return None


def write_archive(
    path: str | Path,
    modalities: Mapping[str, tuple[np.ndarray, ModalitySpec]],
    *,
    target: np.ndarray,
    task: str,
    split: np.ndarray,
    ids: np.ndarray,
    class_names: tuple[str, ...] | list[str] = (),
    group: np.ndarray | None = None,
    latlon: np.ndarray | None = None,
    month: np.ndarray | None = None,
    target_name: str = "target",
    target_unit: str = "",
    description: str = "",
    chunk_size: int = 4096,
    overwrite: bool = False,
) -> Path:
    """Write an archive and validate it by opening it again, so a bad archive is never left behind silently.

    `split` may hold codes (0/1/2) or the names train/val/test.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ArchiveError(f"{path}: already exists (pass overwrite=True / --overwrite to replace it)")
    split = np.asarray(split)
    if split.dtype.kind in "US":
        unknown = sorted(set(split.tolist()) - set(SPLITS))
        if unknown:
            raise ArchiveError(f"{path}: array 'split' has unknown values {unknown}; expected {list(SPLITS)}")
        split = np.array([SPLIT_CODES[s] for s in split.tolist()], dtype=np.uint8)
    root = zarr.open_group(str(path), mode="w")
    root.attrs.update(
        {
            "format": FORMAT,
            "version": VERSION,
            "task": task,
            "class_names": list(class_names),
            "target_name": target_name,
            "target_unit": target_unit,
            "modalities": list(modalities),
            "description": description,
        }
    )
    for name, (data, spec) in modalities.items():
        data = np.asarray(data)
        if spec.kind != "categorical":
            data = data.astype(np.float32, copy=False)
        arr = create_modality(root, name, spec, shape=data.shape, dtype=data.dtype, chunks=_chunks(data.shape, chunk_size))
        arr[...] = data
    target = np.asarray(target)
    if task == "regression":
        target = target.astype(np.float32)
    elif task == "multilabel":
        target = target.astype(np.uint8)
    else:
        target = target.astype(np.int64)
    root.create_array("target", data=target, chunks=_chunks(target.shape, chunk_size), dimension_names=ROOT_DIMS["target"][: target.ndim])
    root.create_array("split", data=split.astype(np.uint8), chunks=_chunks(split.shape, 1 << 20), dimension_names=("sample",)).attrs[
        "codes"
    ] = SPLIT_CODES
    _write_strings(root, "ids", ids)
    if group is not None:
        _write_strings(root, "group", group)
    if latlon is not None:
        root.create_array(
            "latlon",
            data=np.asarray(latlon, dtype=np.float64),
            chunks=_chunks(np.shape(latlon), chunk_size),
            dimension_names=ROOT_DIMS["latlon"],
        )
    if month is not None:
        root.create_array(
            "month", data=np.asarray(month, dtype=np.int64), chunks=_chunks(np.shape(month), chunk_size), dimension_names=ROOT_DIMS["month"]
        )
    add_coordinates(root)
    open_archive(path)
    return path


def open_archive(path: str | Path, *, check_values: bool = True) -> Archive:
    """Open and validate an archive. `check_values` also scans float modalities for all-NaN bands
    (one pass over the data, chunk by chunk); switch it off for a quick look at a huge archive."""
    path = Path(path)
    if not path.exists():
        raise ArchiveError(f"{path}: no such archive")
    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # zarr raises several types for "not a group"
        raise ArchiveError(f"{path}: not a zarr group ({exc})") from exc
    attrs = dict(root.attrs)
    where = str(path)
    if attrs.get("format") != FORMAT:
        raise ArchiveError(f"{where}: attribute 'format' is {attrs.get('format')!r}, expected {FORMAT!r}")
    version = attrs.get("version", 1)
    if not isinstance(version, int) or version > VERSION:
        raise ArchiveError(
            f"{where}: attribute 'version' is {version!r}; this colearn_dist reads archive versions 1..{VERSION} (upgrade it)"
        )
    task = attrs.get("task")
    if task not in TASKS:
        raise ArchiveError(f"{where}: attribute 'task' is {task!r}, expected one of {list(TASKS)}")
    class_names = tuple(attrs.get("class_names") or ())
    names = list(attrs.get("modalities") or [])
    if len(names) < 1:
        raise ArchiveError(f"{where}: attribute 'modalities' lists no modality")

    for required in ("target", "split", "ids"):
        if required not in root:
            raise ArchiveError(f"{where}: array {required!r} is missing")
    n = root["split"].shape[0]

    def expect_n(key: str, arr: Any) -> None:
        if arr.shape[0] != n:
            raise ArchiveError(f"{where}: array {key!r} has {arr.shape[0]} samples, 'split' has {n}")

    specs: dict[str, ModalitySpec] = {}
    for name in names:
        key = f"modalities/{name}"
        if key not in root:
            raise ArchiveError(f"{where}: array {key!r} is missing (listed in attribute 'modalities')")
        key = modality_key(root, name)
        if key not in root:
            raise ArchiveError(f"{where}: array {key!r} is missing (group 'modalities/{name}' holds no array {name!r})")
        arr = root[key]
        spec = ModalitySpec.from_attrs(name, arr.attrs)
        expect_n(key, arr)
        expected_ndim = {"series": 3, "static": 2, "categorical": 2, "image": 4}.get(spec.kind)
        if expected_ndim is None:
            raise ArchiveError(f"{where}: array {key!r} has kind {spec.kind!r}, expected one of {list(KINDS)}")
        if arr.ndim != expected_ndim:
            layout = {"series": "[N, T, C]", "static": "[N, C]", "categorical": "[N, T]", "image": "[N, C, H, W]"}[spec.kind]
            raise ArchiveError(f"{where}: array {key!r} ({spec.kind}) has shape {arr.shape}, expected {layout}")
        if spec.kind == "categorical":
            if np.dtype(arr.dtype).kind not in "iu":
                raise ArchiveError(f"{where}: array {key!r} (categorical) has dtype {arr.dtype}, expected an integer dtype")
            if not spec.num_classes or spec.num_classes < 1:
                raise ArchiveError(f"{where}: array {key!r} (categorical) needs attribute 'num_classes'")
            if len(spec.bands) != 1:
                raise ArchiveError(f"{where}: array {key!r} (categorical) needs exactly one band name, got {list(spec.bands)}")
        else:
            if np.dtype(arr.dtype) != np.float32:
                raise ArchiveError(f"{where}: array {key!r} has dtype {arr.dtype}, expected float32")
            channels = arr.shape[channel_axis(spec.kind)]
            if len(spec.bands) != channels:
                raise ArchiveError(f"{where}: array {key!r} has {channels} bands but attribute 'bands' names {len(spec.bands)}")
        specs[name] = spec

    target = root["target"]
    expect_n("target", target)
    if task == "regression":
        if target.ndim != 1 or np.dtype(target.dtype).kind != "f":
            raise ArchiveError(f"{where}: array 'target' must be float [N] for regression, got {target.dtype} {target.shape}")
    elif task == "multilabel":
        if target.ndim != 2 or (class_names and target.shape[1] != len(class_names)):
            raise ArchiveError(
                f"{where}: array 'target' must be [N, K] with K = {len(class_names)} class names for multilabel, got {target.shape}"
            )
    else:
        if target.ndim != 1 or np.dtype(target.dtype).kind not in "iu":
            raise ArchiveError(f"{where}: array 'target' must be integer [N] for {task}, got {target.dtype} {target.shape}")
        low, high = _value_range(target)
        k = len(class_names) or (2 if task == "binary" else high + 1)
        if low < 0 or high >= k:
            raise ArchiveError(f"{where}: array 'target' has class ids outside [0, {k - 1}] ({len(class_names)} class names)")

    split = np.asarray(root["split"][:])
    bad = sorted(set(np.unique(split).tolist()) - set(SPLIT_CODES.values()))
    if bad:
        raise ArchiveError(f"{where}: array 'split' has unknown codes {bad}; expected {SPLIT_CODES}")
    if not (split == SPLIT_CODES["train"]).any():
        raise ArchiveError(f"{where}: array 'split' has no train sample")
    for key in ("ids", "group"):
        if key in root:
            if root[key].ndim != 1:
                raise ArchiveError(f"{where}: array {key!r} must be 1-d [N] strings, got shape {root[key].shape}")
            expect_n(key, root[key])
    duplicate = _find_duplicate_id(root["ids"])
    if duplicate is not None:
        raise ArchiveError(f"{where}: array 'ids' has duplicate sample ids (e.g. {duplicate!r})")
    for key in ("latlon", "month"):
        if key in root:
            expect_n(key, root[key])
    if "month" in root:
        low, high = _value_range(root["month"])
        if low < 1 or high > 12:
            raise ArchiveError(f"{where}: array 'month' has values outside 1..12")

    if check_values:
        for name, spec in specs.items():
            if spec.kind == "categorical":
                _check_codes(where, name, spec, modality_array(root, name))
            else:
                _check_bands(where, name, spec, modality_array(root, name))

    return Archive(
        path=path,
        root=root,
        task=task,
        class_names=class_names,
        target_name=attrs.get("target_name", "target"),
        target_unit=attrs.get("target_unit", ""),
        modalities=specs,
        split=split,
        attrs=attrs,
    )


def _blocks(arr: zarr.Array) -> Iterator[np.ndarray]:
    """The array one chunk of samples at a time: validation memory stays flat as the archive grows."""
    chunk = arr.chunks[0]
    for start in range(0, arr.shape[0], chunk):
        yield np.asarray(arr[start : start + chunk])


def _value_range(arr: zarr.Array) -> tuple[int, int]:
    """(min, max) of an integer array, chunk by chunk; (0, -1) when it is empty."""
    low, high = None, None
    for block in _blocks(arr):
        if block.size:
            low = int(block.min()) if low is None else min(low, int(block.min()))
            high = int(block.max()) if high is None else max(high, int(block.max()))
    return (0, -1) if low is None or high is None else (low, high)


def _check_codes(where: str, name: str, spec: ModalitySpec, arr: zarr.Array) -> None:
    """Fail on a class code outside [0, num_classes) that is not the declared missing value."""
    k = int(spec.num_classes or 0)
    for block in _blocks(arr):
        bad = ((block < 0) | (block >= k)) & (block != (-1 if spec.missing_value is None else spec.missing_value))
        if bad.any():
            raise ArchiveError(
                f"{where}: array {arr.path!r} (categorical) has code {int(block[bad][0])} outside [0, {k - 1}] "
                f"that is not its missing_value ({spec.missing_value})"
            )


def _check_bands(where: str, name: str, spec: ModalitySpec, arr: zarr.Array) -> None:
    """Fail on an all-NaN band or an infinite value, reading one chunk at a time."""
    axis = channel_axis(spec.kind)
    finite_count = np.zeros(arr.shape[axis], dtype=np.int64)
    for block in _blocks(arr):
        if np.isinf(block).any():
            raise ArchiveError(f"{where}: array {arr.path!r} has infinite values (use NaN for missing)")
        block = np.moveaxis(block, axis, -1)
        finite_count += np.isfinite(block).reshape(-1, block.shape[-1]).sum(axis=0)
    empty = [spec.bands[i] for i in np.flatnonzero(finite_count == 0)]
    if empty:
        raise ArchiveError(f"{where}: array {arr.path!r} has all-NaN band(s) {empty}")


def describe(archive: Archive) -> str:
    """A short human summary, for `colearn-dist import` and `colearn-dist archive info`."""
    lines = [f"{archive.path}: {archive.num_samples} samples, task {archive.task}"]
    counts = archive.split_counts()
    lines.append("  splits: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    for name, spec in archive.modalities.items():
        shape = archive.array(name).shape[1:]
        lines.append(f"  {name:<8} {spec.kind:<11} {str(list(shape)):<10} {', '.join(spec.bands)}")
    if archive.class_names:
        lines.append("  classes: " + ", ".join(archive.class_names))
    return "\n".join(lines)


def nan_safe_mean_std(sum_: np.ndarray, sumsq: np.ndarray, count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std from running sums (float64), std floored so constant bands do not divide by 0."""
    count = np.maximum(count, 1)
    mean = sum_ / count
    var = np.maximum(sumsq / count - mean**2, 0.0)
    std = np.sqrt(var)
    std = np.where(std < 1e-6 * np.maximum(1.0, np.abs(mean)), 1.0, std)
    return mean, std


__all__ = [
    "Archive",
    "ArchiveError",
    "ModalitySpec",
    "SPLITS",
    "SPLIT_CODES",
    "TASKS",
    "add_coordinates",
    "channel_axis",
    "create_modality",
    "modality_array",
    "describe",
    "open_archive",
    "write_archive",
    "nan_safe_mean_std",
]
