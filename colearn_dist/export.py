"""Per-sensor deployment: one self-contained TorchScript file per sensor.

The exported module takes the sensor's raw, un-normalised input (NaN where missing; the integer
class with its missing value for a categorical layer) and returns predictions in target units, so
the deployment side needs neither this package nor the shard manifest.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .archive import open_archive
from .batch import norm_stats, normalise
from .loader import ShardLoader
from .manifest import load_manifest
from .runs import RunDir, Trained, load_trained


class SensorModel(nn.Module):
    """Normalisation → one sensor's path of a trained model → target units."""

    def __init__(self, trained: Trained, modality: str) -> None:
        super().__init__()
        self.model = trained.model
        self.modality = modality
        norm = norm_stats(trained.manifest, modality)
        self.categorical = norm is None
        mean, std = norm if norm is not None else (np.zeros(1, np.float32), np.ones(1, np.float32))
        self.register_buffer("mean", torch.from_numpy(mean))
        self.register_buffer("std", torch.from_numpy(std))
        self.spec = trained.spec

    def forward(self, x: torch.Tensor, month: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.categorical:
            x, _ = normalise(x, self.mean, self.std)  # type: ignore[arg-type]
        pred = self.model.predict({self.modality: x}, month, modalities=[self.modality])  # type: ignore[operator]
        return self.spec.to_target_units(pred)


def example_input(trained: Trained, modality: str, batch: int = 4) -> tuple[torch.Tensor, ...]:
    mod = trained.manifest.modality(modality)
    shape = (batch, *mod.shape)
    x = torch.randint(0, int(mod.num_classes or 1), shape) if mod.kind == "categorical" else torch.randn(shape)
    if trained.manifest.has_month and mod.steps is not None:
        return x, torch.randint(1, 13, (batch, mod.steps))
    return (x,)


def export_sensor(run_dir: str | Path, modality: str, out: str | Path | None = None) -> Path:
    """Trace the weights validation chose for `modality` and save a TorchScript file with its metadata."""
    trained = load_trained(run_dir, modality)
    module = SensorModel(trained, modality).eval()
    example = example_input(trained, modality)
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    out = Path(out) if out else RunDir(run_dir).exported(modality)
    meta = {
        "modality": modality,
        "input": trained.manifest.modalities[modality],
        "takes_month": len(example) == 2,
        "task": trained.manifest.task,
        "class_names": list(trained.manifest.class_names),
        "target_name": trained.manifest.target_name,
        "target_unit": trained.manifest.target_unit,
        "method": trained.cfg.model.method,
        "run": str(run_dir),
    }
    traced.save(str(out), _extra_files={"colearn.json": json.dumps(meta)})
    return out


def load_exported(path: str | Path) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    files = {"colearn.json": ""}
    module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
    return module, json.loads(files["colearn.json"])


def predict(
    model_path: str | Path, data_path: str | Path, split: str | None = None, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Apply an exported sensor model to an archive or to a shards folder (it has `manifest.json`);
    returns (ids, predictions in target units)."""
    if (Path(data_path) / "manifest.json").exists():
        return predict_shards(model_path, data_path, split, batch_size)
    return predict_archive(model_path, data_path, split, batch_size)


def predict_archive(
    model_path: str | Path, archive_path: str | Path, split: str | None = None, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The model on the raw arrays of an archive (`split`, or every sample), in archive order."""
    module, meta = load_exported(model_path)
    archive = open_archive(archive_path, check_values=False)
    modality = meta["modality"]
    if modality not in archive.modalities:
        raise ValueError(f"{archive_path}: no modality {modality!r} for model {model_path} (has {list(archive.modalities)})")
    rows = archive.split_indices(split) if split else np.arange(archive.num_samples)
    arr, month = archive.array(modality), archive.month
    if meta["takes_month"] and month is None:
        raise ValueError(f"{archive_path}: model {model_path} takes months, the archive has none")

    def take(a: Any, idx: np.ndarray) -> np.ndarray:
        return np.asarray(a.oindex[idx]) if hasattr(a, "oindex") else np.asarray(a[idx])

    def batches():
        for start in range(0, len(rows), batch_size):
            idx = rows[start : start + batch_size]
            yield archive.ids[idx], take(arr, idx), take(month, idx) if meta["takes_month"] else None

    return _apply(module, meta, batches())


def predict_shards(
    model_path: str | Path, shards_dir: str | Path, split: str | None, batch_size: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """The model on one split of shards, in the shards' order: the loader's normalised inputs are
    turned back into raw values (NaN where missing) and go through the exported module as raw
    archive values would."""
    module, meta = load_exported(model_path)
    manifest = load_manifest(shards_dir)
    modality = meta["modality"]
    if modality not in manifest.modalities:
        raise ValueError(f"{shards_dir}: no modality {modality!r} for model {model_path} (has {list(manifest.modalities)})")
    if not split:
        raise ValueError(f"{shards_dir}: shards need a split (--split): one of {sorted(manifest.splits)}")
    loader = ShardLoader(shards_dir, split, batch_size=batch_size, modalities=[modality], shuffle=False)

    def batches():
        for batch in loader:
            if meta["takes_month"] and "month" not in batch:
                raise ValueError(f"{shards_dir}: model {model_path} takes months, the shards have none")
            x = loader.denormalise(modality, batch["inputs"][modality], batch["valid"][modality])
            yield np.asarray(batch["id"]), x, batch["month"].numpy() if meta["takes_month"] else None

    return _apply(module, meta, batches())


@torch.no_grad()
def _apply(
    module: torch.jit.ScriptModule, meta: dict[str, Any], batches: Iterable[tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]
) -> tuple[np.ndarray, np.ndarray]:
    """(ids, raw input, month or None) batches through an exported module → (ids, predictions)."""
    categorical = meta["input"]["kind"] == "categorical"
    ids, preds = [], []
    for batch_ids, x, month in batches:
        args = [torch.from_numpy(x.astype(np.int64) if categorical else x.astype(np.float32))]
        if month is not None:
            args.append(torch.from_numpy(np.asarray(month).astype(np.int64)))
        ids.append(np.asarray(batch_ids))
        preds.append(module(*args).numpy())
    if not preds:
        return np.zeros(0, dtype=str), np.zeros(0)
    return np.concatenate(ids), np.concatenate(preds)
