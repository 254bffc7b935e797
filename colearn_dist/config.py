"""Typed run configuration, loaded from YAML and validated with errors that name the key.

One `RunConfig` describes one training run (one method, one seed). The YAML mirrors the dataclasses
exactly; unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the file and the key."""


class _Loader(yaml.SafeLoader):
    """YAML without YAML 1.1's base-60 integers: `time_min: 1:30` stays the text "1:30" (Slurm's
    1 min 30 s, see slurm_minutes) instead of becoming the number 90."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only


_SLURM_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def slurm_minutes(value: int | str, where: str = "slurm.time_min") -> int:
    """A time limit in whole minutes from minutes or from Slurm's `--time` formats: "MM", "MM:SS",
    "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS" (as sbatch reads them: "1:30" is 1 min 30 s)."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected minutes or a Slurm time such as '2:00:00', got {value!r}")
    if isinstance(value, int):
        seconds = value * 60
    else:
        m = _SLURM_TIME.match(str(value).strip())
        if not m:
            raise ConfigError(
                f"{where}: {value!r} is not a Slurm time; expected minutes (90) or MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS"
            )
        days, parts = int(m["days"] or 0), [int(p) for p in (m["a"], m["b"], m["c"]) if p is not None]
        if days:  # D-HH[:MM[:SS]]
            parts += [0] * (3 - len(parts))
            hours, minutes, secs = parts
        else:  # MM, MM:SS or HH:MM:SS
            hours, minutes, secs = [0] * (3 - len(parts)) + parts if len(parts) == 3 else (0, parts[0], parts[1] if len(parts) > 1 else 0)
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
        if seconds % 60:
            raise ConfigError(
                f"{where}: {value!r} is {seconds // 60} min {seconds % 60} s in Slurm's time format; the limit must be whole "
                f"minutes, e.g. 90 or '1:30:00' for 1 h 30 min"
            )
    if seconds <= 0:
        raise ConfigError(f"{where}: the time limit must be at least 1 minute, got {value!r}")
    return seconds // 60


Method = Literal["mdico", "single", "fusion", "dropout", "distill", "pretrain", "presto"]
Context = Literal["calendar", "location"]
EncoderType = Literal["tempcnn", "attention", "gru", "lstm", "mlp", "cnn", "presto"]


@dataclass
class EncoderConfig:
    """One encoder. `depth` is honoured by every type (number of conv / attention / recurrent / hidden layers)."""

    type: EncoderType = "tempcnn"
    hidden: int = 64
    depth: int = 3
    kernel_size: int = 5
    dropout: float = 0.2
    heads: int = 4
    categorical_dim: int = 8
    # presto only (colearn_dist/presto.py): keep the pretrained weights fixed (only the Linear after the
    # pooled embedding learns), and the weights file (None = the bundled public Presto weights).
    freeze: bool = False
    weights: str | None = None
    # presto only: the pretrained backbone learns at train.lr × lr_scale (its new output Linear at
    # train.lr); below 1 a fine-tuned backbone moves less far from its pretraining.
    lr_scale: float = 1.0


@dataclass
class ModelConfig:
    method: Method = "mdico"
    # z_sha, z_spe and z_unu each have embedding_dim // 2 features; the unique encoder outputs
    # embedding_dim (split in halves), the common encoder embedding_dim before its projection.
    embedding_dim: int = 128
    # "default" applies to every modality; a modality's name overrides it (e.g. a static layer → mlp).
    # MDiCo's two encoders of a modality can differ: "unique" / "common" apply to that role of every
    # modality, "common/s1" to one; the most specific key wins (common/s1 > s1 > common > default).
    encoders: dict[str, EncoderConfig] = field(default_factory=lambda: {"default": EncoderConfig()})
    head_hidden: int = 0
    # single / distill: the one sensor the model sees.
    modality: str | None = None
    # dropout: probability of dropping each sensor in a training sample (at least one always kept).
    sensor_dropout: float = 0.5
    # distill: the fusion run that teaches, and the weight and temperature of the distillation term.
    teacher: str | None = None
    distill_weight: float = 1.0
    distill_temperature: float = 2.0
    # fine-tuning: a finished `pretrain` run whose encoders / projections initialise this model
    # (docs/PRETRAINING.md); with freeze_encoders they stay fixed and only the heads learn (a probe).
    init_from: str | None = None
    freeze_encoders: bool = False
    # What every encoder sees besides its sensor (colearn_dist/context.py): "calendar" (the month of
    # each step), "location" (lat/lon). [] = nothing. Unset (None) = the behaviour of runs made before
    # this key existed: the month reaches attention encoders only; shipped configs set it explicitly.
    context: list[Context] | None = None
    # Where the context joins: "input" (concatenated to each step's features; static layers get it
    # flattened) or "output" (a linear map of it added to the encoder's embedding; images always).
    context_join: Literal["input", "output"] = "input"
    # MDiCo's prediction when every sensor is present: "none" = the mean of the heads P_m (the paper);
    # "detached" / "trained" = a joint head on every sensor's [z_spe ; z_sha], trained with the task
    # loss (weight objective.main) on detached embeddings (the per-sensor models are untouched) or
    # end to end. Per-sensor predictions never use it.
    joint_head: Literal["none", "detached", "trained"] = "none"

    def encoder_for(self, modality: str, role: str | None = None) -> EncoderConfig:
        """The encoder of `modality` (in MDiCo's `role`, "unique" or "common"; None = the baselines')."""
        keys = ([f"{role}/{modality}"] if role else []) + [modality] + ([role] if role else []) + ["default"]
        return next((self.encoders[k] for k in keys if k in self.encoders), EncoderConfig())


@dataclass
class ObjectiveConfig:
    main: float = 1.0
    aux: float = 1.0
    con: float = 1.0
    mod: float = 1.0
    temperature: float = 0.1
    # "normalised": the mean over modality pairs; "sum": their sum, each pair once; "reference": the
    # public code's sum over ordered pairs (each pair twice). With M sensors: 1 : M(M-1)/2 : M(M-1).
    contrastive_pairs: Literal["normalised", "sum", "reference"] = "normalised"
    # "unused": the second modality classifier sees z_unu (the paper); "shared": the public code's z_sha.
    modality_classifier_on: Literal["unused", "shared"] = "unused"
    # pretrain only: weight of predicting each sensor's z_sha from the mean of the others' (cosine); 0 = off.
    masked: float = 0.0


@dataclass
class DataConfig:
    shards: str = "shards/fuel_moisture"
    # the modalities the run uses, in order; empty = every modality of the shards.
    modalities: list[str] = field(default_factory=list)
    batch_size: int = 32
    workers: int = 1
    shuffle_buffer: int = 1000
    on_corrupt: Literal["error", "skip"] = "error"
    # Per rank: a split whose decoded tensors fit in this many MiB is read once and served from memory
    # (same batches, same order); 0 = always stream from the shards.
    cache_mb: int = 1024
    # Streaming without worker processes: batches a thread reads ahead of training (0 = none).
    prefetch: int = 2


@dataclass
class TrainConfig:
    epochs: int = 100
    # pretrain: optimizer steps over the endlessly resampled train split; 0 = epochs × steps per epoch.
    max_steps: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 0.0
    grad_accum: int = 1
    # early stopping on the validation split (never the test split); 0 = off.
    patience: int = 5
    # no early stop before this many epochs (the first epochs of a small validation split are noise)
    min_epochs: int = 0
    # score, select and deploy an exponential moving average of the weights with this time constant
    # in epochs (colearn_dist/averaging.py); 0 = the raw weights of each epoch
    ema_epochs: float = 0.0
    seed: int = 0
    # checkpoints for runs killed without warning (node failure, SIGKILL); a warning signal or
    # preemption (SIGTERM) always checkpoints at the next step boundary. 0 = off.
    checkpoint_every_steps: int = 0
    checkpoint_every_epochs: int = 1
    # complete checkpoints kept (0 = all)
    keep_checkpoints: int = 2
    # torch intra-op threads per rank; 0 = cores available // local ranks − loader workers (at least 1).
    threads: int = 0
    compile: bool = False
    log_every_steps: int = 20
    # Score the best weights on the test split when training ends (each rank scores its part, rank 0
    # computes the metrics). To leave it to a job of its own, set false and submit
    # `colearn-dist evaluate` (`submit --command`).
    evaluate_test: bool = True


@dataclass
class EngineConfig:
    zero_stage: Literal[0, 1, 2] = 0
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # BatchNorm statistics over the global batch ("global": N ranks × batch b train exactly like
    # 1 process × N·b) or over each rank's own ("rank": no collective, per-rank running statistics).
    batch_stats: Literal["global", "rank"] = "global"


@dataclass
class SlurmConfig:
    """Where a run goes on a cluster (`colearn-dist submit`); not part of the config hash."""

    nodes: int = 1
    gpus_per_node: int = 0
    # 0 = one task per GPU (or 1 without GPUs)
    tasks_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: float = 8.0
    # the time limit: minutes, or a Slurm time string ("2:00:00" = 2 h, "1-12" = 1 day 12 h; quote it in YAML)
    time_min: int | str = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "colearn"
    # seconds before the time limit at which Slurm warns the job (USR2): time to checkpoint
    signal_delay_s: int = 120
    max_requeues: int = 20
    # any other sbatch option, e.g. {"exclusive": ""} or {"reservation": "eo"}
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class RunConfig:
    name: str = "run"
    run_dir: str = "runs/run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Hash of what changes the result; run_dir, name and slurm say where, not what, and the
        settings of `_EXECUTION` only how (a resumed allocation may change them)."""
        content = self.to_dict()
        for where in ("run_dir", "name", "slurm"):
            content.pop(where)
        for section, key in _EXECUTION:
            content[section].pop(key, None)
        # Fields added after runs existed count only when set, so those runs still resume.
        for (section, key), default in _HASHED_WHEN_SET.items():
            if content[section].get(key) == default:
                content[section].pop(key)
        for encoder in content["model"]["encoders"].values():
            for key, default in _ENCODER_HASHED_WHEN_SET.items():
                if encoder.get(key) == default:
                    encoder.pop(key)
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


_HASHED_WHEN_SET: dict[tuple[str, str], Any] = {
    ("model", "init_from"): None,
    ("model", "freeze_encoders"): False,
    ("model", "context"): None,
    ("model", "context_join"): "input",
    ("model", "joint_head"): "none",
    ("objective", "masked"): 0.0,
    ("train", "max_steps"): 0,
    ("train", "min_epochs"): 0,
    ("train", "ema_epochs"): 0.0,
    # one process computes the same either way; runs of several processes before it were per-rank
    ("engine", "batch_stats"): "global",
}

ENCODER_ROLES = ("unique", "common")
_ENCODER_HASHED_WHEN_SET: dict[str, Any] = {"freeze": False, "weights": None, "lr_scale": 1.0}

# How a run executes, not what it computes: never part of the hash.
_EXECUTION: tuple[tuple[str, str], ...] = (
    ("data", "workers"),
    ("data", "cache_mb"),
    ("data", "prefetch"),
    ("train", "threads"),
    ("train", "log_every_steps"),
    ("train", "keep_checkpoints"),
    ("train", "checkpoint_every_steps"),
    ("train", "checkpoint_every_epochs"),
    ("train", "compile"),
    ("train", "evaluate_test"),
)


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(typing.cast(type, tp), value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {str(k): _convert(args[1], v, _key(where, k)) for k, v in value.items()}
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads `1e-3` as a string (it wants `1.0e-3`): a number all the same.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number (e.g. 0.001 or 1e-3), got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number (e.g. 0.001 or 1e-3), got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _key(where: str, key: Any) -> str:
    """'file.yaml: ' + 'train' → 'file.yaml: train'; 'file.yaml: train' + 'lr' → 'file.yaml: train.lr'."""
    return f"{where}{key}" if where.endswith(": ") else f"{where}.{key}"


def from_dict(cls: type, data: Any, where: str = "config") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by name."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where.removesuffix(': ')}: unknown key(s) {unknown}; known: {sorted(names)}")
    kwargs = {k: _convert(hints[k], v, _key(where, k)) for k, v in data.items()}
    return cls(**kwargs)


def validate(cfg: RunConfig, where: str = "config") -> RunConfig:
    """Checks between fields that types alone cannot express."""
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "train.epochs": cfg.train.epochs,
        "train.grad_accum": cfg.train.grad_accum,
        "model.embedding_dim": cfg.model.embedding_dim,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{where}: {key} must be ≥ 1, got {value}")
    if cfg.model.embedding_dim % 2:
        raise ConfigError(f"{where}: model.embedding_dim must be even (it is split in halves), got {cfg.model.embedding_dim}")
    if cfg.data.batch_size < 2:
        raise ConfigError(f"{where}: data.batch_size must be ≥ 2 (BatchNorm and the contrastive term need pairs)")
    for key in ("workers", "cache_mb", "prefetch"):
        if getattr(cfg.data, key) < 0:
            raise ConfigError(f"{where}: data.{key} must be ≥ 0, got {getattr(cfg.data, key)}")
    for key in (
        "checkpoint_every_steps",
        "checkpoint_every_epochs",
        "keep_checkpoints",
        "warmup_steps",
        "log_every_steps",
        "min_epochs",
        "ema_epochs",
    ):
        if getattr(cfg.train, key) < 0:
            raise ConfigError(f"{where}: train.{key} must be ≥ 0, got {getattr(cfg.train, key)}")
    if not cfg.train.lr > 0 or cfg.train.lr == float("inf"):
        raise ConfigError(f"{where}: train.lr must be a finite number > 0, got {cfg.train.lr}")
    _check_ranges(cfg, where)
    if cfg.objective.temperature <= 0:
        raise ConfigError(f"{where}: objective.temperature must be > 0")
    if not 0.0 <= cfg.model.sensor_dropout < 1.0:
        raise ConfigError(f"{where}: model.sensor_dropout must be in [0, 1)")
    if cfg.model.method in ("single", "distill", "presto") and not cfg.model.modality:
        raise ConfigError(f"{where}: model.modality must name the sensor for method {cfg.model.method!r}")
    if cfg.model.method == "distill" and not cfg.model.teacher:
        raise ConfigError(f"{where}: model.teacher must name the fusion run directory for method 'distill'")
    if cfg.model.method in ("mdico", "pretrain") and cfg.data.modalities and len(cfg.data.modalities) < 2:
        raise ConfigError(f"{where}: method {cfg.model.method!r} needs at least 2 modalities, data.modalities has {cfg.data.modalities}")
    for modality, enc in cfg.model.encoders.items():
        if "/" in modality and modality.split("/", 1)[0] not in ENCODER_ROLES:
            raise ConfigError(f"{where}: model.encoders.{modality}: a key with '/' is <role>/<modality>, role one of {list(ENCODER_ROLES)}")
        if enc.type != "presto" and (enc.freeze or enc.weights or enc.lr_scale != 1.0):
            key = "freeze" if enc.freeze else "weights" if enc.weights else "lr_scale"
            raise ConfigError(f"{where}: model.encoders.{modality}.{key} applies to type 'presto' only, got type {enc.type!r}")
        if not 0 < enc.lr_scale < float("inf"):
            raise ConfigError(f"{where}: model.encoders.{modality}.lr_scale must be a finite number > 0, got {enc.lr_scale}")
        if enc.freeze and enc.lr_scale != 1.0:
            raise ConfigError(
                f"{where}: model.encoders.{modality}: lr_scale {enc.lr_scale} has no effect with freeze: true (a frozen backbone does not learn)"
            )
    if cfg.train.max_steps < 0:
        raise ConfigError(f"{where}: train.max_steps must be ≥ 0, got {cfg.train.max_steps}")
    if cfg.train.max_steps and cfg.model.method != "pretrain":
        raise ConfigError(
            f"{where}: train.max_steps applies to method 'pretrain' only (the others train in epochs with validation); "
            f"got method {cfg.model.method!r}"
        )
    if cfg.objective.masked < 0:
        raise ConfigError(f"{where}: objective.masked must be ≥ 0, got {cfg.objective.masked}")
    if cfg.objective.masked and cfg.model.method != "pretrain":
        raise ConfigError(f"{where}: objective.masked applies to method 'pretrain' only, got method {cfg.model.method!r}")
    if cfg.model.init_from and cfg.model.method not in ("mdico", "single"):
        raise ConfigError(
            f"{where}: model.init_from initialises methods 'mdico' and 'single' from a pretrain run, not {cfg.model.method!r}"
        )
    if cfg.model.context is not None and len(set(cfg.model.context)) != len(cfg.model.context):
        raise ConfigError(f"{where}: model.context lists an entry twice: {cfg.model.context}")
    if cfg.model.freeze_encoders and not cfg.model.init_from:
        raise ConfigError(f"{where}: model.freeze_encoders needs model.init_from (a probe of random encoders measures nothing)")
    validate_slurm(cfg.slurm, f"{where}: slurm")
    return cfg


def _check_ranges(cfg: RunConfig, where: str) -> None:
    """Sizes, rates and counts in their ranges, so a typo fails here with its key, not deep in torch."""
    at_least: list[tuple[str, float, float]] = [
        ("data.shuffle_buffer", cfg.data.shuffle_buffer, 0),
        ("model.head_hidden", cfg.model.head_hidden, 0),
        ("model.distill_weight", cfg.model.distill_weight, 0),
        ("train.weight_decay", cfg.train.weight_decay, 0),
        ("train.grad_clip", cfg.train.grad_clip, 0),
        ("train.patience", cfg.train.patience, 0),
        ("train.threads", cfg.train.threads, 0),
        ("train.seed", cfg.train.seed, 0),
    ]
    at_least += [(f"objective.{k}", getattr(cfg.objective, k), 0) for k in ("main", "aux", "con", "mod")]
    for name, enc in cfg.model.encoders.items():
        key = f"model.encoders.{name}"
        at_least += [(f"{key}.hidden", enc.hidden, 1), (f"{key}.depth", enc.depth, 0), (f"{key}.kernel_size", enc.kernel_size, 1)]
        at_least += [(f"{key}.heads", enc.heads, 1), (f"{key}.categorical_dim", enc.categorical_dim, 1)]
        if not 0.0 <= enc.dropout < 1.0:
            raise ConfigError(f"{where}: {key}.dropout must be in [0, 1), got {enc.dropout}")
        if enc.type == "attention" and enc.heads >= 1 and enc.hidden % enc.heads:
            raise ConfigError(f"{where}: {key}.hidden ({enc.hidden}) must be divisible by {key}.heads ({enc.heads})")
    for key, value, low in at_least:
        if not value >= low or value == float("inf"):  # NaN fails too
            raise ConfigError(f"{where}: {key} must be ≥ {low}, got {value}")
    if cfg.train.seed >= 2**32:
        raise ConfigError(f"{where}: train.seed must be < 2**32 (numpy's seed range), got {cfg.train.seed}")
    if not cfg.model.distill_temperature > 0:
        raise ConfigError(f"{where}: model.distill_temperature must be > 0, got {cfg.model.distill_temperature}")


def check_encoder_names(cfg: RunConfig, modalities: list[str], where: str = "config") -> None:
    """An encoder override must name a modality of the shards, a role ("unique", "common"), a role
    of a modality ("common/s1") or be "default": a misspelt name would silently leave that sensor on
    the default encoder."""
    named = [k.split("/", 1)[1] if k.split("/", 1)[0] in ENCODER_ROLES and "/" in k else k for k in cfg.model.encoders]
    unknown = sorted(k for k, m in zip(cfg.model.encoders, named) if k not in ("default", *ENCODER_ROLES) and m not in modalities)
    if unknown:
        raise ConfigError(
            f"{where}: model.encoders has {unknown}, which are not modalities of the shards {cfg.data.shards} "
            f"(they have {modalities}; use 'default' for all)"
        )


def validate_slurm(slurm: SlurmConfig, where: str = "slurm") -> SlurmConfig:
    """What sbatch would reject only after the job waited in the queue, or not at all."""
    limit = slurm_minutes(slurm.time_min, f"{where}.time_min")
    for key, low in (
        ("nodes", 1),
        ("gpus_per_node", 0),
        ("tasks_per_node", 0),
        ("cpus_per_task", 1),
        ("signal_delay_s", 0),
        ("max_requeues", 0),
    ):
        if getattr(slurm, key) < low:
            raise ConfigError(f"{where}.{key} must be ≥ {low}, got {getattr(slurm, key)}")
    if slurm.mem_gb <= 0:
        raise ConfigError(f"{where}.mem_gb must be > 0, got {slurm.mem_gb}")
    if slurm.signal_delay_s >= limit * 60:
        raise ConfigError(
            f"{where}.signal_delay_s ({slurm.signal_delay_s} s) must be shorter than the time limit ({limit} min): "
            f"the warning would come before the job starts"
        )
    return slurm


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config; `overrides` are `key.sub=value` strings (YAML values), applied in order."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = _yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    for item in overrides or []:
        apply_override(data, item, str(path))
    return validate(from_dict(RunConfig, data, f"{path}: "), str(path))


def apply_override(data: dict[str, Any], item: str, where: str = "override") -> None:
    if "=" not in item:
        raise ConfigError(f"{where}: override {item!r} is not key=value")
    key, raw = item.split("=", 1)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: override {item!r}: {part!r} is not a mapping")
    node[parts[-1]] = _yaml(raw)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
