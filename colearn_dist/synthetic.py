"""Synthetic multi-sensor archives for scale tests: any size, written chunk by chunk.

Why it exists: pretraining and sharding must be measured at continental scale (millions of
samples) without a continental download, on data where co-learning has something to find. Each
sample draws a *shared* latent factor (seen by every sensor: the signal the cross-sensor
contrastive term can align) and one *specific* factor per sensor (seen by that sensor only: what the
modality-discriminative terms keep apart). The target depends on both, so a model that uses only
the shared part, or only one sensor, leaves error on the table:

    x_m[t, c] = Σ_k u_k · W_m[k, c] · sin(2π t / 12 + φ_k)  +  Σ_j v_mj · S_m[j, c] · cos(2π t / 12 + ψ_mj)  +  ε
    y         = Σ_k a_k u_k + 0.5 · tanh(u_0 u_1)  +  Σ_m b_m · v_m0  +  noise

(static sensors drop the seasonal factors). Every block of rows is generated from its own seed
stream ([seed, block]), so memory is flat in n and a block's content does not depend on n.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .archive import FORMAT, SPLIT_CODES, VERSION, ModalitySpec, add_coordinates, create_modality, open_archive

# name -> (kind, bands); series get `t` monthly steps.
SENSORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "s1": ("series", ("VV", "VH")),
    "s2": ("series", ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12", "NDVI", "NDWI")),
    "era5": ("series", ("temperature_2m", "total_precipitation")),
    "srtm": ("static", ("elevation", "slope")),
}
# Offsets and scales in the units the bands usually have, so normalisation has something to do.
_LOCATION = {"s1": -12.0, "s2": 0.2, "era5": 285.0, "srtm": 400.0}
_SCALE = {"s1": 3.0, "s2": 0.1, "era5": 8.0, "srtm": 150.0}


class _Factors:
    """The fixed mixing matrices of one archive (from `seed`), shared by every block."""

    def __init__(self, seed: int, t: int, shared_dim: int, specific_dim: int, sensors: dict[str, tuple[str, tuple[str, ...]]]):
        rng = np.random.default_rng([seed, 0xC0])
        steps = np.arange(t)
        self.sensors = sensors
        phase = rng.uniform(0, 2 * np.pi, size=shared_dim)
        self.shared_season = np.sin(2 * np.pi * steps[:, None] / 12 + phase[None, :])  # [T, K]
        self.w: dict[str, np.ndarray] = {}
        self.s: dict[str, np.ndarray] = {}
        self.specific_season: dict[str, np.ndarray] = {}
        for name, (_, bands) in sensors.items():
            self.w[name] = rng.normal(size=(shared_dim, len(bands))) / np.sqrt(shared_dim)
            self.s[name] = rng.normal(size=(specific_dim, len(bands))) / np.sqrt(specific_dim)
            psi = rng.uniform(0, 2 * np.pi, size=specific_dim)
            self.specific_season[name] = np.cos(2 * np.pi * steps[:, None] / 12 + psi[None, :])  # [T, J]
        self.a = rng.normal(size=shared_dim)
        self.b = {name: float(v) for name, v in zip(sensors, rng.uniform(0.5, 1.0, size=len(sensors)))}


def _block(
    f: _Factors, rng: np.random.Generator, m: int, *, noise: float, nan_fraction: float, target_noise: float
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    shared_dim = f.a.shape[0]
    u = rng.normal(size=(m, shared_dim))
    data: dict[str, np.ndarray] = {}
    score = u @ f.a + 0.5 * np.tanh(u[:, 0] * u[:, 1])
    for name, (kind, _) in f.sensors.items():
        v = rng.normal(size=(m, f.s[name].shape[0]))
        score += f.b[name] * v[:, 0]
        if kind == "series":
            x = np.einsum("nk,tk,kc->ntc", u, f.shared_season, f.w[name]) + np.einsum(
                "nj,tj,jc->ntc", v, f.specific_season[name], f.s[name]
            )
        else:
            x = u @ f.w[name] + v @ f.s[name]
        x = _LOCATION[name] + _SCALE[name] * (x + noise * rng.normal(size=x.shape))
        x = x.astype(np.float32)
        if nan_fraction > 0:
            mask = rng.random(x.shape) < nan_fraction
            mask.reshape(m, -1)[:, 0] = False  # every sample keeps a value: no band is ever all-NaN
            x[mask] = np.nan
        data[name] = x
    target = score + target_noise * rng.normal(size=m)
    return data, target.astype(np.float32)


def write_synthetic_archive(
    path: str | Path,
    n: int,
    *,
    seed: int = 0,
    chunk_size: int = 4096,
    t: int = 12,
    block: int = 65536,
    shared_dim: int = 4,
    specific_dim: int = 2,
    noise: float = 0.3,
    nan_fraction: float = 0.02,
    test_fraction: float = 0.2,
    target_noise: float = 0.1,
    labelled: bool = True,
    sites: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an n-sample archive (format of docs/DESIGN.md) block by block, memory flat in n.

    `labelled=False` writes NaN targets: an unlabeled archive, as pretraining reads it.
    `sites`: number of `group` values (default n // 100, at least 2), assigned at random.
    """
    if n < 2:
        raise ValueError(f"a synthetic archive needs n ≥ 2 samples, got {n}")
    if chunk_size < 1 or block < 1 or t < 1:
        raise ValueError(f"chunk_size, block and t must be ≥ 1, got {chunk_size}, {block}, {t}")
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists (pass overwrite=True / --overwrite to replace it)")
    root = zarr.open_group(str(path), mode="w")
    root.attrs.update(
        {
            "format": FORMAT,
            "version": VERSION,
            "task": "regression",
            "class_names": [],
            "target_name": "synthetic target" if labelled else "none (unlabeled)",
            "target_unit": "",
            "modalities": list(SENSORS),
            "description": (
                f"synthetic multi-sensor archive, {n} samples, seed {seed}: {shared_dim} shared and "
                f"{specific_dim} per-sensor latent factors (colearn_dist.synthetic)"
            ),
        }
    )
    arrays: dict[str, Any] = {}
    for name, (kind, bands) in SENSORS.items():
        shape = (n, t, len(bands)) if kind == "series" else (n, len(bands))
        spec = ModalitySpec(name, kind, bands, time_step="month" if kind == "series" else None)
        arrays[name] = create_modality(root, name, spec, shape=shape, dtype="float32", chunks=(chunk_size,) + shape[1:])
    target = root.create_array("target", shape=(n,), dtype="float32", chunks=(chunk_size,), dimension_names=("sample",))
    split = root.create_array("split", shape=(n,), dtype="uint8", chunks=(1 << 20,), dimension_names=("sample",))
    split.attrs["codes"] = SPLIT_CODES
    # Strings are written a whole chunk at a time (a partial write would re-read and re-encode it).
    block = max(chunk_size, block // chunk_size * chunk_size)
    ids = root.create_array("ids", shape=(n,), dtype=str, chunks=(block,), dimension_names=("sample",))
    group = root.create_array("group", shape=(n,), dtype=str, chunks=(block,), dimension_names=("sample",))
    factors = _Factors(seed, t, shared_dim, specific_dim, SENSORS)
    n_sites = max(2, sites if sites is not None else n // 100)
    for b, start in enumerate(range(0, n, block)):
        stop = min(n, start + block)
        m = stop - start
        rng = np.random.default_rng([seed, 1, b])
        data, y = _block(factors, rng, m, noise=noise, nan_fraction=nan_fraction, target_noise=target_noise)
        for name, arr in arrays.items():
            arr[start:stop] = data[name]
        target[start:stop] = y if labelled else np.full(m, np.nan, dtype=np.float32)
        split[start:stop] = np.where(rng.random(m) < test_fraction, SPLIT_CODES["test"], SPLIT_CODES["train"]).astype(np.uint8)
        ids[start:stop] = np.array([f"syn{i:09d}" for i in range(start, stop)])
        group[start:stop] = np.array([f"site{g:06d}" for g in rng.integers(0, n_sites, size=m)])
    if test_fraction > 0 and n >= 2:
        # a train sample is required; make sure a tiny archive has one
        first = split[0:1]
        if first[0] != SPLIT_CODES["train"]:
            split[0:1] = np.array([SPLIT_CODES["train"]], dtype=np.uint8)
    add_coordinates(root, chunk_size=block)
    open_archive(path, check_values=False)
    return path


__all__ = ["SENSORS", "write_synthetic_archive"]
