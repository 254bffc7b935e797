"""Scoring: each trained run with each inference sensor set, then tables over methods and seeds.

The test split is touched only here, after training, on the weights model selection (validation
split) chose. Runs write `metrics_<split>.json`; `evaluate_runs` aggregates any number of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import yaml
import torch.distributed as dist

from .config import RunConfig, from_dict
from .metrics import PRIMARY, TABLE_METRICS, compute_metrics
from .shards import Manifest, load_manifest


REFERENCE_NAME = "random forest, same sensors"
# Columns of the result tables: the method, then the baselines it must beat, the all-sensor reference last.
METHOD_ORDER = ("mdico", "single", "dropout", "distill", "fusion")


@dataclass
class Trained:
    cfg: RunConfig
    model: torch.nn.Module
    manifest: Manifest
    modalities: list[str]
    run_dir: Path
    epoch: int = 0  # when validation chose these weights

    @property
    def spec(self):
        from .objective import TaskSpec

        return TaskSpec.from_manifest(self.manifest)


def load_trained(run_dir: str | Path, sensors: str, shards: str | None = None) -> Trained:
    """The weights of a run chosen (on the validation split) for inference with `sensors`
    ("s1", "s1+s2", "all" …), ready for inference on CPU."""
    from .engine import best_path, build

    run_dir = Path(run_dir)
    best = best_path(run_dir, sensors)
    if not best.exists():
        have = sorted(p.stem for p in (run_dir / "best").glob("*.pt"))
        if not have:
            raise FileNotFoundError(f"{run_dir}: no best weights (has this run finished at least one epoch?)")
        raise ValueError(f"{run_dir}: no sensor {sensors!r} (the model has weights for {have})")
    saved = torch.load(best, map_location="cpu", weights_only=False)
    cfg = from_dict(RunConfig, saved["config"], f"{best}:config")
    if shards:
        cfg.data.shards = shards
    manifest = load_manifest(cfg.data.shards)
    built = _build_without_teacher(cfg, manifest, build)
    built.model.load_state_dict(saved["model"])
    built.model.eval()
    return Trained(cfg=cfg, model=built.model, manifest=manifest, modalities=built.model_modalities, run_dir=run_dir, epoch=saved["epoch"])


def _build_without_teacher(cfg: RunConfig, manifest: Manifest, build: Any) -> Any:
    """A distillation student needs its teacher only to train (and a fine-tuned model its pretrain run)."""
    if cfg.model.method != "distill":
        return build(cfg, manifest, init=False)
    student = from_dict(RunConfig, cfg.to_dict())
    student.model.method = "single"
    return build(student, manifest, init=False)


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def predict_loader(
    model: torch.nn.Module,
    loader: Iterable[dict[str, Any]],
    spec: Any,
    sets: list[list[str]],
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    gather: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Predictions in target units for each sensor set; with `gather`, collected from every rank
    (a collective: all ranks must call it). Without, this process's loader is the whole split."""
    from .engine import set_name, to_device

    was_training = model.training
    model.eval()
    names = list(getattr(model, "modalities", []))
    parts: dict[str, dict[str, list[np.ndarray]]] = {set_name(s, names): {"pred": [], "target": [], "index": []} for s in sets}
    for batch in loader:
        batch = to_device(batch, torch.device(device), dtype)
        for sensors in sets:
            pred = model.predict(batch["inputs"], batch.get("month"), modalities=sensors)
            part = parts[set_name(sensors, names)]
            part["pred"].append(spec.to_target_units(pred.float()).cpu().numpy())
            part["target"].append(batch["target"].cpu().numpy())
            part["index"].append(batch["index"].cpu().numpy())
    model.train(was_training)
    local = {k: {f: np.concatenate(v[f]) if v[f] else np.zeros(0) for f in v} for k, v in parts.items()}
    gathered = _gather(local) if gather else [local]
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
    averages the heads of the sensors present, a fusion model masks the absent ones."""
    from .engine import best_path
    from .loader import ShardLoader

    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    if shards:
        cfg.data.shards = shards
    own = run_sensor_sets(cfg)
    sets_by_name = run_sensor_sets(cfg, extra_sets)
    # Weights for each set: its own (validation kept some), else those of "all"; one pass per weights.
    by_weights: dict[str, list[list[str]]] = {}
    for name, sensors in sets_by_name.items():
        weights = name if name in own or best_path(run_dir, name).exists() else "all"
        by_weights.setdefault(weights, []).append(sensors)
    records = []
    for weights, sets in by_weights.items():
        trained = load_trained(run_dir, weights, shards)
        loader = ShardLoader(trained.cfg.data.shards, split, batch_size=512, modalities=_data_modalities(trained), shuffle=False)
        metrics = score_loader(trained.model, loader, trained.spec, trained.manifest, sets, gather=False)
        for name, m in metrics.items():
            records.append(
                {
                    "dataset": Path(cfg.data.shards).name,
                    "setting": "+".join(cfg.data.modalities or list(trained.manifest.modalities)),
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
    records.sort(key=lambda r: order.index(r["sensors"]))
    Path(run_dir, f"metrics_{split}.json").write_text(json.dumps(records, indent=1))
    if embeddings and cfg.model.method == "mdico":
        trained = load_trained(run_dir, "all", shards)
        loader = ShardLoader(trained.cfg.data.shards, split, batch_size=512, modalities=_data_modalities(trained), shuffle=False)
        _write_embeddings(trained, loader, split)
    return records


def _run_config(run_dir: Path) -> RunConfig:
    return from_dict(RunConfig, yaml.safe_load((run_dir / "config.yaml").read_text()), f"{run_dir}/config.yaml")


def run_sensor_sets(cfg: RunConfig, extra_sets: Iterable[str] | None = None) -> dict[str, list[str]]:
    """Set name → sensors a run is scored with: its own sets (each single sensor, and "all"), then
    each of `extra_sets` ("s1+s2") it can read. A run whose model reads one sensor skips the others;
    a sensor the run was not trained with is an error."""
    from .engine import sensor_sets, set_name

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
    if cfg.model.method in ("single", "distill"):
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
    """Shared and specific embeddings of the split for TensorBoard's projector, coloured by sensor and target."""
    from .report import write_embeddings

    shared, specific, meta = [], [], []
    for batch in loader:
        out = trained.model(batch["inputs"], batch.get("month"))
        target = _target_labels(batch["target"], trained.manifest)
        for m in trained.modalities:
            shared.append(out["z_sha"][m].numpy())
            specific.append(out["z_spe"][m].numpy())
            meta += [[m, t] for t in target]
    write_embeddings(
        trained.run_dir / "tb",
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


def load_records(run_dirs: Iterable[str | Path], split: str = "test", extra_sets: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Records of finished runs: their metrics_<split>.json where it holds every sensor set asked
    for (each run's own, plus `extra_sets`), otherwise the run is evaluated (again)."""
    extra_sets = list(extra_sets or [])
    records = []
    for run in run_dirs:
        path = Path(run) / f"metrics_{split}.json"
        wanted = set(run_sensor_sets(_run_config(Path(run)), extra_sets)) if extra_sets else set()
        recs = json.loads(path.read_text()) if path.exists() else None
        if recs is None or not wanted <= {r["sensors"] for r in recs}:
            recs = evaluate_run(run, split, extra_sets=extra_sets)
        for r in recs:
            records.append({k: v for k, v in r.items() if k != "metrics"} | r["metrics"])
    return records


def evaluate_runs(
    run_dirs: Iterable[str | Path],
    out_dir: str | Path,
    split: str = "test",
    reference: dict[str, dict[str, float]] | None = None,
    extra_sets: Iterable[str] | None = None,
) -> str:
    """Mean ± std over seeds for each method × inference sensor set (each run's own, plus
    `extra_sets` such as "s1+s2"): CSV (every metric), Markdown (a table per scalar metric of the
    task; per-class F1 stays in the CSV), PNG; returns the primary metric's Markdown, to print."""
    from .report import aggregate, markdown_table, plot_scores, write_csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_records(run_dirs, split, extra_sets)
    if not records:
        raise ValueError("no runs to evaluate")
    rows = aggregate(records)
    write_csv(rows, out_dir / f"results_{split}.csv")
    task = records[0]["task"]
    task_metric = PRIMARY[task][0]
    sections, others = [], []
    for dataset in sorted({r["dataset"] for r in rows}):
        for setting in sorted({r["setting"] for r in rows if r["dataset"] == dataset}):
            sub = [r for r in rows if r["dataset"] == dataset and r["setting"] == setting]
            ref = (reference or {}).get(dataset)
            if ref is not None and setting in ref:  # the row "all" of this setting is the setting's sensor set
                ref = {**ref, "all": ref[setting]}
            order = {
                "methods": [m for m in METHOD_ORDER if any(r["method"] == m for r in sub)],
                "sensors": _sensor_order(sub),
            }
            for metric in TABLE_METRICS[task]:
                reference_column = ref if metric == task_metric else None  # reference scores are primary-metric scores
                table = markdown_table(sub, metric, reference_column, reference_name=REFERENCE_NAME, **order)
                (sections if metric == task_metric else others).append(f"### {dataset} — trained with {setting} ({split} {metric})\n\n" + table)
            png = out_dir / f"scores_{dataset}_{setting.replace('+', '-')}_{split}.png"
            plot_scores(sub, task_metric, png, reference=ref, reference_name=REFERENCE_NAME, **order)
    text = "\n\n".join(sections) + "\n"
    (out_dir / f"results_{split}.md").write_text("\n\n".join(sections + others) + "\n")
    return text


def _sensor_order(rows: list[dict[str, Any]]) -> list[str]:
    """Single sensors in the order runs list them (the archive's), then combinations."""
    by_method: dict[str, list[str]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r["sensors"])
    widest = max(by_method.values(), key=lambda sensors: len(set(sensors)))  # a multi-sensor run lists them in archive order
    seen = list(dict.fromkeys(widest + [r["sensors"] for r in rows]))
    return [s for s in seen if "+" not in s and s != "all"] + [s for s in seen if "+" in s or s == "all"]
