"""Shared fixtures: small synthetic archives / shards (any task), and the bundled Presto archives.

Factories rather than fixed fixtures, so each test states the data it needs:

    def test_x(synthetic_archive, synthetic_shards):
        path = synthetic_archive(n=120, task="multiclass", groups=0)
        manifest = synthetic_shards(n=120, samples_per_shard=16)   # archive + shards in one go
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from colearn_dist.importers import bundled_path, import_presto
from colearn_dist.shards import write_shards

from helpers import make_synthetic_archive


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
    cache: dict[str, Path] = {}

    def factory(name: str = "fuel_moisture") -> Path:
        if name not in cache:
            cache[name] = import_presto(bundled_path(name), tmp_path_factory.mktemp("presto") / f"{name}.zarr")
        return cache[name]

    return factory


@pytest.fixture(scope="module")
def run_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of a 400-sample synthetic archive with a grouped val split: what training tests run on."""
    root = tmp_path_factory.mktemp("run-shards")
    archive = make_synthetic_archive(root / "a.zarr", n=400, t=4, groups=20)
    write_shards(archive, root / "shards", samples_per_shard=40, workers=1, val_fraction=0.15, progress=False)
    return root / "shards"
