"""Helpers shared by the test modules (fixtures live in conftest.py): synthetic archives, small
run configs, CLI subprocesses, weight comparisons, and reference implementations used as oracles."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from colearn_dist.archive import ModalitySpec, write_archive
from colearn_dist.config import load_config
from colearn_dist.distributed import gather_with_grad
from colearn_dist.engine import train
from colearn_dist.manifest import Manifest
from colearn_dist.objective import _pairwise_nt_xent_sums as pairwise_nt_xent_sums
from colearn_dist.objective import _upcast as upcast
from colearn_dist.shards import write_shards

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


SMALL_MODEL = {
    "method": "mdico",
    "embedding_dim": 16,
    "encoders": {"default": {"type": "tempcnn", "hidden": 8, "depth": 2, "dropout": 0.1}, "srtm": {"type": "mlp", "hidden": 8, "depth": 1}},
}


def write_config(path: Path, shards: Path, run_dir: Path, **sections) -> Path:
    cfg = {
        "name": "test",
        "run_dir": str(run_dir),
        "data": {"shards": str(shards), "batch_size": 16, "workers": 0, "shuffle_buffer": 64},
        "model": SMALL_MODEL,
        "train": {"epochs": 3, "patience": 0, "log_every_steps": 5, "threads": 1, "seed": 0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    path.write_text(yaml.safe_dump(cfg))
    return path


# What an in-process run leaves in os.environ must not leak into a child: it would join that rendezvous.
RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def run_cli(args: list[str], env_extra: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env_extra or {})})
    return subprocess.Popen([sys.executable, "-m", "colearn_dist.cli", *args], env=env, **kw)


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    state = torch.load(run_dir / "checkpoints" / latest / "mp_rank_00_model_states.pt", weights_only=False)
    return state["module"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def train_run(root, archive, **sections):
    """Shards of `archive` (once per root) and a trained run of the small model; its directory."""
    if not (root / "shards" / "manifest.json").exists():
        write_shards(archive, root / "shards", samples_per_shard=40, workers=1, progress=False)
    run = root / sections.pop("name", "run")
    train(load_config(write_config(root / f"{run.name}.yaml", root / "shards", run, **sections)))
    return run


def shard_paths(manifest: Manifest, split: str) -> list[Path]:
    """Shard files of a split in shard order (empty list for an empty split)."""
    manifest.split_size(split)  # an unknown split is an error
    return [manifest.path / s["name"] for s in manifest.splits[split]["shards"]]


def read_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows back from `report.write_csv`: numbers as int / float, empty cells left out of the row."""

    def parse(s: str) -> Any:
        for cast in (int, float):
            try:
                return cast(s)
            except ValueError:
                pass
        return s

    with open(path, newline="") as f:
        return [{k: parse(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


class OneSensor(nn.Module):
    """`model.predict({modality: x}, modalities=[modality])` as a module, so `torch.jit.trace` registers the
    model's parameters instead of trying to bake grad-requiring tensors into a traced lambda (which fails)."""

    def __init__(self, model: nn.Module, modality: str):
        super().__init__()
        if modality not in getattr(model, "modalities", []):
            raise KeyError(f"{modality!r} is not a modality of the model ({getattr(model, 'modalities', None)})")
        self.model = model
        self.modality = modality

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        return self.model.predict({self.modality: x}, month, modalities=[self.modality])  # type: ignore[operator]


def nt_xent(z_a: Tensor, z_b: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric NT-Xent between paired embeddings over the global batch, in rank-contribution form.

    Single process: the mean over the 2N anchors, identical to pytorch-metric-learning's
    `SelfSupervisedLoss(NTXentLoss(temperature), symmetric=True)`. Distributed: this rank's share;
    the sum over ranks is the global value (collective: every rank must call it).
    """
    local = F.normalize(torch.stack([upcast(z_a), upcast(z_b)], dim=1), dim=2)
    gathered, offset = gather_with_grad(local)
    sums = pairwise_nt_xent_sums(local.transpose(0, 1), gathered.transpose(0, 1), offset, temperature)
    return (sums[0, 1] + sums[1, 0]) / (2 * gathered.shape[0])
