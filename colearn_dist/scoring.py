"""Scoring one run: its best weights with each inference sensor set, on one split.

The test split is touched only here, after training, on the weights model selection (validation
split) chose; the engine uses the same functions to validate. Writes the run's `metrics_<split>.json`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .batch import to_device
from .config import RunConfig
from .context import context_label
from .distributed import is_distributed, rank, world_size
from .loader import ShardLoader
from .manifest import Manifest, load_manifest
from .methods import method, sensor_sets, set_name
from .metrics import compute_metrics
from .report import write_embeddings
from .runs import RunDir, Trained, load_trained


def _gather(obj: Any, dst: int | None = None) -> list[Any]:
    """Every rank's `obj`, in rank order: on every rank, or with `dst` on that rank only (the
    others get [] — a test split's predictions need not be copied N times)."""
    if not is_distributed():
        return [obj]
    if dst is None:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    received: list[Any] | None = [None] * dist.get_world_size() if rank() == dst else None
    dist.gather_object(obj, received, dst=dst)
    return received or []


@torch.no_grad()
def predict_loader(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    spec: Any,
    sets: list[list[str]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    gather: bool = True,
    dst: int | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Predictions in target units for each sensor set; with `gather`, collected from every rank
    (a collective: all ranks must call it) — on every rank, or with `dst` on that rank alone (the
    others get empty arrays). Without, this process's loader is the whole split."""
    was_training = model.training
    model.eval()
    names = list(getattr(model, "modalities", []))
    parts: dict[str, dict[str, list[np.ndarray]]] = {set_name(s, names): {"pred": [], "target": [], "index": []} for s in sets}
    for batch in loader:
        batch = to_device(batch, torch.device(device), dtype)
        for sensors in sets:
            pred = model.predict(batch["inputs"], batch.get("month"), modalities=sensors, latlon=batch.get("latlon"))  # type: ignore[operator]
            part = parts[set_name(sensors, names)]
            part["pred"].append(spec.to_target_units(pred.float()).cpu().numpy())
            part["target"].append(batch["target"].cpu().numpy())
            part["index"].append(batch["index"].cpu().numpy())
    model.train(was_training)
    local = {k: {f: np.concatenate(v[f]) if v[f] else np.zeros(0) for f in v} for k, v in parts.items()}
    gathered = _gather(local, dst) if gather else [local]
    if not gathered:
        return {k: {f: v[f][:0] for f in v} for k, v in local.items()}
    return {k: {f: np.concatenate([g[k][f] for g in gathered]) for f in ("pred", "target", "index")} for k in local}


def score_loader(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    spec: Any,
    manifest: Manifest,
    sets: list[list[str]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    gather: bool = True,
) -> dict[str, dict[str, float]]:
    preds = predict_loader(model, loader, spec, sets, device, dtype, gather)
    return {k: compute_metrics(spec.task, v["target"], v["pred"], list(manifest.class_names)) for k, v in preds.items()}


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    shards: str | None = None,
    embeddings: bool = True,
    extra_sets: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """Score a run's best weights on `split` with every inference sensor set, plus `extra_sets`
    (e.g. "s1+s2"); writes metrics_<split>.json.

    A set without best weights of its own is scored with the weights chosen for "all": MDiCo
    averages the heads of the sensors present, a fusion model masks the absent ones. Called by
    every rank of a process group (a collective then), each scores its part of the split and rank 0
    the metrics, which every rank returns; without one, this process scores everything."""
    run = RunDir(run_dir)
    cfg = run.config()
    if shards:
        cfg.data.shards = shards
    own = run_sensor_sets(cfg)
    sets_by_name = run_sensor_sets(cfg, extra_sets)
    # Weights for each set: its own (validation kept some), else those of "all"; one pass per weights.
    by_weights: dict[str, list[list[str]]] = {}
    for name, sensors in sets_by_name.items():
        weights = name if name in own or run.best(name).exists() else "all"
        by_weights.setdefault(weights, []).append(sensors)
    records: list[dict[str, Any]] = []
    for weights, sets in by_weights.items():
        trained = load_trained(run_dir, weights, shards)
        preds = predict_loader(trained.model, _split_loader(trained, split), trained.spec, sets, dst=0)
        if rank() != 0:
            continue
        for name, p in preds.items():
            m = compute_metrics(trained.spec.task, p["target"], p["pred"], list(trained.manifest.class_names))
            records.append(
                {
                    # a cross-validation fold's shards name their dataset and fold (crossval.py)
                    "dataset": (trained.manifest.fold or {}).get("dataset", Path(cfg.data.shards).name),
                    **({"fold": trained.manifest.fold["index"]} if trained.manifest.fold else {}),
                    "setting": "+".join(cfg.data.modalities or list(trained.manifest.modalities)),
                    "context": context_label(cfg.model.context),
                    "method": cfg.model.method,
                    "task": trained.manifest.task,
                    "seed": cfg.train.seed,
                    "sensors": name,
                    "split": split,
                    "run": str(run_dir),
                    "weights": weights,
                    "epoch": trained.epoch,
                    "metrics": m,
                }
            )
    order = list(sets_by_name)
    records.sort(key=lambda r: order.index(str(r["sensors"])))
    if rank() == 0:
        run.metrics(split).write_text(json.dumps(records, indent=1))
    if embeddings and method(cfg.model.method).embeddings:
        trained = load_trained(run_dir, "all", shards)
        _write_embeddings(trained, _split_loader(trained, split), split)
    if is_distributed():
        shared = [records]
        dist.broadcast_object_list(shared, src=0)
        records = shared[0]
    return records


def _split_loader(trained: Trained, split: str) -> ShardLoader:
    """This rank's part of `split` (all of it on one process), in order."""
    return ShardLoader(
        trained.cfg.data.shards,
        split,
        batch_size=512,
        modalities=_data_modalities(trained),
        shuffle=False,
        rank=rank(),
        world_size=world_size(),
    )


def run_sensor_sets(cfg: RunConfig, extra_sets: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Set name → sensors a run is scored with: its own sets (each single sensor, and "all"), then
    each of `extra_sets` ("s1+s2") it can read. A run whose model reads one sensor skips the others;
    a sensor the run was not trained with is an error."""
    names = _model_modalities(cfg)
    sets = {set_name(s, names): s for s in sensor_sets(cfg.model.method, names)}
    data = _data_sensors(cfg)
    for text in extra_sets or ():
        wanted = [m.strip() for m in str(text).split("+") if m.strip()]
        if wanted == ["all"]:
            continue
        unknown = [m for m in wanted if m not in data]
        if unknown or not wanted:
            problem = f"unknown sensor(s) {unknown}" if unknown else "no sensor named"
            raise ValueError(f"sensor set {text!r}: {problem} (the run {cfg.run_dir} has sensors {data}; join them with '+')")
        if any(m not in names for m in wanted):
            continue  # a single-sensor model cannot read the others
        sensors = [m for m in names if m in wanted]  # the run's order, duplicates dropped
        sets.setdefault(set_name(sensors, names), sensors)
    return sets


def _model_modalities(cfg: RunConfig) -> list[str]:
    """The sensors a run's model reads (one for single-sensor methods)."""
    if method(cfg.model.method).per_sensor:
        return [str(cfg.model.modality)]
    return _data_sensors(cfg)


def _data_sensors(cfg: RunConfig) -> list[str]:
    """The sensors a run was trained with (the data it read)."""
    if cfg.data.modalities:
        return list(cfg.data.modalities)
    return list(load_manifest(cfg.data.shards).modalities)


def _data_modalities(trained: Trained) -> list[str]:
    return list(trained.cfg.data.modalities or trained.manifest.modalities)


@torch.no_grad()
def _write_embeddings(trained: Trained, loader: Any, split: str) -> None:
    """Shared and specific embeddings of the split for TensorBoard's projector, coloured by sensor and
    target; each rank embeds its part of the split, rank 0 writes them all."""
    shared: list[np.ndarray] = []
    specific: list[np.ndarray] = []
    meta: list[list[str]] = []
    for batch in loader:
        out = trained.model(batch["inputs"], batch.get("month"), batch.get("latlon"))
        target = _target_labels(batch["target"], trained.manifest)
        for m in trained.modalities:
            shared.append(out["z_sha"][m].numpy())
            specific.append(out["z_spe"][m].numpy())
            meta += [[m, t] for t in target]
    parts = _gather((shared, specific, meta), dst=0)
    if not parts:
        return
    shared = [a for p in parts for a in p[0]]
    specific = [a for p in parts for a in p[1]]
    meta = [row for p in parts for row in p[2]]
    write_embeddings(
        RunDir(trained.run_dir).tb,
        {"shared": np.concatenate(shared), "specific": np.concatenate(specific)},
        meta,
        ["sensor", "target"],
        tag=split,
    )


def _target_labels(target: torch.Tensor, manifest: Manifest) -> list[str]:
    """The projector's target column: the value (regression), the class name (binary, multiclass),
    the positive classes joined with '|' (multilabel)."""
    t = target.cpu().numpy().reshape(len(target), -1)
    if manifest.task == "regression":
        return [f"{float(v):.3f}" for v in t[:, 0]]
    names = list(manifest.class_names)
    names += [str(k) for k in range(len(names), max(t.shape[1], int(t.max(initial=0)) + 1))]
    if manifest.task == "multilabel":
        return ["|".join(names[k] for k in np.flatnonzero(row > 0.5)) for row in t]
    return [names[int(v)] for v in t[:, 0]]


__all__ = ["evaluate_run", "predict_loader", "run_sensor_sets", "score_loader"]
