"""Shared fixtures: small synthetic archives / shards (any task), and the bundled Presto archives.

Factories rather than fixed fixtures, so each test states the data it needs:

    def test_x(synthetic_archive, synthetic_shards):
        path = synthetic_archive(n=120, task="multiclass", groups=0)
        manifest = synthetic_shards(n=120, samples_per_shard=16)   # archive + shards in one go
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pytest

from colearn_dist.archive import ModalitySpec, write_archive

# name -> (kind, bands, extra spec fields); series / categorical get T steps.
DEFAULT_MODALITIES: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]] = {
    "s1": ("series", ("VV", "VH"), {"units": ("dB", "dB"), "time_step": "month"}),
    "s2": ("series", ("B2", "B4", "B8", "NDVI"), {"time_step": "month"}),
    "srtm": ("static", ("elevation", "slope"), {"units": ("m", "degrees")}),
    "dw": ("categorical", ("dynamic_world",), {"num_classes": 5, "missing_value": 4, "time_step": "month"}),
}


def make_synthetic_arrays(
    n: int = 240,
    *,
    t: int = 6,
    task: str = "regression",
    num_classes: int = 3,
    groups: int = 12,
    with_val: bool = False,
    test_fraction: float = 0.2,
    nan_fraction: float = 0.05,
    month: bool = True,
    latlon: bool = True,
    modalities: Mapping[str, tuple[str, tuple[str, ...], dict[str, Any]]] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The keyword arguments of `write_archive` for a small, learnable synthetic dataset.

    Targets depend on s1 band 0 and the first static band, so a model can learn them; NaNs are
    sprinkled over float modalities (never a whole band); categorical modalities use their
    `missing_value` for ~nan_fraction of steps.
    """
    rng = np.random.default_rng(seed)
    specs = dict(DEFAULT_MODALITIES if modalities is None else modalities)
    mods: dict[str, tuple[np.ndarray, ModalitySpec]] = {}
    for name, (kind, bands, extra) in specs.items():
        if kind == "series":
            x = rng.normal(loc=np.arange(len(bands)), scale=1.0 + np.arange(len(bands)), size=(n, t, len(bands)))
        elif kind == "static":
            x = rng.normal(loc=10.0 * np.arange(1, len(bands) + 1), scale=2.0, size=(n, len(bands)))
        else:
            k = int(extra["num_classes"])
            missing = extra.get("missing_value")
            valid = k - 1 if missing is not None and missing == k - 1 else k
            x = rng.integers(0, valid, size=(n, t)).astype(np.uint8)
            if missing is not None:
                x[rng.random((n, t)) < nan_fraction] = missing
            mods[name] = (x, ModalitySpec(name, kind, bands, **extra))
            continue
        x = x.astype(np.float32)
        if nan_fraction > 0:
            mask = rng.random(x.shape) < nan_fraction
            mask.reshape(n, -1)[:, 0] = False  # every sample keeps a value, so no band is ever all-NaN
            x[mask] = np.nan
        mods[name] = (x, ModalitySpec(name, kind, bands, **extra))

    first_series = next((m for m, (k, _, _) in specs.items() if k == "series"), None)
    first_static = next((m for m, (k, _, _) in specs.items() if k == "static"), None)
    score = np.zeros(n)
    if first_series is not None:
        score += np.nan_to_num(np.nanmean(mods[first_series][0][..., 0], axis=1))
    if first_static is not None:
        score += 0.1 * (np.nan_to_num(mods[first_static][0][:, 0]) - 10.0)
    class_names: tuple[str, ...] = ()
    if task == "regression":
        target = 50.0 + 10.0 * score + rng.normal(scale=1.0, size=n)
    elif task == "binary":
        target = (score > np.median(score)).astype(np.int64)
        class_names = ("negative", "positive")
    elif task == "multiclass":
        edges = np.quantile(score, np.linspace(0, 1, num_classes + 1)[1:-1])
        target = np.digitize(score, edges).astype(np.int64)
        class_names = tuple(f"class{i}" for i in range(num_classes))
    elif task == "multilabel":
        target = (score[:, None] + rng.normal(size=(n, num_classes)) > 0).astype(np.uint8)
        class_names = tuple(f"label{i}" for i in range(num_classes))
    else:
        raise ValueError(f"unknown task {task!r}")

    split = np.zeros(n, dtype=np.uint8)
    order = rng.permutation(n)
    n_test = int(round(test_fraction * n))
    split[order[:n_test]] = 2
    if with_val:
        split[order[n_test : n_test + max(1, n // 10)]] = 1
    out: dict[str, Any] = {
        "modalities": mods,
        "target": target,
        "task": task,
        "split": split,
        "ids": np.array([f"s{i:06d}" for i in range(n)]),
        "class_names": class_names,
        "target_name": "synthetic target",
        "target_unit": "u" if task == "regression" else "",
    }
    if groups:
        out["group"] = np.array([f"site{g:03d}" for g in rng.integers(0, groups, size=n)])
    if latlon:
        out["latlon"] = np.stack([rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)], axis=1)
    if month:
        start = rng.integers(0, 12, size=(n, 1))
        out["month"] = (start + np.arange(t)[None, :]) % 12 + 1
    return out


def make_synthetic_archive(path: str | Path, *, chunk_size: int = 64, overwrite: bool = False, **kwargs: Any) -> Path:
    """Write a synthetic archive (small zarr chunks, so multi-chunk reads are exercised)."""
    arrays = make_synthetic_arrays(**kwargs)
    modalities = arrays.pop("modalities")
    return write_archive(path, modalities, chunk_size=chunk_size, overwrite=overwrite, **arrays)


@pytest.fixture
def synthetic_archive(tmp_path_factory: pytest.TempPathFactory):
    """Factory: `synthetic_archive(n=240, task="regression", groups=12, with_val=False, ...) -> Path`.

    Keyword arguments are those of `make_synthetic_arrays` plus `path` and `chunk_size`; each call
    writes a fresh archive in its own temporary folder (safe to modify).
    """

    def factory(*, path: str | Path | None = None, **kwargs: Any) -> Path:
        if path is None:
            path = tmp_path_factory.mktemp("archive") / "synthetic.zarr"
        return make_synthetic_archive(path, **kwargs)

    return factory


@pytest.fixture
def synthetic_shards(synthetic_archive, tmp_path_factory: pytest.TempPathFactory):
    """Factory: archive + shards in one call; returns the `Manifest`.

    Shard options (`samples_per_shard`, `seed`, `workers`, `val_fraction`, `shuffle_window`) go to
    `write_shards` (defaults: 32 samples per shard, 1 worker, no progress bar); everything else to
    `synthetic_archive`.
    """
    from colearn_dist.shards import write_shards

    shard_keys = ("samples_per_shard", "seed", "workers", "val_fraction", "shuffle_window")

    def factory(**kwargs: Any):
        shard_kwargs = {"samples_per_shard": 32, "workers": 1, "progress": False}
        shard_kwargs.update({k: kwargs.pop(k) for k in shard_keys if k in kwargs})
        archive = synthetic_archive(**kwargs)
        return write_shards(archive, tmp_path_factory.mktemp("shards"), **shard_kwargs)

    return factory


@pytest.fixture(scope="session")
def presto_archive(tmp_path_factory: pytest.TempPathFactory):
    """Factory: `presto_archive("fuel_moisture" | "algae_blooms") -> Path`, imported once per session.

    Shared between tests: treat it as read-only.
    """
    from colearn_dist.importers import bundled_path, import_presto

    cache: dict[str, Path] = {}

    def factory(name: str = "fuel_moisture") -> Path:
        if name not in cache:
            cache[name] = import_presto(bundled_path(name), tmp_path_factory.mktemp("presto") / f"{name}.zarr")
        return cache[name]

    return factory


@pytest.fixture(scope="module")
def run_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of a 400-sample synthetic archive with a grouped val split: what training tests run on."""
    from colearn_dist.shards import write_shards

    root = tmp_path_factory.mktemp("run-shards")
    archive = make_synthetic_archive(root / "a.zarr", n=400, t=4, groups=20)
    write_shards(archive, root / "shards", samples_per_shard=40, workers=1, val_fraction=0.15, progress=False)
    return root / "shards"
