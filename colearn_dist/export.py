"""Per-sensor deployment: one self-contained TorchScript file per sensor.

The exported module takes the sensor's raw, un-normalised input (NaN where missing; the integer
class with its missing value for a categorical layer) and returns predictions in target units, so
the deployment side needs neither this package nor the shard manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .evaluate import Trained, load_trained


class SensorModel(nn.Module):
    """Normalisation → one sensor's path of a trained model → target units."""

    def __init__(self, trained: Trained, modality: str) -> None:
        super().__init__()
        info = trained.manifest.modalities[modality]
        self.model = trained.model
        self.modality = modality
        self.categorical = info["kind"] == "categorical"
        stats = trained.manifest.stats.get(modality)
        channels = 1 if self.categorical else int(info["shape"][-1])
        mean = np.asarray(stats["mean"], dtype=np.float32) if stats else np.zeros(channels, np.float32)
        std = np.asarray(stats["std"], dtype=np.float32) if stats else np.ones(channels, np.float32)
        # per channel: the last axis of series/static, the first of an image [C, H, W]
        shape = (-1, 1, 1) if info["kind"] == "image" else (-1,)
        self.register_buffer("mean", torch.from_numpy(mean).reshape(shape))
        self.register_buffer("std", torch.from_numpy(std).reshape(shape))
        self.spec = trained.spec

    def forward(self, x: torch.Tensor, month: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.categorical:
            valid = torch.isfinite(x)
            x = torch.where(valid, (x - self.mean) / self.std, torch.zeros_like(x))
        pred = self.model.predict({self.modality: x}, month, modalities=[self.modality])
        return self.spec.to_target_units(pred)


def example_input(trained: Trained, modality: str, batch: int = 4) -> tuple[torch.Tensor, ...]:
    info = trained.manifest.modalities[modality]
    shape = (batch, *info["shape"])
    if info["kind"] == "categorical":
        x = torch.randint(0, int(info["num_classes"]), shape)
    else:
        x = torch.randn(shape)
    if trained.manifest.has_month and info["kind"] in ("series", "categorical"):
        steps = int(info["shape"][0])
        return x, torch.randint(1, 13, (batch, steps))
    return (x,)


def export_sensor(run_dir: str | Path, modality: str, out: str | Path | None = None) -> Path:
    """Trace the weights validation chose for `modality` and save a TorchScript file with its metadata."""
    trained = load_trained(run_dir, modality)
    module = SensorModel(trained, modality).eval()
    example = example_input(trained, modality)
    with torch.no_grad():
        traced = torch.jit.trace(module, example, check_trace=False)
    out = Path(out) if out else Path(run_dir) / f"model_{modality}.pt"
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


@torch.no_grad()
def predict_archive(model_path: str | Path, archive_path: str | Path, split: str | None = None, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Apply an exported sensor model to the raw arrays of an archive; returns (ids, predictions)."""
    from .archive import open_archive

    module, meta = load_exported(model_path)
    archive = open_archive(archive_path, check_values=False)
    modality = meta["modality"]
    if modality not in archive.modalities:
        raise ValueError(f"{archive_path}: no modality {modality!r} for model {model_path} (has {list(archive.modalities)})")
    rows = archive.split_indices(split) if split else np.arange(archive.num_samples)
    arr = archive.array(modality)
    month = archive.month
    preds = []
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        x = np.asarray(arr.oindex[idx]) if hasattr(arr, "oindex") else np.asarray(arr[idx])
        x_t = torch.from_numpy(x.astype(np.int64) if meta["input"]["kind"] == "categorical" else x.astype(np.float32))
        if meta["takes_month"]:
            m = torch.from_numpy(np.asarray(month.oindex[idx]).astype(np.int64))
            preds.append(module(x_t, m).numpy())
        else:
            preds.append(module(x_t).numpy())
    return archive.ids[rows], np.concatenate(preds) if preds else np.zeros(0)
