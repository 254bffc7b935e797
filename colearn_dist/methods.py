"""The training methods: one entry each, holding everything that differs between them.

Adding a method is adding one `Method` to `METHODS` (and its name to `config.Method`). Nothing else
in the package compares method names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from .config import EncoderConfig, ModelConfig, ObjectiveConfig
from .context import ContextSpec
from .manifest import Modality
from .model import FusionModel, MDiCo
from .objective import DistillObjective, MDiCoObjective, Objective, PretrainObjective, SupervisedObjective, TaskSpec

# (model config, inputs, outputs, second modality classifier on, masked-sensor predictor, context) → model
ModelBuilder = Callable[[ModelConfig, dict[str, Modality], int, str, bool, "ContextSpec | None"], nn.Module]
# (objective config, task, model modalities, distill weight, distill temperature) → objective
ObjectiveBuilder = Callable[[ObjectiveConfig, TaskSpec, list[str], float, float], Objective]


@dataclass(frozen=True)
class Method:
    name: str
    model: ModelBuilder
    objective: ObjectiveBuilder
    # the model reads one sensor (`model.modality`): a run per sensor, scored on that sensor only
    per_sensor: bool = False
    # the method of the run that teaches it (`model.teacher`, of the same seed in a sweep)
    teacher: str | None = None
    # the method whose model it trains (a student without its teacher), to load its weights
    student_of: str | None = None
    # trains for `train.max_steps` over endlessly resampled train data, never validated or tested
    endless: bool = False
    # writes shared/specific embeddings for TensorBoard's projector when evaluated
    embeddings: bool = False
    # column in the result tables (None: not compared) and place in a sweep's training order
    table_rank: int | None = None
    train_rank: int | None = None


def _check_modality(cfg: ModelConfig, inputs: dict[str, Modality]) -> None:
    if not cfg.modality or cfg.modality not in inputs:
        raise KeyError(f"model.modality {cfg.modality!r} must name one of {list(inputs)} for method {cfg.method!r}")


Context = ContextSpec | None


def _mdico(cfg: ModelConfig, inputs: dict[str, Modality], out_dim: int, second_on: str, predictor: bool, context: Context) -> nn.Module:
    return MDiCo(inputs, cfg, out_dim, second_classifier_on=second_on, predictor=predictor, context=context)


def _single(cfg: ModelConfig, inputs: dict[str, Modality], out_dim: int, second_on: str, predictor: bool, context: Context) -> nn.Module:
    _check_modality(cfg, inputs)
    return FusionModel(inputs, cfg, out_dim, [str(cfg.modality)], context=context)


def _presto(cfg: ModelConfig, inputs: dict[str, Modality], out_dim: int, second_on: str, predictor: bool, context: Context) -> nn.Module:
    """The peer baseline: the sensor through pretrained Presto (its other band groups masked), a head on
    the pooled embedding. The sensor's configured encoder applies when it is a Presto one (freeze,
    weights); any other configured type is replaced by a fine-tuned Presto."""
    _check_modality(cfg, inputs)
    m = str(cfg.modality)
    enc = cfg.encoder_for(m)
    presto = replace(cfg, encoders={m: enc if enc.type == "presto" else EncoderConfig(type="presto")})
    return FusionModel(inputs, presto, out_dim, [m], context=context)


def _fusion(cfg: ModelConfig, inputs: dict[str, Modality], out_dim: int, second_on: str, predictor: bool, context: Context) -> nn.Module:
    return FusionModel(inputs, cfg, out_dim, list(inputs), context=context)


def _dropout(cfg: ModelConfig, inputs: dict[str, Modality], out_dim: int, second_on: str, predictor: bool, context: Context) -> nn.Module:
    return FusionModel(inputs, cfg, out_dim, list(inputs), sensor_dropout=cfg.sensor_dropout, context=context)


def _supervised(cfg: ObjectiveConfig, spec: TaskSpec, modalities: list[str], weight: float, temperature: float) -> Objective:
    return SupervisedObjective(spec)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "mdico",
            _mdico,
            lambda cfg, spec, mods, w, t: MDiCoObjective(cfg, spec, mods),
            embeddings=True,
            table_rank=0,
            train_rank=1,
        ),
        Method("single", _single, _supervised, per_sensor=True, table_rank=1, train_rank=2),
        Method("dropout", _dropout, _supervised, table_rank=2, train_rank=3),
        Method(
            "distill",
            _single,
            lambda cfg, spec, mods, w, t: DistillObjective(spec, w, t),
            per_sensor=True,
            teacher="fusion",
            student_of="single",
            table_rank=3,
            train_rank=4,
        ),
        Method("fusion", _fusion, _supervised, table_rank=4, train_rank=0),
        Method("presto", _presto, _supervised, per_sensor=True, table_rank=5, train_rank=5),
        # MDiCo's model (heads untrained), with the masked-sensor predictor when objective.masked > 0
        Method("pretrain", _mdico, lambda cfg, spec, mods, w, t: PretrainObjective(cfg, mods), endless=True),
    )
}

# Columns of the result tables: the method, then the baselines it must beat.
TABLE_ORDER = tuple(sorted((m.name for m in METHODS.values() if m.table_rank is not None), key=lambda n: METHODS[n].table_rank or 0))
# Training order in a sweep: a teacher before its students.
TRAIN_ORDER = tuple(sorted((m.name for m in METHODS.values() if m.train_rank is not None), key=lambda n: METHODS[n].train_rank or 0))


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return METHODS[name]


def build_model(
    cfg: ModelConfig,
    inputs: dict[str, Modality],
    out_dim: int,
    second_classifier_on: str = "unused",
    predictor: bool = False,
    context: ContextSpec | None = None,
) -> nn.Module:
    """The model of `cfg.method`; distill builds the student only (runs.build loads the teacher).
    `context`: what every encoder sees besides its sensor (None: `model.context` unset, the old behaviour)."""
    return method(cfg.method).model(cfg, inputs, out_dim, second_classifier_on, predictor, context)


def build_objective(
    name: str,
    cfg: ObjectiveConfig,
    spec: TaskSpec,
    modalities: list[str],
    distill_weight: float = 1.0,
    distill_temperature: float = 2.0,
) -> Objective:
    """The objective of a training method (`ModelConfig.method`)."""
    return method(name).objective(cfg, spec, modalities, distill_weight, distill_temperature)


def sensor_sets(name: str, modalities: list[str]) -> list[list[str]]:
    """The sensor sets a run is validated and scored with: each single sensor (what the user
    deploys), plus all sensors together where the model can use them."""
    if method(name).per_sensor:
        return [modalities]
    singles = [[m] for m in modalities]
    return singles + [list(modalities)] if len(modalities) > 1 else singles


def set_name(sensors: list[str], all_modalities: list[str]) -> str:
    return "all" if len(sensors) > 1 and sorted(sensors) == sorted(all_modalities) else "+".join(sensors)


__all__ = ["METHODS", "TABLE_ORDER", "TRAIN_ORDER", "Method", "build_model", "build_objective", "method", "sensor_sets", "set_name"]
