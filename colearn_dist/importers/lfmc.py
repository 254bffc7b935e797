"""Import the live fuel moisture table of Rao et al. (2020), "SAR-enhanced mapping of live fuel moisture
content" (the LFMC benchmark of the MDiCo paper), from its CSV or Parquet file.

Layout: one row per measurement; the target `percent(t)`, `site`, `date`, and feature columns named
`name(t)`, `name(t-1)`, … `name(t-3)` (lags in months). Which features form which modality comes from a
mapping (or a YAML file); by default the paper's two sensors plus the static layers:

    s1:      [vv, vh, vh_vv]                                   # Sentinel-1, series
    optical: [red, green, blue, swir, nir, ndvi, ndwi, nirv]   # optical, series
    static:  {kind: static, columns: [slope, elevation, canopy_height, forest_cover, silt, sand, clay]}

A series modality's steps are its lags ordered oldest first (t-3 … t); a static modality reads
`name(t)` (or a bare `name`). Exact duplicate rows are removed (the paper drops ~30) and counted.
The test split is one fold of a seeded 10-fold partition, as the paper cross-validates (grouped by
site with `group_folds`); `site` becomes the archive's group, so the sharder carves val by site.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from datetime import date as Date
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..archive import ArchiveError, ModalitySpec, write_archive
from ._common import kfold_split, note

TARGET = "percent(t)"
SITE = "site"
DATE = "date"
DEFAULT_MODALITIES: dict[str, dict[str, Any]] = {
    "s1": {"kind": "series", "columns": ["vv", "vh", "vh_vv"]},
    "optical": {"kind": "series", "columns": ["red", "green", "blue", "swir", "nir", "ndvi", "ndwi", "nirv"]},
    "static": {"kind": "static", "columns": ["slope", "elevation", "canopy_height", "forest_cover", "silt", "sand", "clay"]},
}
_LAGGED = re.compile(r"^(?P<name>.+)\(t(?:-(?P<lag>\d+))?\)$")
_MISSING = {"", "na", "nan", "none", "null"}


class Table:
    """Columns by name (lists of raw values) and where each row came from, for error messages."""

    def __init__(self, path: Path, columns: dict[str, list[Any]], first_row: int):
        self.path = path
        self.columns = columns
        self.first_row = first_row  # CSV: line 2 holds the first data row; Parquet: row 0
        self.n = len(next(iter(columns.values()))) if columns else 0

    def row_label(self, i: int) -> str:
        return f"line {i + self.first_row}" if self.first_row else f"row {i}"

    def column(self, name: str, why: str) -> list[Any]:
        if name not in self.columns:
            raise ArchiveError(f"{self.path}: column {name!r} is missing ({why})")
        return self.columns[name]

    def floats(self, name: str, why: str) -> np.ndarray:
        values = self.column(name, why)
        out = np.empty(self.n, dtype=np.float64)
        for i, v in enumerate(values):
            if v is None or (isinstance(v, str) and v.strip().lower() in _MISSING):
                out[i] = np.nan
                continue
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                raise ArchiveError(f"{self.path}: column {name!r}, {self.row_label(i)}: {v!r} is not a number") from None
        return out


def read_table(path: str | Path) -> Table:
    """A CSV (any extension but .parquet / .pq) or Parquet table; Parquet needs pyarrow, which is optional."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: no such LFMC table (expected a CSV or Parquet file with columns {TARGET!r}, {SITE!r}, {DATE!r}, ...)")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ArchiveError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow), or save the table as CSV") from exc
        try:
            data = pq.read_table(path).to_pydict()
        except Exception as exc:  # pyarrow raises its own ArrowInvalid / OSError types
            raise ArchiveError(f"{path}: cannot read as Parquet ({exc})") from exc
        return Table(path, {str(k): list(v) for k, v in data.items()}, first_row=0)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ArchiveError(f"{path}: cannot read as CSV ({exc})") from exc
    if not rows:
        raise ArchiveError(f"{path}: empty file; expected a header with {TARGET!r}, {SITE!r}, {DATE!r} and feature columns")
    header, body = rows[0], [r for r in rows[1:] if r]
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ArchiveError(f"{path}: line {i + 2} has {len(r)} fields, the header has {len(header)}")
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise ArchiveError(f"{path}: duplicate column name(s) {dup}")
    columns = {h: [r[j] for r in body] for j, h in enumerate(header)}
    return Table(path, columns, first_row=2)


def load_modalities_yaml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a modality mapping: `name: [features]` (a series) or `name: {kind: series|static, columns: [...]}`."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: no such modalities YAML file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ArchiveError(f"{path}: not valid YAML ({exc})") from exc
    return normalise_modalities(data, str(path))


def normalise_modalities(data: Any, where: str = "modalities") -> dict[str, dict[str, Any]]:
    if not isinstance(data, Mapping) or not data:
        raise ArchiveError(f"{where}: expected a mapping of modality name → feature list, got {data!r}")
    out: dict[str, dict[str, Any]] = {}
    for name, spec in data.items():
        key = f"{where}: key {name!r}"
        if not isinstance(name, str) or not name or "." in name or "/" in name:
            raise ArchiveError(f"{key}: a modality name must be a non-empty string without '.' or '/'")
        if isinstance(spec, list):
            spec = {"kind": "series", "columns": spec}
        if not isinstance(spec, Mapping):
            raise ArchiveError(f"{key}: expected a feature list or {{kind, columns}}, got {spec!r}")
        unknown = sorted(set(spec) - {"kind", "columns"})
        if unknown:
            raise ArchiveError(f"{key}: unknown field(s) {unknown}; known: ['columns', 'kind']")
        kind = spec.get("kind", "series")
        if kind not in ("series", "static"):
            raise ArchiveError(f"{key}: kind {kind!r} is not 'series' or 'static'")
        cols = spec.get("columns")
        if not isinstance(cols, list) or not cols or not all(isinstance(c, str) and c for c in cols):
            raise ArchiveError(f"{key}: 'columns' must be a non-empty list of feature names, got {cols!r}")
        if len(set(cols)) != len(cols):
            raise ArchiveError(f"{key}: 'columns' names a feature twice: {cols}")
        out[name] = {"kind": kind, "columns": list(cols)}
    return out


def _lags(table: Table) -> dict[str, set[int]]:
    """feature name → the lags its columns `name(t-k)` cover."""
    lags: dict[str, set[int]] = {}
    for col in table.columns:
        m = _LAGGED.match(col)
        if m:
            lags.setdefault(m["name"], set()).add(int(m["lag"] or 0))
    return lags


def _lag_column(feature: str, lag: int) -> str:
    return f"{feature}(t)" if lag == 0 else f"{feature}(t-{lag})"


def _series(table: Table, name: str, features: list[str], lags: dict[str, set[int]]) -> np.ndarray:
    """[N, T, C], oldest step first; every feature must have the same, gap-free lags 0..T-1."""
    first = features[0]
    if first not in lags:
        raise ArchiveError(f"{table.path}: column {first + '(t)'!r} is missing (feature {first!r} of modality {name!r})")
    steps = max(lags[first]) + 1
    for f in features:
        expected = [_lag_column(f, k) for k in range(steps)]
        missing = [c for c in expected if c not in table.columns]
        extra = sorted(k for k in lags.get(f, set()) if k >= steps)
        if missing or extra:
            have = sorted(_lag_column(f, k) for k in lags.get(f, set()))
            raise ArchiveError(
                f"{table.path}: modality {name!r}, feature {f!r}: expected columns {expected} "
                f"(lags 0..{steps - 1} like {first!r}), found {have}"
            )
    x = np.empty((table.n, steps, len(features)), dtype=np.float64)
    for c, f in enumerate(features):
        for t in range(steps):
            x[:, t, c] = table.floats(_lag_column(f, steps - 1 - t), f"feature {f!r} of modality {name!r}")
    return x


def _static(table: Table, name: str, features: list[str]) -> np.ndarray:
    x = np.empty((table.n, len(features)), dtype=np.float64)
    for c, f in enumerate(features):
        col = f"{f}(t)" if f"{f}(t)" in table.columns else f
        x[:, c] = table.floats(col, f"static feature {f!r} of modality {name!r}; expected column {f + '(t)'!r}")
    return x


def _dates(table: Table) -> tuple[list[str], np.ndarray]:
    """ISO dates (YYYY-MM-DD) and their calendar months, from strings or date objects."""
    values = table.column(DATE, "the measurement date, YYYY-MM-DD")
    out, months = [], np.empty(table.n, dtype=np.int64)
    for i, v in enumerate(values):
        text = v.isoformat() if hasattr(v, "isoformat") else str(v)
        try:
            d = Date.fromisoformat(text.strip()[:10])
        except ValueError:
            raise ArchiveError(f"{table.path}: column {DATE!r}, {table.row_label(i)}: {v!r} is not a YYYY-MM-DD date") from None
        out.append(d.isoformat())
        months[i] = d.month
    return out, months


def import_lfmc(
    src: str | Path,
    out_path: str | Path,
    *,
    modalities: Mapping[str, Any] | str | Path | None = None,
    folds: int = 10,
    fold: int = 0,
    group_folds: bool = False,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the LFMC archive; `modalities` is a mapping, a YAML file, or None for DEFAULT_MODALITIES."""
    table = read_table(src)
    if modalities is None:
        specs = normalise_modalities(DEFAULT_MODALITIES, "DEFAULT_MODALITIES")
    elif isinstance(modalities, (str, Path)):
        specs = load_modalities_yaml(modalities)
    else:
        specs = normalise_modalities(modalities)
    if table.n == 0:
        raise ArchiveError(f"{table.path}: the table has no rows")

    target = table.floats(TARGET, "the target, live fuel moisture in %")
    sites = [str(s) for s in table.column(SITE, "the sampling site")]
    dates, months = _dates(table)
    lags = _lags(table)
    arrays: dict[str, np.ndarray] = {}
    try:
        for name, spec in specs.items():
            if spec["kind"] == "series":
                arrays[name] = _series(table, name, spec["columns"], lags)
            else:
                arrays[name] = _static(table, name, spec["columns"])
    except ArchiveError as exc:
        if modalities is not None:
            raise
        raise ArchiveError(f"{exc} (default modalities; choose others with a modalities YAML / --modalities-yaml)") from exc
    latlon = None
    if "latitude" in table.columns and "longitude" in table.columns:
        latlon = np.stack([table.floats("latitude", "site latitude"), table.floats("longitude", "site longitude")], axis=1)

    # Exact duplicates (every value used, compared with NaN == NaN) carry no information: drop them.
    keep = np.ones(table.n, dtype=bool)
    seen: set[tuple[Any, ...]] = set()
    for i in range(table.n):
        key = (sites[i], dates[i], target[i].tobytes()) + tuple(a[i].tobytes() for a in arrays.values())
        if key in seen:
            keep[i] = False
        seen.add(key)
    note("lfmc", f"{table.path}: removed {int((~keep).sum())} duplicate row(s)")
    no_target = keep & np.isnan(target)
    if no_target.any():
        note("lfmc", f"{table.path}: dropped {int(no_target.sum())} row(s) without {TARGET!r}")
        keep &= ~no_target
    if not keep.any():
        raise ArchiveError(f"{table.path}: no row left with a value in {TARGET!r}")
    rows = np.flatnonzero(keep)

    ids, counts = [], {}
    for i in rows:
        base = f"{sites[i]}/{dates[i]}"
        k = counts.get(base, 0)
        counts[base] = k + 1
        ids.append(base if k == 0 else f"{base}#{k}")
    group = np.array([sites[i] for i in rows])

    mods: dict[str, tuple[np.ndarray, ModalitySpec]] = {}
    step_counts = set()
    for name, spec in specs.items():
        x = arrays[name][rows]
        if spec["kind"] == "series":
            step_counts.add(x.shape[1])
            mods[name] = (x, ModalitySpec(name, "series", tuple(spec["columns"]), time_step="month"))
        else:
            mods[name] = (x, ModalitySpec(name, "static", tuple(spec["columns"])))
    month = None
    if len(step_counts) == 1:  # one time axis for every series: calendar month of each step, oldest first
        t = step_counts.pop()
        month = (months[rows, None] - 1 - np.arange(t - 1, -1, -1)[None, :]) % 12 + 1

    split = kfold_split(len(rows), folds, fold, seed, group if group_folds else None, where=str(table.path))
    return write_archive(
        out_path,
        mods,
        target=target[rows].astype(np.float32),
        task="regression",
        split=split,
        ids=np.array(ids),
        group=group,
        latlon=None if latlon is None else latlon[rows],
        month=month,
        target_name="live fuel moisture",
        target_unit="%",
        description=(
            f"LFMC (Rao et al. 2020) imported from {table.path.name}; test = fold {fold} of {folds} "
            f"({'grouped by site' if group_folds else 'random'}, seed {seed})"
        ),
        overwrite=overwrite,
    )


__all__ = ["DEFAULT_MODALITIES", "Table", "import_lfmc", "load_modalities_yaml", "normalise_modalities", "read_table"]
