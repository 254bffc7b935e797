"""Import an xarray datacube of per-pixel time series (zarr or netCDF) into an archive.

Each sensor is one variable of the root group, or one group (its variable named like the group, or
its only data variable). Dimension names are the user's (`sample_dim`, `time_dim`, `band_dim`);
xarray's CF decoding applies `_FillValue` (→ NaN, a missing observation), `scale_factor` and
`add_offset`. Kinds follow the dims: (sample, time, band) series, (sample, band) static,
(sample, time) categorical (integer codes; a masked code becomes an extra "missing" class).
Band names come from the band coordinate, months from a datetime time coordinate (or a `month`
coordinate), lat/lon from `lat`/`lon` (or `latitude`/`longitude`) coordinates on the sample dim.
The same reading serves `predict` on a cube (`sensor_array`), so a model sees what training saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..archive import TASKS, ArchiveError, ModalitySpec, write_archive
from ._common import split_codes


def _xarray() -> Any:
    try:
        import xarray as xr
    except ImportError as exc:  # pragma: no cover - an optional dependency
        raise ArchiveError("reading xarray datacubes needs xarray: pip install 'colearn_dist[xarray]'") from exc
    return xr


def open_cube(cube: Any) -> Any:
    """A DataTree of the cube: a path to a zarr store or a netCDF file, or an xarray Dataset / DataTree."""
    xr = _xarray()
    if isinstance(cube, xr.DataTree):
        return cube
    if isinstance(cube, xr.Dataset):
        return xr.DataTree(cube)
    path = Path(cube)
    if not path.exists():
        raise ArchiveError(f"{path}: no such datacube")
    try:
        if path.is_dir():
            return xr.open_datatree(path, engine="zarr", consolidated=None)
        return xr.open_datatree(path)
    except Exception as exc:
        raise ArchiveError(f"{path}: cannot open as a zarr or netCDF datacube ({exc})") from exc


def _variable(tree: Any, name: str, where: str) -> Any:
    """The sensor's DataArray: a root variable `name`, or group `name`'s variable `name` / only variable."""
    root = tree.to_dataset()
    if name in root.data_vars:
        return root[name]
    if name in tree.children:
        group = tree[name].to_dataset()
        if name in group.data_vars:
            return group[name]
        if len(group.data_vars) == 1:
            return group[next(iter(group.data_vars))]
        raise ArchiveError(f"{where}: group {name!r} holds variables {sorted(group.data_vars)}; name one {name!r} or keep one")
    raise ArchiveError(f"{where}: no variable or group {name!r} (variables {sorted(root.data_vars)}, groups {sorted(tree.children)})")


def _expected_dims(kind: str, sample_dim: str, time_dim: str, band_dim: str) -> tuple[str, ...]:
    return {"series": (sample_dim, time_dim, band_dim), "static": (sample_dim, band_dim), "categorical": (sample_dim, time_dim)}[kind]


def _kind_of(da: Any, name: str, sample_dim: str, time_dim: str, band_dim: str, where: str) -> str:
    dims = set(da.dims)
    flags = {sample_dim: "--sample-dim", time_dim: "--time-dim", band_dim: "--band-dim"}
    if sample_dim not in dims:
        raise ArchiveError(
            f"{where}: variable {name!r} has no dimension {sample_dim!r} ({flags[sample_dim]}); its dims are {list(da.dims)}"
        )
    for kind in ("series", "static", "categorical"):
        if dims == set(_expected_dims(kind, sample_dim, time_dim, band_dim)):
            return kind
    extra = [d for d in da.dims if d not in flags]
    raise ArchiveError(
        f"{where}: variable {name!r} has dims {list(da.dims)}; dimension {extra[0]!r} is none of "
        f"--sample-dim {sample_dim!r}, --time-dim {time_dim!r}, --band-dim {band_dim!r}"
        if extra
        else f"{where}: variable {name!r} has dims {list(da.dims)}; expected ({sample_dim}, {time_dim}, {band_dim}), ({sample_dim}, {band_dim}) or ({sample_dim}, {time_dim})"
    )


def _months(da: Any, name: str, sample_dim: str, time_dim: str, where: str) -> np.ndarray | None:
    """[N, T] calendar months: a `month` coordinate, else the months of a datetime time coordinate."""
    if "month" in da.coords and set(da.coords["month"].dims) <= {sample_dim, time_dim}:
        month = da.coords["month"]
        month = month.expand_dims({d: da.sizes[d] for d in (sample_dim, time_dim) if d not in month.dims})
        return np.asarray(month.transpose(sample_dim, time_dim).values, dtype=np.int64)
    if time_dim in da.coords and np.issubdtype(da.coords[time_dim].dtype, np.datetime64):
        months = da.coords[time_dim].dt.month.values.astype(np.int64)
        return np.broadcast_to(months, (da.sizes[sample_dim], len(months))).copy()
    return None


def cube_latlon(cube: Any, name: str | None, sample_dim: str) -> np.ndarray | None:
    """[N, 2] latitude, longitude from `lat`/`lon` (or `latitude`/`longitude`) coordinates on the sample
    dim: the variable's own (`name`), else the root group's; None when there are none."""
    tree = cube if hasattr(cube, "children") else open_cube(cube)
    places = [tree.to_dataset()]
    if name is not None:
        places.insert(0, _variable(tree, name, "datacube"))
    for place in places:
        for lat_key, lon_key in (("lat", "lon"), ("latitude", "longitude")):
            if lat_key in place.coords and lon_key in place.coords and place[lat_key].dims == (sample_dim,):
                return np.stack([np.asarray(place[lat_key].values), np.asarray(place[lon_key].values)], axis=1)
    return None


def sensor_array(
    cube: Any,
    name: str,
    *,
    kind: str | None = None,
    bands: Sequence[str] | None = None,
    sample_dim: str = "sample",
    time_dim: str = "time",
    band_dim: str = "band",
    need_month: bool = False,
    missing_value: int | None = None,
    where: str = "datacube",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(values [N, T, C] / [N, C] float32 or [N, T] int codes, months [N, T] or None, ids [N]) of one
    sensor. `bands` picks and orders bands by name (a missing one is an error naming it); `kind`, when
    given (a model's input), must match the dims."""
    tree = cube if hasattr(cube, "children") else open_cube(cube)
    da = _variable(tree, name, where)
    found = _kind_of(da, name, sample_dim, time_dim, band_dim, where)
    if kind is not None and kind != found:
        want = _expected_dims(kind, sample_dim, time_dim, band_dim) if kind in ("series", "static", "categorical") else ()
        raise ArchiveError(f"{where}: variable {name!r} has dims {list(da.dims)}, the model takes {kind} input with dims {list(want)}")
    if bands is not None and found != "categorical":
        have = [str(b) for b in da.coords[band_dim].values] if band_dim in da.coords else []
        for band in bands:
            if band not in have:
                raise ArchiveError(
                    f"{where}: band {band!r} is missing from variable {name!r} (dimension {band_dim!r} has {have or 'no band names'})"
                )
        da = da.sel({band_dim: list(bands)})
    da = da.transpose(*_expected_dims(found, sample_dim, time_dim, band_dim))
    values = np.asarray(da.values)
    if found == "categorical":
        codes = values
        if values.dtype.kind == "f":  # decoded with a _FillValue: NaN marks a missing step
            missing = np.isnan(values)
            if missing.any() and missing_value is None:
                missing_value = int(np.nanmax(values)) + 1 if (~missing).any() else 0
            codes = np.where(missing, missing_value if missing_value is not None else 0, np.nan_to_num(values)).astype(np.int64)
        values = codes.astype(np.int64)
    else:
        values = values.astype(np.float32)
    month = _months(da, name, sample_dim, time_dim, where) if found != "static" else None
    if need_month and month is None:
        raise ArchiveError(
            f"{where}: the model takes months, but variable {name!r} has no month coordinate and dimension {time_dim!r} is not datetime"
        )
    labels = da.coords[sample_dim].values.tolist() if sample_dim in da.coords else range(da.sizes[sample_dim])
    ids = np.array([str(v) for v in labels])  # via Python str: numpy's StringDType does not cast to fixed width
    return values, month, ids


def _per_sample(tree: Any, key: str | None, n: int, sample_dim: str, where: str, required: bool = False) -> np.ndarray | None:
    """A [N] or [N, K] variable or coordinate on the sample dim (target, split, group), or None."""
    if not key:
        return None
    root = tree.to_dataset()
    if key not in root.variables:
        if required:
            raise ArchiveError(f"{where}: no variable {key!r} (variables {sorted(root.data_vars)})")
        return None
    var = root[key]
    if not var.dims or var.dims[0] != sample_dim or var.sizes[sample_dim] != n:
        raise ArchiveError(f"{where}: variable {key!r} has dims {list(var.dims)} {list(var.shape)}; expected [{sample_dim}={n}, ...]")
    return np.asarray(var.values)


def import_xarray(
    src: str | Path,
    out_path: str | Path,
    *,
    task: str,
    modalities: Sequence[str] | None = None,
    sample_dim: str = "sample",
    time_dim: str = "time",
    band_dim: str = "band",
    target: str = "target",
    split: str = "split",
    group: str = "group",
    class_names: Sequence[str] = (),
    overwrite: bool = False,
) -> Path:
    """Write an archive from a datacube; every dims / shape problem is reported before anything is written."""
    if task not in TASKS:
        raise ArchiveError(f"task {task!r} is not one of {list(TASKS)}")
    src = Path(src)
    where = str(src)
    tree = open_cube(src)
    root = tree.to_dataset()
    reserved = {target, split, group}
    if modalities is None:
        names = [v for v in root.data_vars if v not in reserved and sample_dim in root[v].dims] + sorted(tree.children)
    else:
        names = list(modalities)
    if not names:
        raise ArchiveError(f"{where}: no sensor variable or group with dimension {sample_dim!r} (variables {sorted(root.data_vars)})")

    mods: dict[str, tuple[np.ndarray, ModalitySpec]] = {}
    month = ids = None
    for name in names:
        da = _variable(tree, name, where)
        kind = _kind_of(da, name, sample_dim, time_dim, band_dim, where)
        values, m, sample_ids = sensor_array(tree, name, sample_dim=sample_dim, time_dim=time_dim, band_dim=band_dim, where=where)
        if ids is None:
            ids = sample_ids
        elif len(sample_ids) != len(ids) or not np.array_equal(sample_ids, ids):
            raise ArchiveError(
                f"{where}: variable {name!r} has other {sample_dim!r} values than {names[0]!r} (sensors must share the samples, in order)"
            )
        if m is not None:
            if month is not None and m.shape == month.shape and not np.array_equal(m, month):
                raise ArchiveError(f"{where}: variable {name!r} has other months along {time_dim!r} than the sensors before it")
            month = m if month is None else month
        attrs = dict(da.attrs)
        units = attrs.get("units")
        if kind == "categorical":
            codes = values
            num_classes = int(codes.max()) + 1 if codes.size else 1
            masked = np.asarray(da.isnull().values).any() if da.dtype.kind == "f" else False
            spec = ModalitySpec(
                name, "categorical", (name,), ("class",), time_step="step", num_classes=num_classes,
                missing_value=num_classes - 1 if masked else None, sensor=str(attrs.get("sensor", "")),
                processing_level=str(attrs.get("processing_level", "")),
            )  # fmt: skip
            mods[name] = (codes.astype(np.uint8 if num_classes <= 256 else np.int64), spec)
            continue
        bands = (
            tuple(str(b) for b in da.coords[band_dim].values)
            if band_dim in da.coords
            else tuple(f"{name}_{i}" for i in range(da.sizes[band_dim]))
        )
        band_units = tuple(str(u) for u in units) if isinstance(units, (list, tuple)) else (str(units),) * len(bands) if units else ()
        mods[name] = (
            values,
            ModalitySpec(
                name, kind, bands, band_units, time_step="step" if kind == "series" else None,
                sensor=str(attrs.get("sensor", "")), processing_level=str(attrs.get("processing_level", "")),
            ),
        )  # fmt: skip
    assert ids is not None
    n = len(ids)
    y = _per_sample(tree, target, n, sample_dim, where, required=True)
    assert y is not None
    split_arr = _per_sample(tree, split, n, sample_dim, where)
    codes = np.zeros(n, dtype=np.uint8) if split_arr is None else split_codes(f"{where}: variable {split!r}", split_arr)
    group_arr = _per_sample(tree, group, n, sample_dim, where)
    latlon = cube_latlon(tree, None, sample_dim)
    if y.dtype.kind == "f" and task != "regression":
        if np.isnan(y).any():
            raise ArchiveError(f"{where}: variable {target!r} has missing (NaN) labels; a {task} target needs every sample labelled")
        y = y.astype(np.int64)
    return write_archive(
        out_path,
        mods,
        target=y,
        task=task,
        split=codes,
        ids=ids,
        class_names=tuple(class_names),
        group=None if group_arr is None else group_arr.astype(str),
        latlon=latlon,
        month=month,
        target_name=target,
        target_unit=str(root[target].attrs.get("units", "")),
        description=f"imported from {src.name} by import_xarray",
        overwrite=overwrite,
    )


__all__ = ["cube_latlon", "import_xarray", "open_cube", "sensor_array"]
