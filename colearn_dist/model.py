"""Models: `MDiCo` (train with every sensor, predict with any one) and `FusionModel` (the baselines).

Both take the loader's `inputs` dict (docs/DESIGN.md), accept `month=None` and `latlon=None`, expose
`.modalities`, and offer `predict(inputs, month=None, modalities=None, latlon=None) -> [B, out_dim]`
for any subset of sensors, so the engine, evaluation and export treat every method alike.

`context` (colearn_dist/context.py): None = the pre-context behaviour (the month reaches attention
encoders only); a spec = every encoder sees those context features (none when its kinds are empty).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .context import ContextSpec, context_features, join_input
from .encoders import CategoricalEmbedding, CategoricalEncoder, build_encoder, context_width
from .manifest import Modality
from .tempcnn_bank import LinearBank, TempCNNBank

OUTPUT_KEYS = ("pred", "z_spe", "z_unu", "z_sha", "aux_spe", "aux_sha", "mod_spe", "mod_second")
SECOND_CLASSIFIER = ("unused", "shared")
ROLES = ("unique", "common")


def make_head(in_dim: int, out_dim: int, hidden: int = 0) -> nn.Sequential:
    """Linear, or a one-hidden-layer MLP. No BatchNorm: heads are also run on concatenated batches."""
    if hidden > 0:
        return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
    return nn.Sequential(nn.Linear(in_dim, out_dim))


def param_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: a module with an `lr_scale` other than 1 (a fine-tuned Presto
    encoder) puts its pretrained `backbone` in a group at lr × lr_scale; the rest trains at `lr`.
    One group when nothing is scaled, so optimizer states saved before the option load unchanged."""
    scaled: dict[float, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        scale = getattr(module, "lr_scale", 1.0)
        backbone = getattr(module, "backbone", None)
        if scale == 1.0 or not isinstance(backbone, nn.Module):
            continue
        for p in backbone.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                scaled.setdefault(float(scale), []).append(p)
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return [{"params": rest, "lr": lr}] + [{"params": ps, "lr": lr * s} for s, ps in sorted(scaled.items())]


def _present(modalities: list[str], inputs: dict[str, Tensor]) -> list[str]:
    """The model's modalities found in `inputs`, in model order; other keys are ignored (e.g. a teacher's)."""
    return [m for m in modalities if m in inputs]


def _check_known(modalities: list[str], names: list[str]) -> None:
    unknown = [m for m in names if m not in modalities]
    if unknown:
        raise KeyError(f"modalities {unknown} are not modalities of this model ({modalities})")


class _Context(nn.Module):
    """What a model passes as the second argument of its encoders: the month (no `model.context`,
    the old behaviour), nothing (an empty context) or the context features."""

    def __init__(self, spec: ContextSpec | None):
        super().__init__()
        self.spec = spec

    @property
    def active(self) -> bool:
        return self.spec is not None and bool(self.spec.kinds)

    def forward(self, month: Optional[Tensor], latlon: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
        if self.spec is None:
            return month
        if not self.spec.kinds:
            return None
        return context_features(self.spec, month, latlon, like)


class MDiCo(nn.Module):
    """Multi-modal disentanglement for co-learning (Mena et al. 2025).

    Per modality m: a unique encoder (output split into z_spe | z_unu), a common encoder + projection
    (z_sha), and a head P_m on [z_spe ; z_sha]. Shared by all modalities: an auxiliary head (on z_spe
    and on z_sha alone) and two modality classifiers, on z_spe and on `second_classifier_on`
    ("unused": z_unu, the paper; "shared": z_sha, the public code's behaviour, kept for comparison).
    Inference with modality m needs only m's input. Optional (`model.joint_head`): a joint head on
    every modality's [z_spe ; z_sha], the prediction when all modalities are present.

    TempCNN encoders (unique and common, all modalities) of one shape live in a `TempCNNBank`, the
    per-modality projections and heads in a `LinearBank` each (weights stacked by modality). With
    `fused=True` each bank runs as one computation; `fused=False` runs every encoder and head one by
    one. Same parameters, same numbers (up to
    float rounding; dropout masks are drawn differently), so the switch can change at any time.
    """

    def __init__(
        self,
        inputs: dict[str, Modality],
        cfg: ModelConfig,
        out_dim: int,
        second_classifier_on: str = "unused",
        fused: bool = True,
        predictor: bool = False,
        context: ContextSpec | None = None,
    ):
        super().__init__()
        if second_classifier_on not in SECOND_CLASSIFIER:
            raise ValueError(f"second_classifier_on must be one of {list(SECOND_CLASSIFIER)}, got {second_classifier_on!r}")
        if cfg.embedding_dim < 2 or cfg.embedding_dim % 2:
            raise ValueError(f"embedding_dim must be even and ≥ 2 (it is split in halves), got {cfg.embedding_dim}")
        if not inputs:
            raise ValueError("MDiCo needs at least one modality")
        self.modalities: list[str] = list(inputs)
        self.second_classifier_on = second_classifier_on
        self.fused = fused
        emb = cfg.embedding_dim
        self.half = emb // 2
        # Encoders that are not in a bank, and the categorical embeddings in front of bank members.
        self.encoders = nn.ModuleDict({role: nn.ModuleDict() for role in ROLES})
        self.embeddings = nn.ModuleDict({role: nn.ModuleDict() for role in ROLES})
        self.banks = nn.ModuleList()
        self.slots: dict[tuple[str, str], tuple[int, int]] = {}  # (role, modality) → (bank, member)
        self.context = _Context(context)
        spec = context if self.context.active else None
        # Output join of a bank member's context: a linear map of it added to the member's embedding.
        self.context_proj = nn.ModuleDict({role: nn.ModuleDict() for role in ROLES})
        members: dict[tuple, list[tuple[str, str, int]]] = {}
        for m, inp in inputs.items():
            for role in ROLES:
                enc = cfg.encoder_for(m, role)
                if enc.type == "tempcnn" and inp.kind in ("series", "categorical") and enc.depth >= 1:
                    channels = inp.channels
                    if inp.kind == "categorical":
                        assert inp.num_classes is not None
                        channels = enc.categorical_dim
                        self.embeddings[role][m] = CategoricalEmbedding(inp.num_classes, channels, inp.missing_value)
                    channels = context_width(inp, channels, spec)
                    if spec is not None and spec.join == "output":
                        self.context_proj[role][m] = nn.Linear(spec.flat_dim, emb)
                    key = (inp.steps, enc.hidden, enc.depth, enc.kernel_size, enc.dropout)
                    members.setdefault(key, []).append((role, m, channels))
                else:
                    self.encoders[role][m] = build_encoder(enc, inp, emb, spec)
        for (steps, hidden, depth, kernel, dropout), group in members.items():
            self.banks.append(TempCNNBank([c for _, _, c in group], steps, emb, hidden, depth, kernel, dropout))
            self.slots.update({(role, m): (len(self.banks) - 1, g) for g, (role, m, _) in enumerate(group)})
        # Per modality: projection Linear, BatchNorm, ReLU; head `make_head` — stacked by modality.
        self.project = LinearBank(self.modalities, [emb, emb // 2], norm=True)
        self.heads = LinearBank(self.modalities, [emb, cfg.head_hidden, out_dim] if cfg.head_hidden > 0 else [emb, out_dim])
        self.aux_head = make_head(self.half, out_dim, cfg.head_hidden)
        self.joint_detached = cfg.joint_head == "detached"
        self.joint_head = make_head(len(inputs) * emb, out_dim, cfg.head_hidden) if cfg.joint_head != "none" else None
        self.mod_spe = nn.Linear(self.half, len(inputs))
        self.mod_second = nn.Linear(self.half, len(inputs))
        # Pretraining's masked-sensor term: the other sensors' mean z_sha → this sensor's z_sha.
        self.predictor = nn.Sequential(nn.Linear(self.half, self.half), nn.ReLU(), nn.Linear(self.half, self.half)) if predictor else None
        self.frozen = False

    def representation(self) -> list[nn.Module]:
        """The parts that map inputs to z_spe / z_unu / z_sha: what pretraining learns and a probe freezes."""
        return [self.encoders, self.embeddings, self.banks, self.context_proj, self.project]

    def freeze_encoders(self) -> None:
        """Linear-probe mode: the representation gets no gradient and its BatchNorm statistics stay
        those of pretraining (eval mode, kept by `train()`), so only the heads and classifiers learn."""
        self.frozen = True
        for part in self.representation():
            part.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> MDiCo:
        super().train(mode)
        if self.frozen:
            for part in self.representation():
                part.eval()
        return self

    def encoder(self, role: str, modality: str) -> nn.Module:
        """The unique / common encoder of a modality as a standalone module (a copy if it lives in a bank)."""
        if modality in self.encoders[role]:
            return self.encoders[role][modality]
        bank, g = self.slots[(role, modality)]
        core = self.banks[bank].member(g)  # type: ignore[operator]
        if modality in self.embeddings[role]:
            return CategoricalEncoder(self.embeddings[role][modality], core)  # type: ignore[arg-type]
        return core

    # ------------------------------------------------------------------------------------- encoding
    def _encode(
        self, inputs: dict[str, Tensor], names: list[str], month: Optional[Tensor], latlon: Optional[Tensor] = None
    ) -> dict[tuple[str, str], Tensor]:
        """(role, modality) → [B, embedding_dim] for the modalities `names`."""
        like = inputs[names[0]]
        ctx = self.context(month, latlon, like if like.is_floating_point() else self.mod_spe.weight)
        out = {(role, m): self.encoders[role][m](inputs[m], ctx) for role in ROLES for m in names if m in self.encoders[role]}
        joined = self.context.active and self.context.spec.join == "input"  # type: ignore[union-attr]
        for b, bank in enumerate(self.banks):
            keys = [(key, g) for key, (bi, g) in self.slots.items() if bi == b and key[1] in names]
            if not keys:
                continue
            xs = [self.embeddings[role][m](inputs[m]) if m in self.embeddings[role] else inputs[m] for (role, m), _ in keys]
            if joined:
                xs = [join_input(x, ctx) for x in xs]  # type: ignore[arg-type]
            if self.fused:
                ys = list(bank(xs, [g for _, g in keys]).unbind(0))
            else:
                ys = [bank.forward_one(g, x) for (_, g), x in zip(keys, xs)]  # type: ignore[operator]
            out.update({key: y for (key, _), y in zip(keys, ys)})
        if self.context.active and not joined:
            flat = ctx.flatten(1)  # type: ignore[union-attr]
            for (role, m), y in list(out.items()):
                if m in self.context_proj[role]:
                    out[(role, m)] = y + self.context_proj[role][m](flat)
        return out

    def _project(self, names: list[str], common: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._per_modality(self.project, names, [common[m] for m in names])

    def _heads(self, names: list[str], spe: dict[str, Tensor], sha: dict[str, Tensor]) -> dict[str, Tensor]:
        return self._per_modality(self.heads, names, [torch.cat([spe[m], sha[m]], dim=1) for m in names])

    def _joint(self, spe: dict[str, Tensor], sha: dict[str, Tensor]) -> Tensor:
        """The joint head on every sensor's [z_spe ; z_sha] (all sensors must be present)."""
        assert self.joint_head is not None
        z = torch.cat([t for m in self.modalities for t in (spe[m], sha[m])], dim=1)
        return self.joint_head(z.detach() if self.joint_detached else z)

    def _per_modality(self, bank: LinearBank, names: list[str], xs: list[Tensor]) -> dict[str, Tensor]:
        """Modality names[j]'s member of `bank` on xs[j]: one batched computation when fused."""
        members = [self.modalities.index(m) for m in names]
        if not self.fused or len(names) < 2:
            return {m: bank.forward_one(g, x) for m, g, x in zip(names, members, xs)}
        return dict(zip(names, bank(torch.stack(xs), members).unbind(0)))

    def _embed(self, inputs: dict[str, Tensor], names: list[str], month: Optional[Tensor], latlon: Optional[Tensor] = None):
        z = self._encode(inputs, names, month, latlon)
        spe = {m: z[("unique", m)][:, : self.half] for m in names}
        unu = {m: z[("unique", m)][:, self.half :] for m in names}
        return spe, unu, self._project(names, {m: z[("common", m)] for m in names})

    # ------------------------------------------------------------------------------------- public
    def forward(
        self, inputs: dict[str, Tensor], month: Optional[Tensor] = None, latlon: Optional[Tensor] = None
    ) -> dict[str, dict[str, Tensor]]:
        """Every MDiCo output for the modalities present in `inputs` (the objective needs all of them)."""
        names = _present(self.modalities, inputs)
        if not names:
            raise KeyError(f"inputs hold none of the model's modalities {self.modalities} (got {list(inputs)})")
        spe, unu, sha = self._embed(inputs, names, month, latlon)
        second = unu if self.second_classifier_on == "unused" else sha
        out: dict[str, dict[str, Tensor]] = {
            "pred": self._heads(names, spe, sha),
            "z_spe": spe,
            "z_unu": unu,
            "z_sha": sha,
        }
        # The shared heads see every modality's rows in one call: same result, fewer ops.
        sizes = [spe[m].shape[0] for m in names]
        aux = self.aux_head(torch.cat([spe[m] for m in names] + [sha[m] for m in names])).split(sizes + sizes)
        mod_spe = self.mod_spe(torch.cat([spe[m] for m in names])).split(sizes)
        mod_second = self.mod_second(torch.cat([second[m] for m in names])).split(sizes)
        n = len(names)
        out["aux_spe"] = dict(zip(names, aux[:n]))
        out["aux_sha"] = dict(zip(names, aux[n:]))
        out["mod_spe"] = dict(zip(names, mod_spe))
        out["mod_second"] = dict(zip(names, mod_second))
        if self.joint_head is not None and n == len(self.modalities):
            out["pred_joint"] = {"all": self._joint(spe, sha)}
        if self.predictor is not None and n > 1:
            stacked = torch.stack([sha[m] for m in names])  # [M, B, half]
            others = (stacked.sum(dim=0, keepdim=True) - stacked) / (n - 1)  # leave-one-out means
            out["z_sha_pred"] = dict(zip(names, self.predictor(others.flatten(0, 1)).split(sizes)))
        return out

    def predict(
        self,
        inputs: dict[str, Tensor],
        month: Optional[Tensor] = None,
        modalities: Optional[list[str]] = None,
        latlon: Optional[Tensor] = None,
    ) -> Tensor:
        """Mean of the heads P_m over `modalities` (default: those in `inputs`): any subset of sensors;
        the joint head instead when it exists and every sensor is asked for.
        Raw outputs (logits / regression values) are averaged; apply softmax / sigmoid afterwards."""
        names = _present(self.modalities, inputs) if modalities is None else list(modalities)
        _check_known(self.modalities, names)
        absent = [m for m in names if m not in inputs]
        if absent or not names:
            raise KeyError(f"predict needs inputs for {absent or 'at least one modality'} (got {list(inputs)})")
        spe, _, sha = self._embed(inputs, names, month, latlon)
        if self.joint_head is not None and sorted(names) == sorted(self.modalities):
            return self._joint(spe, sha)
        preds = self._heads(names, spe, sha)
        return torch.stack([preds[m] for m in names]).mean(dim=0)


class FusionModel(nn.Module):
    """Early fusion of `modalities` into one encoder: the single-sensor baseline (one modality), all-sensor
    fusion, sensor dropout and the distillation student.

    Time series of equal length T are concatenated along channels (categorical → embedding first, static
    → repeated over T). If the time-indexed modalities have different T there is no common time axis to
    concatenate on, so it falls back to late fusion: one encoder per modality, embeddings concatenated.

    A sensor that is dropped (training, `sensor_dropout`) or absent (`predict`) has its normalised input
    set to zero — for a categorical sensor, every step set to missing, whose embedding is zero — so what
    the model saw in training is exactly what a missing sensor looks like at inference.
    """

    def __init__(
        self,
        inputs: dict[str, Modality],
        cfg: ModelConfig,
        out_dim: int,
        modalities: list[str],
        sensor_dropout: float = 0.0,
        context: ContextSpec | None = None,
    ):
        super().__init__()
        if not modalities:
            raise ValueError("FusionModel needs at least one modality")
        _check_known(list(inputs), list(modalities))
        if not 0.0 <= sensor_dropout < 1.0:
            raise ValueError(f"sensor_dropout must be in [0, 1), got {sensor_dropout}")
        self.modalities: list[str] = list(modalities)
        self.inputs = {m: inputs[m] for m in self.modalities}
        self.sensor_dropout = sensor_dropout
        emb = cfg.embedding_dim
        # One sensor: the same encoder MDiCo gives it, so the baseline compares like with like.
        enc_cfg = cfg.encoder_for(self.modalities[0]) if len(self.modalities) == 1 else cfg.encoder_for("fusion")
        steps = {inp.steps for inp in self.inputs.values() if inp.kind in ("series", "categorical")}
        # Presto embeds each sensor's own band groups (it cannot take a concatenation): late fusion.
        presto = enc_cfg.type == "presto" or any(cfg.encoder_for(m).type == "presto" for m in self.modalities)
        self.early = len(steps) <= 1 and not presto and not any(inp.kind == "image" for inp in self.inputs.values())
        if self.early:
            t = steps.pop() if steps else None
            self.embeds = nn.ModuleDict(
                {
                    m: CategoricalEmbedding(inp.num_classes, enc_cfg.categorical_dim, inp.missing_value)  # type: ignore[arg-type]
                    for m, inp in self.inputs.items()
                    if inp.kind == "categorical"
                }
            )
            width = sum(enc_cfg.categorical_dim if inp.kind == "categorical" else inp.channels for inp in self.inputs.values())
            fused = Modality("+".join(self.modalities), "series" if t else "static", t, width)
            self.steps = t
            self.encoder = build_encoder(enc_cfg, fused, emb, context)
            head_in = emb
        else:
            self.encoders = nn.ModuleDict({m: build_encoder(cfg.encoder_for(m), inp, emb, context) for m, inp in self.inputs.items()})
            head_in = emb * len(self.modalities)
        self.head = make_head(head_in, out_dim, cfg.head_hidden)
        self.context = _Context(context)
        self.frozen = False  # a probe of a pretrained single-sensor encoder (see freeze_encoders)

    def train(self, mode: bool = True) -> FusionModel:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def sensor_mask(self, batch_size: int, count: int, device: torch.device | None = None) -> Tensor:
        """[B, count] bool: which sensors each sample keeps; each dropped with p = sensor_dropout, ≥ 1 kept."""
        keep = torch.rand(batch_size, count, device=device) >= self.sensor_dropout
        forced = F.one_hot(torch.randint(count, (batch_size,), device=device), count).bool()
        return keep | (forced & ~keep.any(dim=1, keepdim=True))

    def _masked(self, m: str, x: Optional[Tensor], like: Tensor, keep: Optional[Tensor]) -> Tensor:
        """Modality m's input with dropped samples (keep False) or the whole of it (x None) blanked."""
        inp = self.inputs[m]
        blank = -1 if inp.kind == "categorical" else 0.0  # -1: an out-of-range code, embedded as "missing"
        if x is None:
            layout = {
                "static": (inp.channels,),
                "categorical": (inp.steps,),
                "series": (inp.steps, inp.channels),
                "image": (inp.channels, inp.height, inp.width),
            }[inp.kind]
            float_dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
            dtype = torch.long if inp.kind == "categorical" else float_dtype
            return torch.full((like.shape[0], *layout), blank, dtype=dtype, device=like.device)  # type: ignore[arg-type]
        if keep is None:
            return x
        return x.masked_fill(~keep.view((-1,) + (1,) * (x.dim() - 1)), blank)

    def _run(
        self,
        inputs: dict[str, Tensor],
        names: list[str],
        keep: Optional[Tensor],
        month: Optional[Tensor],
        latlon: Optional[Tensor] = None,
    ) -> Tensor:
        like = inputs[names[0]]
        month = self.context(month, latlon, like if like.is_floating_point() else self.head[0].weight)
        xs = {}
        for m in self.modalities:
            k = keep[:, names.index(m)] if keep is not None and m in names else None
            xs[m] = self._masked(m, inputs[m] if m in names else None, like, k)
        if not self.early:
            z = torch.cat([self.encoders[m](xs[m], month) for m in self.modalities], dim=1)
            return self.head(z)
        parts = []
        for m in self.modalities:
            kind = self.inputs[m].kind
            x = self.embeds[m](xs[m]) if kind == "categorical" else xs[m]
            if kind == "static" and self.steps is not None:
                x = x.unsqueeze(1).expand(-1, self.steps, -1)
            parts.append(x)
        return self.head(self.encoder(torch.cat(parts, dim=-1), month))

    def forward(self, inputs: dict[str, Tensor], month: Optional[Tensor] = None, latlon: Optional[Tensor] = None) -> dict[str, Tensor]:
        names = _present(self.modalities, inputs)
        if not names:
            raise KeyError(f"inputs hold none of the model's modalities {self.modalities} (got {list(inputs)})")
        keep = None
        if self.training and self.sensor_dropout > 0 and len(names) > 1:
            keep = self.sensor_mask(inputs[names[0]].shape[0], len(names), inputs[names[0]].device)
        return {"pred": self._run(inputs, names, keep, month, latlon)}

    def predict(
        self,
        inputs: dict[str, Tensor],
        month: Optional[Tensor] = None,
        modalities: Optional[list[str]] = None,
        latlon: Optional[Tensor] = None,
    ) -> Tensor:
        """Prediction from `modalities` (default: those in `inputs`); every other sensor is blanked."""
        if modalities is not None:
            _check_known(self.modalities, list(modalities))
        wanted = self.modalities if modalities is None else list(modalities)
        names = [m for m in self.modalities if m in wanted and m in inputs]
        if not names:
            raise KeyError(f"predict needs an input for at least one of {wanted} (got {list(inputs)})")
        return self._run(inputs, names, None, month, latlon)


def _set_encoder(model: MDiCo, role: str, modality: str, source: nn.Module) -> None:
    """Copy a standalone encoder (`MDiCo.encoder` of another model) into `model`'s slot, banked or not."""
    if modality in model.encoders[role]:
        model.encoders[role][modality].load_state_dict(source.state_dict())
        return
    bank, g = model.slots[(role, modality)]
    if modality in model.embeddings[role]:
        if not isinstance(source, CategoricalEncoder):
            raise TypeError(f"{role} encoder of {modality!r}: expected an embedding + encoder, got {type(source).__name__}")
        model.embeddings[role][modality].load_state_dict(source.embed.state_dict())
        source = source.encoder
    model.banks[bank].load_member(g, source)  # type: ignore[operator]


def load_pretrained(model: nn.Module, source: MDiCo) -> dict[str, list[str]]:
    """Initialise `model` from a pretrained MDiCo, part by part; returns what was loaded and skipped.

    Matching is per (role, sensor) rather than by state-dict key, because TempCNN encoders are
    stacked in banks whose layout depends on which sensors a model has: a fine-tuning run on a
    subset of the pretraining sensors still gets each sensor's encoders. MDiCo receives the unique
    and common encoders and the projection of every shared sensor, and the modality classifiers
    when the sensor lists are equal; the heads start fresh (pretraining never trains them). A
    single-sensor model receives its sensor's common encoder (the one the contrastive term shaped).
    A part whose shape differs (another encoder config) is skipped and reported, not an error.
    """
    loaded: list[str] = []
    skipped: list[str] = []

    def attempt(name: str, fn: Any) -> None:
        try:
            with torch.no_grad():
                fn()
            loaded.append(name)
        except (RuntimeError, TypeError, KeyError) as exc:
            skipped.append(f"{name} ({str(exc).splitlines()[0][:120]})")

    if isinstance(model, MDiCo):
        for m in model.modalities:
            if m not in source.modalities:
                skipped.append(f"{m} (not a sensor of the pretrained model {source.modalities})")
                continue
            for role in ROLES:
                attempt(f"{role}/{m}", lambda role=role, m=m: _set_encoder(model, role, m, source.encoder(role, m)))
                if m in model.context_proj[role]:  # a banked encoder's output join of the context
                    proj = model.context_proj[role][m]
                    attempt(
                        f"{role}/{m}/context",
                        lambda proj=proj, role=role, m=m: proj.load_state_dict(source.context_proj[role][m].state_dict()),
                    )
            attempt(
                f"project/{m}",
                lambda m=m: model.project.load_member(model.modalities.index(m), source.project.member(source.modalities.index(m))),
            )
        if model.modalities == source.modalities:
            for key in ("mod_spe", "mod_second"):
                attempt(key, lambda key=key: getattr(model, key).load_state_dict(getattr(source, key).state_dict()))
    elif isinstance(model, FusionModel) and len(model.modalities) == 1:
        m = model.modalities[0]
        if m not in source.modalities:
            raise KeyError(f"sensor {m!r} is not a sensor of the pretrained model {source.modalities}")
        attempt(f"common/{m}", lambda: model.encoder.load_state_dict(source.encoder("common", m).state_dict()))
    else:
        raise TypeError(f"cannot initialise a {type(model).__name__} over {getattr(model, 'modalities', '?')} from a pretrained MDiCo")
    return {"loaded": loaded, "skipped": skipped}


def freeze_encoders(model: nn.Module) -> None:
    """Frozen-encoder probe for either model type (see MDiCo.freeze_encoders)."""
    if isinstance(model, MDiCo):
        model.freeze_encoders()
        return
    if isinstance(model, FusionModel) and len(model.modalities) == 1 and hasattr(model, "encoder"):
        model.frozen = True
        model.encoder.requires_grad_(False)
        model.train(model.training)
        return
    raise TypeError(f"cannot freeze the encoders of a {type(model).__name__}")


__all__ = ["FusionModel", "MDiCo", "OUTPUT_KEYS", "freeze_encoders", "load_pretrained", "make_head", "param_groups"]
