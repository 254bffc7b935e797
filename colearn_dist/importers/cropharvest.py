"""Import CropHarvest (Tseng et al. 2021): crop / non-crop (binary) or crop type (multiclass).

Layout of a CropHarvest root folder (as its `cropharvest` package downloads it):

    labels.geojson                      FeatureCollection, one feature per label; properties `index`
                                        (newer releases: `dataset_index`), `dataset`, `is_crop`, `lat`,
                                        `lon`, `is_test`, `classification_label` (crop type or null),
                                        `export_end_date`
    features/arrays/<index>_<dataset>.h5  key `array`: [12, 18] float, 12 monthly steps × the 18 bands
                                        of the bundled Presto data (VV, VH, B2 … B12, temperature_2m,
                                        total_precipitation, elevation, slope, NDVI)

Corrections, as for the Presto data (same export pipeline): the stored NDVI is computed with the
band indices of the list *after* B1/B10 were removed on the array *before* removal, i.e. it is
(B7 - B3)/(B7 + B3); NDVI is recomputed from B8 and B4. Elevation and slope are repeated at every
step; they become one static layer. Step t covers the 30 days from export_end_date - 360 d + 30·t d;
`month` holds that step's calendar month.

Samples whose label is a test label (`is_test`) or whose array file is absent (not every label has
EO data) are skipped and counted. As in the paper, the test split is one fold of a seeded 10-fold
partition of the remaining samples.
"""

from __future__ import annotations

import json
from datetime import date as Date
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..archive import ArchiveError, ModalitySpec, write_archive
from ._common import kfold_split, nanmean, note, open_h5, shape_text
from .presto import BANDS, ERA5_BANDS, S1_BANDS, S2_BANDS, S2_UNIT, SRTM_BANDS, ndvi

LABELS_FILE = "labels.geojson"
ARRAYS_DIR = Path("features") / "arrays"
ARRAY_KEY = "array"
STEPS = 12
DAYS_PER_STEP = 30
TASKS = ("binary", "multiclass")
BINARY_CLASSES = ("non_crop", "crop")


def _label_rows(path: Path) -> list[dict[str, Any]]:
    """The properties of every feature of the labels GeoJSON."""
    if not path.is_file():
        raise ArchiveError(f"{path}: missing (CropHarvest labels GeoJSON, a FeatureCollection)")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArchiveError(f"{path}: cannot read as GeoJSON ({exc})") from exc
    features = data.get("features") if isinstance(data, dict) else None
    if not isinstance(features, list):
        raise ArchiveError(f"{path}: key 'features' missing; expected a GeoJSON FeatureCollection")
    rows = []
    for i, feat in enumerate(features):
        props = feat.get("properties") if isinstance(feat, dict) else None
        if not isinstance(props, dict):
            raise ArchiveError(f"{path}: feature {i} has no 'properties' mapping")
        rows.append(props)
    return rows


def _prop(path: Path, i: int, row: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if key in row:
            return row[key]
    raise ArchiveError(f"{path}: feature {i}: property {keys[0]!r} is missing (have {sorted(row)})")


def _flag(path: Path, i: int, key: str, value: Any) -> bool:
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "0", "1"):
        return value.lower() in ("true", "1")
    raise ArchiveError(f"{path}: feature {i}: property {key!r} is {value!r}, expected true/false")


def _step_months(end: Any) -> np.ndarray | None:
    """Calendar month of each of the 12 steps, from the export end date (None when it is unknown)."""
    if not end:
        return None
    try:
        d = Date.fromisoformat(str(end).strip()[:10])
    except ValueError:
        return None
    start = d - timedelta(days=STEPS * DAYS_PER_STEP)
    return np.array([(start + timedelta(days=DAYS_PER_STEP * t)).month for t in range(STEPS)], dtype=np.int64)


def read_array(file: Path) -> np.ndarray:
    """One sample's [12, 18] array, checked."""
    expected = f"key {ARRAY_KEY!r} of shape {shape_text([STEPS, len(BANDS)])} ({STEPS} monthly steps × bands {', '.join(BANDS)})"
    with open_h5(file, expected) as h5:
        if ARRAY_KEY not in h5:
            raise ArchiveError(
                f"{file}: key {ARRAY_KEY!r} is missing (found {sorted(h5.keys())}); expected shape {shape_text([STEPS, len(BANDS)])}"
            )
        arr = np.asarray(h5[ARRAY_KEY][()])
    if arr.shape != (STEPS, len(BANDS)):
        raise ArchiveError(
            f"{file}: key {ARRAY_KEY!r} has shape {shape_text(arr.shape)}, expected {shape_text([STEPS, len(BANDS)])} ({STEPS} steps × {len(BANDS)} bands)"
        )
    if arr.dtype.kind not in "fiu":
        raise ArchiveError(f"{file}: key {ARRAY_KEY!r} has dtype {arr.dtype}, expected numbers")
    return arr.astype(np.float64)


def import_cropharvest(
    src: str | Path,
    out_path: str | Path,
    *,
    task: str = "binary",
    labels: str | Path | None = None,
    folds: int = 10,
    fold: int = 0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a CropHarvest archive: `task` "binary" (is_crop) or "multiclass" (classification_label)."""
    src = Path(src)
    if task not in TASKS:
        raise ArchiveError(f"cropharvest: task {task!r} is not one of {list(TASKS)}")
    if not src.is_dir():
        raise ArchiveError(f"{src}: not a CropHarvest folder (expected {LABELS_FILE} and {ARRAYS_DIR}/)")
    labels_path = Path(labels) if labels else src / LABELS_FILE
    arrays_dir = src / ARRAYS_DIR
    if not arrays_dir.is_dir():
        raise ArchiveError(f"{arrays_dir}: missing (one <index>_<dataset>.h5 per sample)")
    rows = _label_rows(labels_path)

    picked: list[tuple[int, Path, dict[str, Any]]] = []
    skipped = {"test": 0, "no array": 0, "no crop type": 0}
    for i, row in enumerate(rows):
        if _flag(labels_path, i, "is_test", row.get("is_test", False)):
            skipped["test"] += 1
            continue
        if task == "multiclass" and row.get("classification_label") in (None, ""):
            skipped["no crop type"] += 1
            continue
        index = _prop(labels_path, i, row, "index", "dataset_index")
        dataset = _prop(labels_path, i, row, "dataset")
        file = arrays_dir / f"{index}_{dataset}.h5"
        if not file.exists():
            skipped["no array"] += 1
            continue
        picked.append((i, file, row))
    note("cropharvest", f"{labels_path}: {len(picked)} samples; skipped " + ", ".join(f"{v} ({k})" for k, v in skipped.items()))
    if not picked:
        raise ArchiveError(f"{labels_path}: no labelled sample has an array in {arrays_dir}")

    n = len(picked)
    x = np.empty((n, STEPS, len(BANDS)), dtype=np.float64)
    latlon = np.empty((n, 2), dtype=np.float64)
    months = np.empty((n, STEPS), dtype=np.int64)
    have_months = True
    names: list[str] = []
    for j, (i, file, row) in enumerate(tqdm(picked, desc="cropharvest", unit="file", disable=None)):
        x[j] = read_array(file)
        latlon[j] = (float(_prop(labels_path, i, row, "lat")), float(_prop(labels_path, i, row, "lon")))
        m = _step_months(row.get("export_end_date"))
        if m is None:
            have_months = False
        else:
            months[j] = m
        names.append(file.stem)

    if task == "binary":
        target = np.array([int(_flag(labels_path, i, "is_crop", _prop(labels_path, i, row, "is_crop"))) for i, _, row in picked])
        class_names: tuple[str, ...] = BINARY_CLASSES
    else:
        crop_types = [str(row["classification_label"]) for _, _, row in picked]
        class_names = tuple(sorted(set(crop_types)))
        code = {c: k for k, c in enumerate(class_names)}
        target = np.array([code[c] for c in crop_types])

    col = {b: k for k, b in enumerate(BANDS)}
    pick = lambda bands: x[..., [col[b] for b in bands]]  # noqa: E731
    s2 = np.concatenate([pick(S2_BANDS), ndvi(x[..., col["B8"]], x[..., col["B4"]])[..., None]], axis=-1)
    srtm = nanmean(pick(SRTM_BANDS), axis=1)
    month_spec = dict(time_step="month")
    modalities = {
        "s1": (pick(S1_BANDS), ModalitySpec("s1", "series", S1_BANDS, ("dB", "dB"), **month_spec)),
        "s2": (
            s2,
            ModalitySpec("s2", "series", S2_BANDS + ("NDVI",), (S2_UNIT,) * len(S2_BANDS) + ("",), **month_spec),
        ),
        "era5": (pick(ERA5_BANDS), ModalitySpec("era5", "series", ERA5_BANDS, ("K", "m"), **month_spec)),
        "srtm": (srtm, ModalitySpec("srtm", "static", SRTM_BANDS, ("m", "degrees"))),
    }
    return write_archive(
        out_path,
        modalities,
        target=target,
        task=task,
        split=kfold_split(n, folds, fold, seed, where=str(labels_path)),
        ids=np.array(names),
        class_names=class_names,
        latlon=latlon,
        month=months if have_months else None,
        target_name="crop" if task == "binary" else "crop type",
        description=(
            f"CropHarvest ({task}) imported from {src.name}; NDVI recomputed as (B8-B4)/(B8+B4); "
            f"test = fold {fold} of {folds} (random, seed {seed})"
        ),
        overwrite=overwrite,
    )


__all__ = ["BINARY_CLASSES", "import_cropharvest", "read_array"]
