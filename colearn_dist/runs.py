"""A run: its directory (every path in it, the one way to read its config and state) and its model
(built from config + manifest, or loaded with the weights validation chose).

Layout of a run directory:

    config.yaml            the config it was started with
    checkpoints/           DeepSpeed checkpoints + state.json (checkpoint.Checkpointer)
    best/<sensors>.pt      weights chosen on validation for inference with those sensors
    tb/, train.log         TensorBoard scalars (and projector embeddings), the console log
    metrics_<split>.json   scores of each sensor set (scoring.evaluate_run)
    jobs.json, slurm/      Slurm submissions and Submitit's files
    model_<sensor>.pt2     exported per-sensor models (torch.export; .onnx with --format onnx),
    model_<sensor>.*.stac.json  each with its STAC Machine Learning Model item
    LOCK                   held by the one process writing the run (runlock.RunLock)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from .checkpoint import Checkpointer, load_weights
from .config import RunConfig, check_encoder_names, from_dict, load_config
from .context import ContextSpec, context_spec
from .manifest import Manifest, load_manifest, modality_inputs
from .methods import build_model, method
from .model import MDiCo, freeze_encoders, load_pretrained
from .objective import TaskSpec
from .runlock import RunLock


@dataclass(frozen=True)
class RunDir:
    """Every path of a run directory."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    def checkpointer(self, keep: int = 2, log: Callable[[str], None] | None = None) -> Checkpointer:
        """Its checkpoints; `log` receives what it notices (a removal, an ignored pointer)."""
        return Checkpointer(self.path, keep=keep) if log is None else Checkpointer(self.path, keep=keep, log=log)

    def lock(self) -> RunLock:
        """The one-writer lock of the run (taken by its trainer)."""
        return RunLock(self.path)

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    def best(self, sensors: str) -> Path:
        """Weights validation chose for inference with `sensors` ("s1", "s1+s2", "all" …)."""
        return self.best_dir / f"{sensors}.pt"

    def best_sets(self) -> list[str]:
        return sorted(p.stem for p in self.best_dir.glob("*.pt"))

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    @property
    def log(self) -> Path:
        return self.path / "train.log"

    def metrics(self, split: str) -> Path:
        return self.path / f"metrics_{split}.json"

    @property
    def jobs(self) -> Path:
        return self.path / "jobs.json"

    @property
    def slurm(self) -> Path:
        return self.path / "slurm"

    def exported(self, modality: str, fmt: str = "pt2") -> Path:
        """Where `colearn-dist export` writes a sensor's model (`fmt`: pt2 | onnx)."""
        return self.path / f"model_{modality}.{fmt}"

    def config(self) -> RunConfig:
        """The config the run was started with."""
        if not self.config_file.exists():
            raise FileNotFoundError(f"{self.path}: no config.yaml (was this run started by colearn-dist?)")
        return load_config(self.config_file)

    def latest_state(self) -> dict[str, Any] | None:
        """The progress state of the latest complete checkpoint (step, epoch, world size, history …)."""
        checkpointer = self.checkpointer()
        latest = checkpointer.latest()
        return None if latest is None else checkpointer.state(latest)


@dataclass
class Built:
    """What a run needs besides data: the modalities it reads, the model, the task."""

    modalities: list[str]
    model_modalities: list[str]
    model: torch.nn.Module
    spec: TaskSpec
    teacher: torch.nn.Module | None = None
    # fine-tuning: what `model.init_from` provided ({"from", "loaded", "skipped"}); None otherwise
    init_report: dict[str, Any] | None = None
    # what the encoders see besides their sensor (None: `model.context` unset, the old behaviour)
    context: ContextSpec | None = None
    has_month: bool = False


def resolve_modalities(cfg: RunConfig, manifest: Manifest) -> list[str]:
    check_encoder_names(cfg, list(manifest.modalities))
    names = list(cfg.data.modalities) or list(manifest.modalities)
    unknown = [m for m in names if m not in manifest.modalities]
    if unknown:
        raise ValueError(f"data.modalities: {unknown} not in the shards {manifest.path} (have {list(manifest.modalities)})")
    if cfg.model.modality and cfg.model.modality not in names:
        raise ValueError(f"model.modality {cfg.model.modality!r} is not among data.modalities {names}")
    return names


def build(cfg: RunConfig, manifest: Manifest, *, init: bool = True) -> Built:
    """Model and task of a run, from its config and the shards' manifest (training, evaluation, export).

    `init`: apply `model.init_from` (training); evaluation loads trained weights over it anyway, and
    must not depend on the pretraining run still being there."""
    names = resolve_modalities(cfg, manifest)
    spec = TaskSpec.from_manifest(manifest)
    inputs = modality_inputs(manifest.modalities, names, manifest.stats)
    how = method(cfg.model.method)
    context = context_spec(
        cfg.model.context, cfg.model.context_join, manifest.modalities, manifest.has_month, manifest.has_latlon, str(manifest.path)
    )
    model = build_model(
        cfg.model,
        inputs,
        spec.num_outputs,
        second_classifier_on=cfg.objective.modality_classifier_on,
        predictor=how.endless and cfg.objective.masked > 0,
        context=context,
    )
    init_report = None
    if cfg.model.init_from and init:
        init_report = init_from_pretrained(model, cfg.model.init_from)
    if cfg.model.freeze_encoders:
        freeze_encoders(model)
    model_modalities = list(getattr(model, "modalities", names))
    teacher = None
    modalities = list(names)
    if how.teacher:
        teacher = load_trained(str(cfg.model.teacher), "all").model.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        modalities = list(dict.fromkeys(names + list(cast(list[str], teacher.modalities))))
    return Built(
        modalities=modalities,
        model_modalities=model_modalities,
        model=model,
        spec=spec,
        teacher=teacher,
        init_report=init_report,
        context=context,
        has_month=manifest.has_month,
    )


def init_from_pretrained(model: torch.nn.Module, run_dir: str | Path) -> dict[str, Any]:
    """Load a finished pretrain run's final weights (run_dir/best/all.pt) into `model`'s encoders."""
    path = RunDir(run_dir).best("all")
    if not path.exists():
        raise FileNotFoundError(
            f"model.init_from: {path} does not exist; is {run_dir} a pretrain run that has finished "
            "(its final weights are written when train.max_steps is reached)?"
        )
    pretrained = load_trained(run_dir, "all").model
    if not isinstance(pretrained, MDiCo):
        raise ValueError(f"model.init_from: {run_dir} holds a {type(pretrained).__name__}, expected a pretrain (MDiCo) run")
    report = load_pretrained(model, pretrained)
    if not report["loaded"]:
        raise ValueError(f"model.init_from: nothing of {run_dir} fits this model: {report['skipped']}")
    return {"from": str(run_dir), **report}


@dataclass
class Trained:
    cfg: RunConfig
    model: torch.nn.Module
    manifest: Manifest
    modalities: list[str]
    run_dir: Path
    epoch: int = 0  # when validation chose these weights

    @property
    def spec(self) -> TaskSpec:
        return TaskSpec.from_manifest(self.manifest)


def load_trained(run_dir: str | Path, sensors: str, shards: str | None = None) -> Trained:
    """The weights of a run chosen (on the validation split) for inference with `sensors`
    ("s1", "s1+s2", "all" …), ready for inference on CPU."""
    run = RunDir(run_dir)
    best = run.best(sensors)
    if not best.exists():
        have = run.best_sets()
        if not have:
            raise FileNotFoundError(f"{run.path}: no best weights (has this run finished at least one epoch?)")
        raise ValueError(f"{run.path}: no sensor {sensors!r} (the model has weights for {have})")
    saved = load_weights(best)  # weights-only: a planted pickle is refused, never run
    cfg = from_dict(RunConfig, saved["config"], f"{best}:config")
    if shards:
        cfg.data.shards = shards
    manifest = load_manifest(cfg.data.shards)
    built = _build_without_teacher(cfg, manifest)
    built.model.load_state_dict(saved["model"])
    built.model.eval()
    return Trained(cfg=cfg, model=built.model, manifest=manifest, modalities=built.model_modalities, run_dir=run.path, epoch=saved["epoch"])


def _build_without_teacher(cfg: RunConfig, manifest: Manifest) -> Built:
    """A distillation student needs its teacher only to train (and a fine-tuned model its pretrain run)."""
    student_of = method(cfg.model.method).student_of
    if student_of is None:
        return build(cfg, manifest, init=False)
    student = from_dict(RunConfig, cfg.to_dict())
    student.model.method = student_of
    return build(student, manifest, init=False)


__all__ = ["Built", "RunDir", "Trained", "build", "init_from_pretrained", "load_trained", "resolve_modalities"]
