"""Import the Presto evaluation tasks (fuel moisture, algae blooms) from their `.npy` layout.

The bundled copies come from the Presto repository (MIT, see `bundled/presto/LICENSE`). Their one
stacked array mixes four sensors, so this importer splits it into the archive's per-sensor
modalities, fixes the stored NDVI and turns 0-based months into calendar months.

Data facts checked on the bundled copies (and asserted in tests/test_importers.py):

* the stored NDVI column equals (B7 - B3) / (B7 + B3), not (B8 - B4) / (B8 + B4), in every cell
  except the 16 algae-bloom cells whose S2 values are gap-filled (fractional) and whose NDVI is
  stored as 0; NDVI is therefore recomputed from B8 and B4;
* S2 bands are stored as reflectance x 10000 (digital numbers 1..~11000); S1 in dB;
* `temperature_2m` is in kelvin (259..306), `total_precipitation` in metres (ERA5 monthly);
* elevation and slope are identical at every time step, so they become one static layer;
* `month.npy` holds 0..11 (0 = January); the archive stores 1..12;
* `dynamic_world.npy` holds classes 0..8 and 9 for "no observation".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..archive import ArchiveError, ModalitySpec, write_archive

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled" / "presto"
BUNDLED: dict[str, Path] = {
    "fuel_moisture": BUNDLED_DIR / "fuel_moisture",
    "algae_blooms": BUNDLED_DIR / "algae_blooms",
}

STACKED_FILE = "s1_s2_era5_srtm.npy"
BANDS = (
    "VV", "VH",
    "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12",
    "temperature_2m", "total_precipitation",
    "elevation", "slope",
    "NDVI",
)  # fmt: skip
S1_BANDS = ("VV", "VH")
S2_BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12")
ERA5_BANDS = ("temperature_2m", "total_precipitation")
SRTM_BANDS = ("elevation", "slope")
S2_UNIT = "reflectance x 10000"
DW_CLASSES = 10  # 0..8 land-cover classes, 9 = missing
DW_MISSING = 9

# What each dataset is about; detected from the file that names its samples.
TASKS = {
    "site.npy": {"dataset": "fuel_moisture", "target_name": "live fuel moisture", "target_unit": "%"},
    "uid.npy": {"dataset": "algae_blooms", "target_name": "bloom severity", "target_unit": "1-5"},
}


def bundled_path(name: str) -> Path:
    """The bundled source folder of a Presto task, so tests and the CLI need no download."""
    if name not in BUNDLED:
        raise KeyError(f"no bundled Presto dataset {name!r}; available: {sorted(BUNDLED)}")
    return BUNDLED[name]


def _load(src: Path, key: str, shape: tuple[Any, ...]) -> np.ndarray:
    """Load `<key>.npy` and check its shape; `shape` holds ints or names ('N', 'T') that must agree."""
    file = src / f"{key}.npy"
    layout = "[" + ", ".join(str(s) for s in shape) + "]"
    if not file.exists():
        raise ArchiveError(f"{file}: missing (key {key!r}, expected shape {layout})")
    try:
        arr = np.load(file, allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError / OSError / EOFError for bad files
        raise ArchiveError(f"{file}: cannot read key {key!r} as .npy ({exc}); expected shape {layout}") from exc
    if arr.ndim != len(shape) or any(isinstance(s, int) and s != d for s, d in zip(shape, arr.shape)):
        raise ArchiveError(f"{file}: key {key!r} has shape {list(arr.shape)}, expected {layout}")
    return arr


def _check_dims(src: Path, arrays: dict[str, tuple[np.ndarray, tuple[Any, ...]]]) -> None:
    """Named dimensions (N, T) must agree between files; the error names both files."""
    seen: dict[str, tuple[int, str]] = {}
    for key, (arr, shape) in arrays.items():
        for dim, size in zip(shape, arr.shape):
            if isinstance(dim, int):
                continue
            if dim in seen and seen[dim][0] != size:
                other_size, other_key = seen[dim]
                raise ArchiveError(
                    f"{src / (key + '.npy')}: key {key!r} has {dim} = {size}, but "
                    f"{other_key}.npy has {dim} = {other_size} (expected shape "
                    "[" + ", ".join(str(s) for s in shape) + "])"
                )
            seen.setdefault(dim, (size, key))


def _months(src: Path, month: np.ndarray) -> np.ndarray:
    """Presto stores 0-based months; accept 1-based too, but refuse anything ambiguous-looking."""
    month = month.astype(np.int64)
    lo, hi = int(month.min()), int(month.max())
    if lo >= 0 and hi <= 11:
        return month + 1
    if lo >= 1 and hi <= 12:
        return month
    raise ArchiveError(f"{src / 'month.npy'}: key 'month' has values {lo}..{hi}, expected 0..11 or 1..12")


def ndvi(nir: np.ndarray, red: np.ndarray) -> np.ndarray:
    """(NIR - red) / (NIR + red), NaN where the denominator is 0 (no reflectance to compare)."""
    nir = nir.astype(np.float64)
    red = red.astype(np.float64)
    den = nir + red
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den != 0, (nir - red) / np.where(den != 0, den, 1.0), np.nan)
    return out


def geographic_cells(latlon: np.ndarray, degrees: float = 1.0) -> np.ndarray:
    """A group id per sample: the `degrees` × `degrees` lat/lon cell it falls in."""
    cell = np.floor(np.asarray(latlon, dtype=np.float64) / degrees).astype(np.int64)
    return np.array([f"cell{lat:+04d}{lon:+05d}" for lat, lon in cell])


def import_presto(src_dir: str | Path, out_path: str | Path, *, overwrite: bool = False) -> Path:
    """Convert one Presto task folder into an archive (see module docstring for the corrections)."""
    src = Path(src_dir)
    if not src.is_dir():
        raise ArchiveError(f"{src}: not a folder of Presto .npy files")
    kind = next((name for name in TASKS if (src / name).exists()), None)
    if kind is None:
        raise ArchiveError(f"{src}: neither site.npy (fuel moisture) nor uid.npy (algae blooms) found; cannot tell the task")
    shapes: dict[str, tuple[Any, ...]] = {
        "s1_s2_era5_srtm": ("N", "T", len(BANDS)),
        "dynamic_world": ("N", "T"),
        "month": ("N", "T"),
        "latlon": ("N", 2),
        "target": ("N",),
        "is_test": ("N",),
        kind[: -len(".npy")]: ("N",),
    }
    loaded = {key: (_load(src, key, shape), shape) for key, shape in shapes.items()}
    _check_dims(src, loaded)
    arrays = {key: arr for key, (arr, _) in loaded.items()}

    x = arrays["s1_s2_era5_srtm"].astype(np.float64)
    col = {name: i for i, name in enumerate(BANDS)}
    pick = lambda names: x[..., [col[n] for n in names]]  # noqa: E731

    s2 = pick(S2_BANDS)
    s2_ndvi = ndvi(x[..., col["B8"]], x[..., col["B4"]])[..., None]
    srtm_series = pick(SRTM_BANDS)
    if not np.allclose(srtm_series, srtm_series[:, :1], equal_nan=True):
        raise ArchiveError(f"{src / STACKED_FILE}: elevation/slope change over time; expected a static layer")

    dw = arrays["dynamic_world"]
    if dw.size and (dw.min() < 0 or dw.max() >= DW_CLASSES):
        raise ArchiveError(f"{src / 'dynamic_world.npy'}: key 'dynamic_world' has values outside 0..{DW_CLASSES - 1}")
    is_test = arrays["is_test"]
    if not set(np.unique(is_test).tolist()) <= {0, 1}:
        raise ArchiveError(f"{src / 'is_test.npy'}: key 'is_test' must hold 0/1, got {sorted(np.unique(is_test).tolist())[:10]}")

    n = x.shape[0]
    meta = TASKS[kind]
    if kind == "site.npy":
        group = arrays["site"].astype(str)
        ids = np.array([f"fm{i:05d}" for i in range(n)])
    else:
        # Every uid is its own sample, so group by 1° cell: the test split is geographic (its cells
        # share none with train's), and a validation split carved by cell shifts the same way.
        group = geographic_cells(arrays["latlon"])
        ids = arrays["uid"].astype(str)

    month_spec = dict(time_step="month")
    modalities = {
        "s1": (
            pick(S1_BANDS),
            ModalitySpec("s1", "series", S1_BANDS, ("dB", "dB"), sensor="Sentinel-1 C-SAR", processing_level="GRD", **month_spec),
        ),
        "s2": (
            np.concatenate([s2, s2_ndvi], axis=-1),
            ModalitySpec("s2", "series", S2_BANDS + ("NDVI",), (S2_UNIT,) * len(S2_BANDS) + ("",), sensor="Sentinel-2 MSI", **month_spec),
        ),
        "era5": (pick(ERA5_BANDS), ModalitySpec("era5", "series", ERA5_BANDS, ("K", "m"), sensor="ERA5 reanalysis", **month_spec)),
        "srtm": (srtm_series[:, 0], ModalitySpec("srtm", "static", SRTM_BANDS, ("m", "degrees"), sensor="SRTM elevation")),
        "dw": (
            dw.astype(np.uint8),
            ModalitySpec(
                "dw",
                "categorical",
                ("dynamic_world",),
                ("class",),
                num_classes=DW_CLASSES,
                missing_value=DW_MISSING,
                sensor="Dynamic World land cover",
                **month_spec,
            ),
        ),
    }
    return write_archive(
        out_path,
        modalities,
        target=arrays["target"].astype(np.float32),
        task="regression",
        split=np.where(is_test == 1, 2, 0).astype(np.uint8),
        ids=ids,
        group=group,
        latlon=arrays["latlon"],
        month=_months(src, arrays["month"]),
        target_name=meta["target_name"],
        target_unit=meta["target_unit"],
        description=(
            f"Presto {meta['dataset']} task (MIT, Presto authors), imported from {src.name}; "
            "NDVI recomputed as (B8-B4)/(B8+B4), months converted to 1..12"
        ),
        overwrite=overwrite,
    )


__all__ = ["BANDS", "BUNDLED", "bundled_path", "import_presto", "ndvi"]
