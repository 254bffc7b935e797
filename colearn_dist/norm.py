"""Batch statistics over the global batch, for every normalisation layer that uses them.

With N ranks each holding b samples, per-rank BatchNorm statistics make the model a different
function of the data than one process holding N·b samples, the running statistics drift apart
between ranks, and every rank validates a different model. `batch_stats` computes the mean and
variance of the GLOBAL batch instead, with gradient: one all-reduce of per-channel sums forward,
one backward.
One process — or `engine.batch_stats: rank` — keeps the per-rank computation and runs no collective.

The fused stacked BatchNorm (`encoders.batch_norm_stacked`) and the `BatchNorm1d` / `BatchNorm2d`
here (nn.BatchNorm subclasses, same parameters, buffers and state-dict keys) both call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import all_reduce_with_grad, is_distributed

SCOPES = ("global", "rank")
_scope = "global"


def set_batch_stats(scope: str) -> None:
    """ "global" (default): statistics over all ranks' samples; "rank": each rank's own (no collective).
    Process-wide, like the process group it refers to; the engine sets it from `engine.batch_stats`."""
    global _scope
    if scope not in SCOPES:
        raise ValueError(f"batch statistics scope {scope!r} is not one of {list(SCOPES)}")
    _scope = scope


def batch_stats_scope() -> str:
    return _scope


def global_batch_stats() -> bool:
    """True when the batch statistics of this process need the other ranks' samples."""
    return _scope == "global" and is_distributed()


class BatchStats(NamedTuple):
    mean: Tensor  # over `dims`, which are kept with size 1
    centred: Tensor  # x - mean
    var: Tensor  # biased (what normalises the batch)
    unbiased: Tensor  # var · n / (n − 1), detached (what the running variance tracks)


def batch_stats(x: Tensor, dims: Sequence[int]) -> BatchStats:
    """Mean and variance of `x` over `dims` (batch, and time / space) — of the global batch when
    ranks share one (see the module docstring); a collective then: every rank calls it in the same
    order, and backpropagates through it.

    Each rank sums its values and squares about its own (detached) mean in float32 at least, turns
    them into raw moments in float64 and all-reduces those: the variance stays exact when the mean is large
    against the spread, where a plain sum of squares would cancel."""
    dims = [d % x.dim() for d in dims]
    n = 1
    for d in dims:  # not math.prod over a generator: torch.compile breaks its graph there
        n = n * x.shape[d]
    if not global_batch_stats():
        mean = x.mean(dim=dims, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=dims, keepdim=True)
        return BatchStats(mean, centred, var, var.detach() * (n / max(n - 1, 1)))
    kept = [1 if d in dims else s for d, s in enumerate(x.shape)]
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()  # bf16 / fp16 sum in float32
    shift = xf.detach().mean(dim=dims, keepdim=True) if n else xf.new_zeros(kept)
    xs = xf - shift
    s1 = xs.sum(dim=dims).double().flatten()
    s2 = (xs * xs).sum(dim=dims).double().flatten()
    k = shift.double().flatten()
    # One collective for the layer: count, Σx and Σx² of every channel (Σ(x−k)+nk, Σ(x−k)²+2kΣ(x−k)+nk²).
    count = torch.full((1,), float(n), dtype=torch.float64, device=x.device)
    total = all_reduce_with_grad(torch.cat([count, s1 + n * k, s2 + 2 * k * s1 + n * k * k]))
    size = total[:1].detach()
    c = k.numel()
    mean64 = total[1 : 1 + c] / size
    var64 = (total[1 + c :] / size - mean64 * mean64).clamp(min=0.0)
    mean = mean64.reshape(kept).to(x.dtype)
    var = var64.reshape(kept).to(x.dtype)
    unbiased = (var64.detach() * (size / (size - 1).clamp(min=1))).reshape(kept).to(x.dtype)
    return BatchStats(mean, x - mean, var, unbiased)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """`F.batch_norm` (channels on dim 1) whose batch statistics are `batch_stats`'; the running
    statistics are updated in place. Without ranks to share with it is F.batch_norm itself."""
    use_batch = training or running_mean is None or running_var is None
    if not (use_batch and global_batch_stats()):
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    dims = [0, *range(2, x.dim())]
    stats = batch_stats(x, dims)
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            running_mean.lerp_(stats.mean.flatten().to(running_mean.dtype), momentum)
            running_var.lerp_(stats.unbiased.flatten().to(running_var.dtype), momentum)
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = stats.centred * torch.rsqrt(stats.var + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class _GlobalStats(nn.modules.batchnorm._BatchNorm):
    """nn.BatchNorm's forward with `batch_norm` in place of F.batch_norm (its momentum rules kept)."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        training = self.training or (self.running_mean is None and self.running_var is None)
        tracked = not self.training or self.track_running_stats
        return batch_norm(
            input,
            self.running_mean if tracked else None,
            self.running_var if tracked else None,
            self.weight,
            self.bias,
            training,
            factor,
            self.eps,
        )


class BatchNorm1d(_GlobalStats, nn.BatchNorm1d):
    """nn.BatchNorm1d over the global batch (see the module docstring)."""


class BatchNorm2d(_GlobalStats, nn.BatchNorm2d):
    """nn.BatchNorm2d over the global batch (see the module docstring)."""


__all__ = [
    "SCOPES",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchStats",
    "batch_norm",
    "batch_stats",
    "batch_stats_scope",
    "global_batch_stats",
    "set_batch_stats",
]
