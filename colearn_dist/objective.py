"""Task losses, NT-Xent on all-gathered embeddings, the MDiCo objective and distillation.

Exact global averaging
----------------------
DeepSpeed averages parameter gradients over ranks (divides by the world size W), and local batches
may differ in size between ranks. Every term is therefore computed in *rank-contribution* form,

    contribution_r = (sum of per-sample losses on rank r) / (global normaliser),

where the normaliser (global sample count, or global sum of class weights for weighted CE) comes
from one all-reduce. The global value of a term is the SUM of the contributions over ranks. The
objectives return

* `loss = W × Σ_terms contribution_r` — for backward. Its mean over ranks is the global loss and,
  after DeepSpeed's 1/W gradient averaging, the gradients are exactly those of one process
  holding the whole global batch (world 2 × batch b ≡ world 1 × batch 2b, also for uneven b).
* a dict of DETACHED contributions (every term and total) — the engine all-reduce-SUMS them
  to log global values.

Objectives contain collectives (normaliser all-reduce, embedding all-gather): every rank must call
them, with the same modalities, and backpropagate, in the same order.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import ObjectiveConfig
from .distributed import all_reduce_sum, gather_with_grad, world_size

TASKS = ("binary", "multiclass", "multilabel", "regression")


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """Manifest field from an object or a mapping (the loader's manifest type may be either)."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def inverse_frequency_weights(counts: list[int] | Tensor) -> Tensor:
    """Class weights ∝ 1/count, normalised to mean 1, so rare classes are not drowned out.

    A class absent from train is given the count 1 (the largest weight) rather than an infinite one;
    it never occurs in training targets, so this only keeps validation losses finite.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1.0)
    w = 1.0 / counts
    return (w / w.mean()).to(torch.float32)


@dataclass
class TaskSpec:
    """What the prediction heads predict and how their outputs map back to target units.

    Models output standardised values (regression) or logits (classification); the loss works in
    those units and `to_target_units` converts for metrics and export.
    """

    task: str
    num_outputs: int
    # per-class weights for cross-entropy (binary / multiclass); None = unweighted
    class_weights: Tensor | None = None
    target_mean: float = 0.0
    target_std: float = 1.0

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.task == "regression" and self.num_outputs != 1:
            raise ValueError(f"regression has 1 output, got num_outputs={self.num_outputs}")
        if self.task == "binary" and self.num_outputs != 2:
            raise ValueError(f"binary uses 2 logits (softmax cross-entropy), got num_outputs={self.num_outputs}")
        if self.class_weights is not None:
            self.class_weights = torch.as_tensor(self.class_weights, dtype=torch.float32)
            if self.class_weights.shape != (self.num_outputs,):
                raise ValueError(f"class_weights has shape {tuple(self.class_weights.shape)}, expected ({self.num_outputs},)")
        if not self.target_std > 0:  # also catches NaN
            raise ValueError(f"target_std must be > 0, got {self.target_std}")

    @classmethod
    def from_manifest(cls, manifest: Any) -> TaskSpec:
        """Spec from a shard manifest (`task`, `class_names`, `target_shape`, `target_stats`)."""
        task = _get(manifest, "task")
        stats = _get(manifest, "target_stats") or {}
        names = list(_get(manifest, "class_names") or [])
        if task == "regression":
            std = float(stats.get("std", 1.0))
            # a constant target would divide by zero; std 1 leaves it merely centred
            return cls(task, 1, None, float(stats.get("mean", 0.0)), std if std > 0 else 1.0)
        if task in ("binary", "multiclass"):
            counts = stats.get("class_counts")
            k = len(names) or (len(counts) if counts is not None else 0)
            if task == "binary":
                k = 2
            if k < 2:
                raise ValueError(f"{task} manifest needs class_names or target_stats.class_counts")
            weights = inverse_frequency_weights(counts) if counts is not None else None
            return cls(task, k, weights)
        if task == "multilabel":
            shape = list(_get(manifest, "target_shape") or [])
            k = len(names) or (int(shape[-1]) if shape else len(stats.get("positive_counts", [])))
            if k < 1:
                raise ValueError("multilabel manifest needs class_names or target_shape")
            # plain BCE: label frequencies are kept in the manifest for metrics, not reweighted here
            return cls(task, k, None)
        raise ValueError(f"manifest task must be one of {TASKS}, got {task!r}")

    def standardise(self, target: Tensor) -> Tensor:
        return (_upcast(target) - self.target_mean) / self.target_std

    def to_target_units(self, pred: Tensor) -> Tensor:
        """Regression: [B] in raw units; binary/multiclass: softmax probabilities; multilabel: sigmoid."""
        pred = _upcast(pred)
        if self.task == "regression":
            return pred.reshape(pred.shape[0], -1)[:, 0] * self.target_std + self.target_mean
        if self.task == "multilabel":
            return torch.sigmoid(pred)
        return torch.softmax(pred, dim=-1)

    def sample_weights(self, target: Tensor) -> Tensor:
        """Per-sample weight: the class weight of its target for weighted CE, else 1; 0 for a missing
        (NaN) regression target, so it counts in no task loss (the label-free terms still use it)."""
        if self.class_weights is not None and self.task in ("binary", "multiclass"):
            return self.class_weights.to(target.device)[target.long()]
        if self.task == "regression":
            return torch.isfinite(target.reshape(target.shape[0], -1)).all(dim=1).to(torch.float32)
        return torch.ones(target.shape[0], dtype=torch.float32, device=target.device)

    def sample_losses(self, pred: Tensor, target: Tensor) -> Tensor:
        """Unweighted per-sample task loss [B] (CE, BCE-with-logits mean over labels, MSE standardised)."""
        pred = _upcast(pred)
        if self.task == "regression":
            pred = pred.reshape(pred.shape[0], -1)
            if pred.shape[1] != 1:
                raise ValueError(f"regression prediction must be [B, 1] or [B], got {tuple(pred.shape)}")
            p = pred[:, 0]
            t = self.standardise(target).to(pred.dtype).reshape(p.shape)
            # a missing target: a loss of 0 and no gradient (its weight is 0 as well), never NaN
            return (p - torch.where(torch.isfinite(t), t, p.detach())) ** 2
        if self.task == "multilabel":
            return F.binary_cross_entropy_with_logits(pred, target.to(pred.dtype), reduction="none").mean(dim=1)
        return F.cross_entropy(pred, target.long(), reduction="none")


def _upcast(x: Tensor) -> Tensor:
    """Losses in at least float32 (bf16/fp16 logsumexp and sums lose too much); float64 is kept."""
    return x if x.dtype == torch.float64 else x.float()


def _global_normalisers(n: int, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Global sample count and global weight sum in ONE all-reduce, in float64 so that the
    normaliser does not depend on how the batch is split over ranks."""
    local = torch.stack([torch.tensor(float(n), dtype=torch.float64, device=weights.device), weights.double().sum()])
    total = all_reduce_sum(local)
    return total[0].clamp_min(1.0), total[1].clamp_min(1e-12)


def _task_contribution(spec: TaskSpec, pred: Tensor, target: Tensor, weights: Tensor, weight_sum: Tensor) -> Tensor:
    s = (spec.sample_losses(pred, target) * weights).sum()
    return s / weight_sum.to(s.dtype)


class _BlockLogSumExp(torch.autograd.Function):
    """lse[i, b] = log Σ_k exp(a_i · g_(b·N + k)) for a [R, D], g [B·N, D]: logsumexp(a @ gᵀ) over
    blocks of N columns, for rows with |a_i · g_j| ≤ `bound` (unit vectors over a temperature).

    The exponentials are taken in place in the similarity buffer with the fixed shift `bound` (no
    max pass, no shifted or scaled copy), and the backward turns them in place into the softmax
    gradient: one [R, B·N] buffer per step where autograd's composition allocates five. At batch 256
    with five sensors these elementwise passes over [M·n, M·N] were a third of the step."""

    @staticmethod
    def forward(ctx: Any, a: Tensor, g: Tensor, blocks: int, bound: float) -> Tensor:
        e = (a @ g.T).sub_(bound).exp_()
        total = e.view(a.shape[0], blocks, -1).sum(dim=-1)
        ctx.save_for_backward(a, g, e, total)
        ctx.blocks = blocks
        return total.log().add_(bound)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        a, g, e, total = ctx.saved_tensors
        p = e.view(a.shape[0], ctx.blocks, -1).mul_((grad / total).unsqueeze(-1)).view(a.shape[0], -1)  # softmax · grad
        grad_a = p @ g if ctx.needs_input_grad[0] else None
        grad_g = p.T @ a if ctx.needs_input_grad[1] else None
        return grad_a, grad_g, None, None


def _pairwise_nt_xent_sums(local: Tensor, glob: Tensor, offset: int, temperature: float) -> Tensor:
    """[M, M]: entry (a, b) (a ≠ b) is the summed NT-Xent of this rank's anchors of modality a against
    the global candidates of b (positive: the same sample) and of a (self excluded, SimCLR 2N form).
    The diagonal is not a loss (callers never read it).

    `local` [M, n, D] and `glob` [M, N, D] are L2-normalised; rows offset..offset+n of `glob` are local.
    Linear in the number of pairs: one [M·n, M·N] similarity matmul, one [M, n, N] within-modality
    bmm (recomputed rather than sliced out of the big one, whose backward would zero-fill all of it)
    and the positives as row dot products; no index gather or index tensor of the [M, M, n, N] shape.
    The temperature scales the anchors (before the matmuls, not the [M·n, M·N] similarities).
    """
    m, n, d = local.shape
    big_n = glob.shape[1]
    anchors = local / temperature
    flat, candidates = anchors.reshape(m * n, d), glob.reshape(m * big_n, d)
    bound = 1.0 / temperature  # |cosine| ≤ 1
    if 2.0 * bound <= 80.0:  # exp(-2/τ) stays far from float32 underflow: the fixed shift is exact
        cross = _BlockLogSumExp.apply(flat, candidates, m, bound).view(m, n, m)  # [a, i, b]
    else:
        cross = torch.logsumexp((flat @ candidates.T).view(m, n, m, big_n), dim=-1)
    within = torch.bmm(anchors, glob.transpose(1, 2))  # [a, i, k]: candidates of a itself
    cols = torch.arange(big_n, device=local.device)
    own = cols.unsqueeze(0) == (torch.arange(n, device=local.device) + offset).unsqueeze(1)  # [n, N] self mask
    within_lse = torch.logsumexp(within.masked_fill(own, float("-inf")), dim=-1)  # [a, i]
    positives = torch.einsum("aid,bid->ab", anchors, glob[:, offset : offset + n])  # summed over i
    return torch.logaddexp(cross, within_lse.unsqueeze(-1)).sum(dim=1) - positives


def _require(out: Mapping[str, Any], key: str, modality: str) -> Tensor:
    try:
        return out[key][modality]
    except KeyError as exc:
        raise KeyError(f"model output {key!r} has no entry for modality {modality!r}") from exc


def _modality_terms(out: Mapping[str, Any], mods: list[str], n: int, count: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """L_mod, the mean cross-entropy of both modality classifiers of every modality (target: m's
    index), all 2·M classifiers in one call, in rank-contribution form over the global sample count;
    and each classifier's term `mod_spe/<m>`, `mod_second/<m>` (detached, for the logs)."""
    classifiers = [(key, i, m) for key in ("mod_spe", "mod_second") for i, m in enumerate(mods)]
    logits = torch.stack([_upcast(_require(out, key, m)) for key, _, m in classifiers])  # [2M, n, M]
    cls = torch.tensor([i for _, i, _ in classifiers], device=logits.device).repeat_interleave(n)
    ce = F.cross_entropy(logits.flatten(0, 1), cls, reduction="none").view(len(classifiers), n).sum(dim=1) / count.to(logits.dtype)
    return ce.mean(), {f"{key}/{m}": value for (key, _, m), value in zip(classifiers, ce.detach())}


def _contrastive(
    out: Mapping[str, Any], mods: list[str], pairs: list[tuple[str, str]], temperature: float, mode: str
) -> tuple[Tensor, dict[str, Tensor]]:
    """L_con, the symmetric NT-Xent between z_sha of every pair of modalities over the global batch,
    combined as `mode` says; and each pair's term `con/<a>-<b>` (detached, for the logs). Every
    modality in one gather, every ordered pair in one similarity tensor, the pairs summed in one
    reduction (not a select and an add per pair, each with its own backward)."""
    local = F.normalize(torch.stack([_upcast(_require(out, "z_sha", m)) for m in mods], dim=1), dim=2)
    gathered, offset = gather_with_grad(local)
    sums = _pairwise_nt_xent_sums(local.transpose(0, 1), gathered.transpose(0, 1), offset, temperature)
    scale = 1.0 / (2 * gathered.shape[0])
    # Σ over pairs {a, b} of (sums[a, b] + sums[b, a]) · scale: every entry but the diagonal
    diagonal = torch.eye(len(mods), dtype=torch.bool, device=sums.device)
    con_sum = sums.masked_fill(diagonal, 0.0).sum() * scale
    with torch.no_grad():
        per_pair = (sums + sums.T) * scale
    index = {m: i for i, m in enumerate(mods)}
    logs = {f"con/{a}-{b}": per_pair[index[a], index[b]] for a, b in pairs}
    return {"reference": 2.0, "sum": 1.0}.get(mode, 1.0 / len(pairs)) * con_sum, logs


def _check_pairs_mode(cfg: ObjectiveConfig) -> None:
    if cfg.contrastive_pairs not in ("normalised", "sum", "reference"):
        raise ValueError(f"contrastive_pairs must be 'normalised', 'sum' or 'reference', got {cfg.contrastive_pairs!r}")


class MDiCoObjective:
    """main·L_main + aux·L_aux + con·L_con + mod·L_mod (Mena et al. 2025).

    * L_main: task loss of each modality's prediction P_m, mean over modalities; with a joint head
      (`model.joint_head`, output `pred_joint`) its task loss is added with the same weight.
    * L_aux: task loss of the shared auxiliary head on z_spe and on z_sha, mean over the 2·M
      (modality, input) terms — an average rather than a sum so that `aux` weighs the same as `main`.
    * L_con: NT-Xent between z_sha of every unordered modality pair over the global batch, mean over
      pairs ("normalised"), or their sum ("sum", each pair once); "reference" adds both ordered
      pairs (2 × the sum), as the public code.
    * L_mod: cross-entropy of the modality classifiers on z_spe (mod_spe) and on z_unu / z_sha
      (mod_second), target the modality's index in `modalities` (must be the model's order), mean
      over the 2·M terms.
    Every term uses all samples of the batch (the model decides what a missing sensor looks like).
    """

    def __init__(self, cfg: ObjectiveConfig, spec: TaskSpec, modalities: list[str]) -> None:
        if len(modalities) < 2:
            raise ValueError(f"MDiCo needs at least 2 modalities, got {modalities}")
        _check_pairs_mode(cfg)
        self.cfg = cfg
        self.spec = spec
        self.modalities = list(modalities)
        self.pairs = list(itertools.combinations(self.modalities, 2))

    def __call__(self, out: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        spec, cfg, mods = self.spec, self.cfg, self.modalities
        target = batch["target"]
        n = target.shape[0]
        weights = spec.sample_weights(target)
        count, weight_sum = _global_normalisers(n, weights)

        # All task heads in one loss call, all modality classifiers in another (few kernels, not 5·M).
        heads = [(key, m) for key in ("pred", "aux_spe", "aux_sha") for m in mods]
        preds = torch.stack([_upcast(_require(out, key, m)) for key, m in heads])  # [3M, n, out]
        losses = spec.sample_losses(preds.flatten(0, 1), target.repeat(len(heads), *([1] * (target.dim() - 1))))
        task = (losses.view(len(heads), n) * weights).sum(dim=1) / weight_sum.to(losses.dtype)
        num_m = len(mods)
        main, aux = task[:num_m].mean(), task[num_m:].mean()  # main/<m>, then aux_spe/<m> and aux_sha/<m>
        mod, mod_logs = _modality_terms(out, mods, n, count)
        con, con_logs = _contrastive(out, mods, self.pairs, cfg.temperature, cfg.contrastive_pairs)
        total = cfg.main * main + cfg.aux * aux + cfg.con * con + cfg.mod * mod

        logs = {f"{'main' if key == 'pred' else key}/{m}": value for (key, m), value in zip(heads, task.detach())}
        if "pred_joint" in out:  # the joint head (model.joint_head), weighed as one more main term
            joint = _task_contribution(spec, _upcast(out["pred_joint"]["all"]), target, weights, weight_sum)
            total = total + cfg.main * joint
            logs["main/joint"] = joint.detach()
        logs.update(mod_logs)
        logs.update(con_logs)
        logs.update(main=main.detach(), aux=aux.detach(), con=con.detach(), mod=mod.detach(), loss=total.detach())
        return total * world_size(), logs


class PretrainObjective:
    """con·L_con + mod·L_mod (+ masked·L_masked): the MDiCo terms that need no label.

    Targets are never read, so an unlabeled archive (target NaN, or anything) pretrains the encoders.
    L_con and L_mod are exactly MDiCoObjective's. L_masked (optional): for each sensor m, the
    predictor head maps the mean z_sha of the OTHER sensors to m's z_sha (model output
    `z_sha_pred`); loss 1 − cos with m's z_sha detached (SimSiam-style stop-gradient: the target is
    not pulled towards the prediction), mean over samples (global count) and sensors.
    """

    def __init__(self, cfg: ObjectiveConfig, modalities: list[str]) -> None:
        if len(modalities) < 2:
            raise ValueError(f"pretraining needs at least 2 modalities (the terms are cross-sensor), got {modalities}")
        _check_pairs_mode(cfg)
        self.cfg = cfg
        self.modalities = list(modalities)
        self.pairs = list(itertools.combinations(self.modalities, 2))

    def __call__(self, out: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, mods = self.cfg, self.modalities
        z0 = _require(out, "z_sha", mods[0])
        n = z0.shape[0]
        count, _ = _global_normalisers(n, torch.ones(n, device=z0.device))
        terms: dict[str, Tensor] = {}
        mod, mod_logs = _modality_terms(out, mods, n, count)
        con, con_logs = _contrastive(out, mods, self.pairs, cfg.temperature, cfg.contrastive_pairs)
        total = cfg.con * con + cfg.mod * mod
        logs: dict[str, Tensor] = {**mod_logs, **con_logs}
        if cfg.masked > 0:
            if "z_sha_pred" not in out:
                raise KeyError("objective.masked > 0 needs the model's predictor head (model output 'z_sha_pred')")
            for m in mods:
                pred = _upcast(_require(out, "z_sha_pred", m))
                target = _upcast(_require(out, "z_sha", m)).detach()
                s = (1.0 - F.cosine_similarity(pred, target, dim=1)).sum()
                terms[f"masked/{m}"] = s / count.to(s.dtype)
            masked = cast(Tensor, sum(terms[f"masked/{m}"] for m in mods)) / len(mods)
            total = total + cfg.masked * masked
            logs["masked"] = masked.detach()
        logs.update({k: v.detach() for k, v in terms.items()})
        logs.update(con=con.detach(), mod=mod.detach(), loss=total.detach())
        return total * world_size(), logs


class SupervisedObjective:
    """Task loss on out["pred"] (single sensor, early fusion, sensor dropout)."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec

    def __call__(self, out: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        target = batch["target"]
        weights = self.spec.sample_weights(target)
        _, weight_sum = _global_normalisers(target.shape[0], weights)
        main = _task_contribution(self.spec, out["pred"], target, weights, weight_sum)
        return main * world_size(), {"main": main.detach(), "loss": main.detach()}


class DistillObjective:
    """Task loss + weight × distillation towards a teacher's predictions (batch["teacher_pred"]).

    `teacher_pred` is the teacher's raw output, in the student's units (standardised values or
    logits, same shape as out["pred"]); it is detached here. The distillation term is
    regression: MSE between the standardised predictions; binary/multiclass: T²·KL(teacher‖student)
    at temperature T (T² keeps its gradient scale independent of T, Hinton et al.); multilabel: BCE
    of the student logits against the teacher's sigmoid. It is averaged over the global sample count.
    """

    def __init__(self, spec: TaskSpec, weight: float = 1.0, temperature: float = 2.0) -> None:
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.spec = spec
        self.weight = float(weight)
        self.temperature = float(temperature)

    def sample_distill(self, student: Tensor, teacher: Tensor) -> Tensor:
        """Per-sample distillation loss [B]."""
        s = _upcast(student)
        t = teacher.detach().to(s.dtype)
        if self.spec.task == "regression":
            return ((s.reshape(s.shape[0], -1) - t.reshape(t.shape[0], -1)) ** 2).mean(dim=1)
        if self.spec.task == "multilabel":
            return F.binary_cross_entropy_with_logits(s, torch.sigmoid(t), reduction="none").mean(dim=1)
        temp = self.temperature
        log_ps = F.log_softmax(s / temp, dim=-1)
        log_pt = F.log_softmax(t / temp, dim=-1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(dim=-1) * temp**2

    def __call__(self, out: Mapping[str, Any], batch: Mapping[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        target = batch["target"]
        if "teacher_pred" not in batch:
            raise KeyError("distillation needs batch['teacher_pred'] (the teacher's predictions)")
        weights = self.spec.sample_weights(target)
        count, weight_sum = _global_normalisers(target.shape[0], weights)
        main = _task_contribution(self.spec, out["pred"], target, weights, weight_sum)
        d = self.sample_distill(out["pred"], batch["teacher_pred"]).sum()
        distill = d / count.to(d.dtype)
        total = main + self.weight * distill
        logs = {"main": main.detach(), "distill": distill.detach(), "loss": total.detach()}
        return total * world_size(), logs


Objective = MDiCoObjective | SupervisedObjective | DistillObjective | PretrainObjective
