"""The batch contract (docs/DESIGN.md "Batches"): the loader's normalised inputs, moved to a device,
and the normalisation itself — one formula for the loader and for the exported per-sensor models,
so a deployed model sees exactly what training saw."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .manifest import Manifest


def norm_stats(manifest: Manifest, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-band train mean and std of a modality, shaped to broadcast against one sample (images:
    [C, 1, 1], channels first); None for a categorical modality (its codes are not normalised)."""
    mod = manifest.modality(name)
    if mod.kind == "categorical":
        return None
    stats = manifest.stats.get(name)
    mean = np.asarray(stats["mean"], dtype=np.float32) if stats else np.zeros(mod.channels, np.float32)
    std = np.asarray(stats["std"], dtype=np.float32) if stats else np.ones(mod.channels, np.float32)
    if mod.kind == "image":
        mean, std = mean[:, None, None], std[:, None, None]
    return mean, std


def normalise(x: Tensor, mean: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """Raw values → (normalised values with 0 where missing, valid mask); missing is NaN (archives
    hold no infinities; a deployed model treats them as missing too)."""
    valid = torch.isfinite(x)
    return torch.where(valid, (x - mean) / std, torch.zeros_like(x)), valid


def denormalise(x: Tensor, mean: Tensor, std: Tensor, valid: Tensor | None = None) -> Tensor:
    """Normalised values → raw units; NaN where `valid` is False."""
    out = x.float() * std + mean
    return out if valid is None else torch.where(valid, out, torch.full_like(out, float("nan")))


def to_device(batch: dict[str, Any], device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A loader batch on `device`, float inputs in `dtype`; targets stay fp32 for the loss."""

    def move(t: Any) -> Any:
        if isinstance(t, dict):
            return {k: move(v) for k, v in t.items()}
        if isinstance(t, torch.Tensor):
            t = t.to(device, non_blocking=True)
            return t.to(dtype) if t.is_floating_point() and dtype != torch.float32 else t
        return t

    out = {k: move(v) for k, v in batch.items() if k != "target"}
    out["target"] = batch["target"].to(device)
    return out


__all__ = ["denormalise", "norm_stats", "normalise", "to_device"]
