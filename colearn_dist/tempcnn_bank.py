"""The fused TempCNN path: several TempCNNs of one shape with their parameters stacked.

MDiCo runs all its TempCNN encoders as one computation; each member is still exactly a TempCNN
(see the bank's tests). `LinearBank` does the same for its per-modality projections and heads.
Also the stacked batch-norm and dropout kernels they share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import TempCNN
from .norm import BatchNorm1d, batch_norm, batch_stats, global_batch_stats

# ------------------------------------------------------------------------------------------ fused path
#
# Why this exists: MDiCo runs 2 encoders per modality, each a few dozen tiny ops on [32, 3, C] inputs.
# On one CPU thread the per-op dispatch, autograd and per-parameter optimizer costs dominate the
# arithmetic, and the CPU conv / batch-norm kernels are slow on such short, wide batches. A bank stores
# G TempCNNs of one shape stacked, so they run as one computation whose op count does not grow with G,
# and the optimizer sees ~16 tensors instead of 16·G.


def batch_norm_stacked(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """G BatchNorms at once: x [G, N, W], parameters and statistics [G, W]. Returns the output and, in
    training, the updated running statistics (the caller stores them). Two reductions over the middle
    axis are much cheaper here than F.batch_norm's CPU kernels (its backward especially)."""
    if not training:
        scale = torch.rsqrt(running_var + eps) * weight
        return (x - running_mean.unsqueeze(1)) * scale.unsqueeze(1) + bias.unsqueeze(1), None, None
    mean, centred, var, unbiased = batch_stats(x, (1,))  # the global batch's (norm.py)
    out = centred * (torch.rsqrt(var + eps) * weight.unsqueeze(1)) + bias.unsqueeze(1)
    return (out, *_running_stats(running_mean, running_var, mean.squeeze(1), unbiased.squeeze(1), momentum))


@torch.no_grad()
def _running_stats(running_mean: Tensor, running_var: Tensor, mean: Tensor, unbiased: Tensor, momentum: float) -> tuple[Tensor, Tensor]:
    """The running statistics [G, W] after one batch's mean and unbiased variance [G, W] (nn.BatchNorm's rule)."""
    return running_mean.lerp(mean, momentum), running_var.lerp(unbiased, momentum)


def _draw_dropout_mask(x: Tensor, p: float) -> Tensor:
    """The scaled keep mask of inverted dropout (0 or 1/(1-p)), shaped as x (contiguous): 16 random
    bits per element from 64-bit words, a quarter of the generator calls of F.dropout, whose CPU
    random draws dominate these small layers. p is rounded to 1/65536."""
    words = (x.numel() + 3) // 4
    bits = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, device=x.device)
    lanes = bits.view(torch.int16)[: x.numel()].view(x.shape)
    # keep where lane ≥ threshold: clamp(lane − threshold + 1, 0, 1) is exactly that 0 / 1 for integer
    # lanes, without a bool tensor (on CPU a compare to bool and its cast cost 15× this cast)
    threshold = int(round(p * 65536)) - 32768
    exact = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32  # int16 is exact in these
    return lanes.to(exact).sub_(threshold - 1).clamp_(0.0, 1.0).mul_(1.0 / (1.0 - p)).to(x.dtype)


@torch.library.custom_op("colearn_dist::dropout_mask", mutates_args=())
def _compiled_dropout_mask(x: Tensor, p: float) -> Tensor:
    """`_draw_dropout_mask` as one opaque op for torch.compile. Traced, its int16 lanes would enter
    inductor's kernels, whose CPU vectoriser has no int16 loads: every kernel reading them (the
    dropout and batch-norm backward) ran scalar. Opaque, the kernels read a float mask, and the
    draws are eager mode's (same generator, same masks). The compiled plain step: a median 1.20×
    at batch 32 (10 pairs), 1.31× at 256 (5 pairs; README, Speed, round 11)."""
    return _draw_dropout_mask(x, p)


@_compiled_dropout_mask.register_fake
def _(x: Tensor, p: float) -> Tensor:
    return x.new_empty(x.shape)


def _dropout_mask(x: Tensor, p: float) -> Tensor:
    """`_draw_dropout_mask`; under torch.compile on CPU through the opaque op (GPU kernels load int16)."""
    if torch.compiler.is_compiling() and x.device.type == "cpu":
        return _compiled_dropout_mask(x.detach(), p)  # x gives the shape only: the op has no gradient
    return _draw_dropout_mask(x, p)


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout with `_dropout_mask`'s draws."""
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    return x * _dropout_mask(x, p)


class _NormReluDropout(torch.autograd.Function):
    """dropout(relu(BatchNorm(x))) of G stacked BatchNorms over the middle axis of x [G, N, W], batch
    statistics of this process, as one autograd node with a hand-written backward.

    Why: composed from ops, one such block is ~12 elementwise passes forward and ~20 backward over
    [G, N, W], each a separate autograd node; at MDiCo's sizes (one thread) their dispatch and memory
    passes are a large part of the step. Forward saves the output (its sign is the ReLU and dropout
    mask), the centred input and 1/std; backward is the closed form of BatchNorm's gradient.
    Returns (out, mean [G, W], unbiased variance [G, W]) — the statistics detached, for the running ones.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, eps: float, p: float) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        # this process's statistics (the node runs only then); batch_stats' two means, not torch.var_mean
        # (on CPU, over the middle axis of [10, 768, 64], 6 ms against 0.6 ms for these)
        mean, centred, var, unbiased = batch_stats(x, (1,))
        invstd = torch.rsqrt(var + eps)
        out = torch.addcmul(bias.unsqueeze(1), centred, invstd * weight.unsqueeze(1)).relu_()
        scale = 1.0
        if p > 0.0:
            out = out.mul_(_dropout_mask(out, p))
            scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(out, centred, invstd, weight)
        ctx.scale = scale
        batch_mean, batch_var = mean.squeeze(1), unbiased.squeeze(1)
        ctx.mark_non_differentiable(batch_mean, batch_var)
        ctx.set_materialize_grads(False)  # the statistics get no gradient: no zero-filled [G, W] per call
        return out, batch_mean, batch_var

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        out, centred, invstd, weight = ctx.saved_tensors
        if grad is None:  # the output was not used
            return None, None, None, None, None
        n = out.shape[1]
        # where the output is 0, ReLU or dropout stopped the gradient (ReLU's own backward kernel:
        # torch.where(out > 0, ...) is 20× slower on CPU)
        gy = torch.ops.aten.threshold_backward(grad, out, 0.0)
        if ctx.scale != 1.0:
            gy = gy.mul_(ctx.scale)
        xhat = centred * invstd
        grad_b = gy.sum(dim=1)
        grad_w = (gy * xhat).sum(dim=1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            # dx = w/std · (dy − mean(dy) − x̂·mean(dy·x̂))
            grad_x = (gy - (grad_b / n).unsqueeze(1)).sub_(xhat.mul_((grad_w / n).unsqueeze(1))).mul_(invstd * weight.unsqueeze(1))
        return grad_x, grad_w, grad_b, None, None


def fused_norm_applies() -> bool:
    """Whether `norm_relu_dropout` runs the fused node: not across ranks (the composed ops hold the
    global batch's statistics) and not under torch.compile, which fuses the composed ops itself and
    whose speed-up was measured with them (README, Speed: the traced node was no faster)."""
    return not global_batch_stats() and not torch.compiler.is_compiling()


def norm_relu_dropout(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    training: bool,
    momentum: float,
    eps: float,
    p: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """`fast_dropout(relu(batch_norm_stacked(...)), p)`, same values and gradients, fewer passes: the
    fused `_NormReluDropout` where `fused_norm_applies()`, else the composed ops."""
    if not training or p >= 1.0 or not fused_norm_applies():
        out, new_mean, new_var = batch_norm_stacked(x, weight, bias, running_mean, running_var, training, momentum, eps)
        return fast_dropout(F.relu(out), p, training), new_mean, new_var
    out, mean, unbiased = _NormReluDropout.apply(x, weight, bias, eps, max(p, 0.0))
    return (out, *_running_stats(running_mean, running_var, mean, unbiased, momentum))


def _window_matmuls(xf: Tensor, q: Tensor, bias: Tensor, steps: int) -> Tensor:
    """Output step T-1-t = bias + xf [G, B, T·C] @ Q[:, t:t+T] (a contiguous view, as [G, T·C, H])."""
    g, _, tc = xf.shape
    out = [torch.baddbmm(bias.unsqueeze(1), xf, q[:, t : t + steps].reshape(g, tc, -1)) for t in range(steps)]
    return torch.stack(out[::-1], dim=2)


class _WindowMatmuls(torch.autograd.Function):
    """out[:, :, T-1-t] = bias + xf @ Q[:, t:t+T] (as [T·C, H]) for t < T, with a hand-written backward.

    Autograd's own backward of the T window slices zero-fills a whole Q-sized gradient per slice and
    adds them up (six [G, K, C, H] fills per step for MDiCo); here the gradient of Q is one batched
    matmul of all windows at once (xfᵀ · grad, [G, T·C, T·H]) whose column blocks are written into
    Q's rows in place (no zero-filled gradient), and the input gradient is T matmuls accumulated in
    place."""

    @staticmethod
    def forward(ctx: Any, xf: Tensor, q: Tensor, bias: Tensor, steps: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(xf, q)
        ctx.steps = steps
        return _window_matmuls(xf, q, bias, steps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:  # type: ignore[override]
        xf, q = ctx.saved_tensors
        steps = ctx.steps
        g, b, tc = xf.shape
        h = grad.shape[-1]
        grad = grad.contiguous()  # [G, B, T, H]: output step T-1-t is window t
        grad_x = grad_q = grad_b = None
        if ctx.needs_input_grad[0]:
            for t in range(steps):
                w = q[:, t : t + steps].reshape(g, tc, h)
                g_t = grad[:, :, steps - 1 - t]
                grad_x = torch.bmm(g_t, w.transpose(1, 2)) if grad_x is None else grad_x.baddbmm_(g_t, w.transpose(1, 2))
        if ctx.needs_input_grad[1]:
            # Q has 2T-1 rows; window t covers rows t..t+T-1. The first window and the last one's
            # rows 1.. are copied in (every row written once: no zero fill), the rest added.
            every = torch.bmm(xf.transpose(1, 2), grad.view(g, b, steps * h)).view(g, steps, tc // steps, steps, h)
            grad_q = torch.empty_like(q)
            grad_q[:, :steps].copy_(every[:, :, :, steps - 1])
            if steps > 1:
                last = every[:, :, :, 0]  # window T-1
                grad_q[:, steps:].copy_(last[:, 1:])
                grad_q[:, steps - 1].add_(last[:, 0])
                for t in range(1, steps - 1):
                    grad_q[:, t : t + steps].add_(every[:, :, :, steps - 1 - t])
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum(dim=(1, 2))
        return grad_x, grad_q, grad_b, None


def _conv_as_matmuls(x: Tensor, weight: Tensor, bias: Tensor, steps: int, k: int, training: bool = True) -> Tensor:
    """A "same" Conv1d on short series as T batched matmuls, for G groups at once.

    x [G, B, T, C], weight [G, K, C, H] (tap-major), bias [G, H] → [G, B, T, H]. Output step t sees input
    step s through tap s - t + left; read with the output time axis reversed (t' = T-1-t) that tap is
    Q[s + t'] for Q = the taps shifted by T-1-left, so each output step is one matmul with a contiguous
    slice Q[t':t'+T]: no Toeplitz matrix is built, and Q is the weight itself (no copy, no slice) when
    T = (K+1)/2 — MDiCo's monthly 3 steps with kernel 5.
    """
    g, b, _, c = x.shape
    shift = steps - 1 - (k - 1) // 2  # position of tap 0 in Q (PyTorch's "same" pads (K-1)//2 on the left)
    before, drop = max(shift, 0), max(-shift, 0)
    after = 2 * steps - 1 - before - (k - drop)
    q = weight[:, drop:] if drop else weight
    if before or after > 0:
        q = F.pad(q, (0, 0, 0, 0, before, max(after, 0)))
    if k - drop + before + max(after, 0) != 2 * steps - 1:  # from the sizes, not q.shape: a trace sees no shape test
        q = q[:, : 2 * steps - 1]
    xf = x.reshape(g, b, steps * c)
    if training and torch.is_grad_enabled() and (xf.requires_grad or q.requires_grad or bias.requires_grad):
        return _WindowMatmuls.apply(xf, q.contiguous(), bias, steps)
    return _window_matmuls(xf, q, bias, steps)  # evaluation, tracing, export: plain ops (autograd if asked)


def _dense_from_linear(weight: Tensor, hidden: int, steps: int) -> Tensor:
    """TempCNN's dense weight [out, H·T] (channel-major input) → the bank's [T·H, out] (time-major)."""
    return weight.reshape(-1, hidden, steps).permute(2, 1, 0).reshape(steps * hidden, -1)


_Selection = Union[None, slice, Tensor]


def _selection(members: list[int], total: int, device: torch.device) -> _Selection:
    """How to pick bank rows: None (all, in order), a slice (a run, e.g. one modality's two encoders:
    no index tensor, so a trace has no constants), or an index tensor."""
    if members == list(range(total)):
        return None
    if members == list(range(members[0], members[0] + len(members))):
        return slice(members[0], members[0] + len(members))
    return torch.tensor(members, device=device)


def _take(t: Tensor, sel: _Selection) -> Tensor:
    if sel is None:
        return t
    return t[sel] if isinstance(sel, slice) else t.index_select(0, sel)


def _put(t: Tensor, sel: _Selection, value: Tensor) -> None:
    if sel is None:
        t.copy_(value)
    elif isinstance(sel, slice):
        t[sel].copy_(value)
    else:
        t.index_copy_(0, sel, value)


def _norm_relu_rows(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    sel: _Selection,
    training: bool,
    momentum: float,
    eps: float,
    p: float = 0.0,
) -> Tensor:
    """`norm_relu_dropout` with the rows `sel` of stacked BatchNorm parameters / statistics [G, W]
    (count [G]); the new statistics are written back into those rows."""
    out, new_mean, new_var = norm_relu_dropout(
        x, _take(weight, sel), _take(bias, sel), _take(mean, sel), _take(var, sel), training, momentum, eps, p
    )
    if new_mean is not None and new_var is not None:
        with torch.no_grad():
            _put(mean, sel, new_mean)
            _put(var, sel, new_var)
            _put(count, sel, _take(count, sel) + 1)
    return out


class TempCNNBank(nn.Module):
    """G TempCNNs of one shape (input channels may differ), parameters stored stacked.

    Member g is exactly `TempCNN(channels[g], ...)`: it is initialised from one (`load_member`), can be
    read back as one (`member`), and `forward_one(g, x)` is TempCNN's own computation on its slice (the
    plain path). `forward(xs)` runs all (or some) members as one computation (the fused path): a
    convolution is T batched matmuls when T ≤ K, else one grouped Conv1d; input channels are padded
    with zeros to the widest member (the first layer's weights for padded channels stay zero).
    """

    momentum = 0.1  # nn.BatchNorm1d's defaults, as in TempCNN
    eps = 1e-5

    def __init__(
        self,
        channels: Sequence[int],
        steps: int,
        out_dim: int,
        hidden: int = 64,
        depth: int = 3,
        kernel_size: int = 5,
        dropout: float = 0.2,
    ):
        super().__init__()
        if depth < 1:
            raise ValueError(f"TempCNNBank needs depth ≥ 1, got {depth}")
        self.channels = [int(c) for c in channels]
        self.steps, self.out_dim, self.hidden, self.depth = steps, out_dim, hidden, depth
        self.kernel_size, self.dropout = kernel_size, dropout
        g, widest = len(self.channels), max(self.channels)
        # Stored in the layout the fused path reads: conv weights tap-major [G, K, C, H].
        self.conv_weight = nn.ParameterList(
            nn.Parameter(torch.zeros(g, kernel_size, widest if i == 0 else hidden, hidden)) for i in range(depth)
        )
        self.conv_bias = nn.ParameterList(nn.Parameter(torch.zeros(g, hidden)) for _ in range(depth))
        # The dense layer [G, T·H, out], rows time-major (t·H + h): the activations [G, B, T, H] flatten
        # into it as a view. (TempCNN's nn.Linear flattens [H, T]; `fc_weight` [G, out, H·T] was
        # that layout: a transposed operand and an activation copy per step. Older state dicts load.)
        self.dense_weight = nn.Parameter(torch.zeros(g, steps * hidden, out_dim))
        self.fc_bias = nn.Parameter(torch.zeros(g, out_dim))
        widths = [hidden] * depth + [out_dim]  # one BatchNorm per conv block, one after the dense layer
        self.norm_weight = nn.ParameterList(nn.Parameter(torch.ones(g, w)) for w in widths)
        self.norm_bias = nn.ParameterList(nn.Parameter(torch.zeros(g, w)) for w in widths)
        for i, w in enumerate(widths):
            self.register_buffer(f"running_mean_{i}", torch.zeros(g, w))
            self.register_buffer(f"running_var_{i}", torch.ones(g, w))
            self.register_buffer(f"num_batches_tracked_{i}", torch.zeros(g, dtype=torch.long))
        for i, c in enumerate(self.channels):
            self.load_member(i, self._new_member(c))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        legacy = state_dict.pop(prefix + "fc_weight", None)  # [G, out, H·T]: before the dense layout
        if legacy is not None:
            state_dict[prefix + "dense_weight"] = torch.stack([_dense_from_linear(w, self.hidden, self.steps) for w in legacy])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _new_member(self, channels: int) -> TempCNN:
        return TempCNN(channels, self.steps, self.out_dim, self.hidden, self.depth, self.kernel_size, self.dropout)

    def _stats(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        return getattr(self, f"running_mean_{i}"), getattr(self, f"running_var_{i}"), getattr(self, f"num_batches_tracked_{i}")

    def _norms(self, core: TempCNN) -> list[nn.BatchNorm1d]:
        return [block[1] for block in core.blocks] + [core.fc[1]]  # type: ignore[list-item]

    @torch.no_grad()
    def load_member(self, g: int, core: TempCNN) -> None:
        """Copy a TempCNN's parameters and statistics into slot g."""
        for i, block in enumerate(core.blocks):
            conv = block[0]
            self.conv_weight[i][g].zero_()
            self.conv_weight[i][g, :, : conv.in_channels].copy_(conv.weight.permute(2, 1, 0))
            self.conv_bias[i][g].copy_(conv.bias)
        self.dense_weight[g].copy_(_dense_from_linear(core.fc[0].weight, self.hidden, self.steps))
        self.fc_bias[g].copy_(core.fc[0].bias)
        for i, norm in enumerate(self._norms(core)):
            self.norm_weight[i][g].copy_(norm.weight)
            self.norm_bias[i][g].copy_(norm.bias)
            mean, var, count = self._stats(i)
            mean[g].copy_(norm.running_mean)
            var[g].copy_(norm.running_var)
            count[g].copy_(norm.num_batches_tracked)

    @torch.no_grad()
    def member(self, g: int) -> TempCNN:
        """Member g as a standalone TempCNN (a copy), in this bank's train/eval mode."""
        core = self._new_member(self.channels[g])
        for i, block in enumerate(core.blocks):
            conv = block[0]
            conv.weight.copy_(self.conv_weight[i][g, :, : conv.in_channels].permute(2, 1, 0))
            conv.bias.copy_(self.conv_bias[i][g])
        core.fc[0].weight.copy_(self.dense_weight[g].view(self.steps, self.hidden, -1).permute(2, 1, 0).reshape(self.out_dim, -1))
        core.fc[0].bias.copy_(self.fc_bias[g])
        for i, norm in enumerate(self._norms(core)):
            norm.weight.copy_(self.norm_weight[i][g])
            norm.bias.copy_(self.norm_bias[i][g])
            mean, var, count = self._stats(i)
            norm.running_mean.copy_(mean[g])
            norm.running_var.copy_(var[g])
            norm.num_batches_tracked.copy_(count[g])
        return core.train(self.training)

    # ---------------------------------------------------------------------------------- plain path
    def _norm_one(self, i: int, g: int, x: Tensor) -> Tensor:
        mean, var, count = self._stats(i)
        if self.training:
            count[g] += 1
        # mean[g] / var[g] are views: batch_norm updates the bank's statistics in place.
        weight, bias = self.norm_weight[i][g], self.norm_bias[i][g]
        return batch_norm(x, mean[g], var[g], weight, bias, self.training, self.momentum, self.eps)

    def forward_one(self, g: int, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        """Member g on x [B, T, C]: TempCNN.forward, step for step."""
        x = x.transpose(1, 2)
        for i in range(self.depth):
            weight = self.conv_weight[i][g]
            if i == 0:
                weight = weight[:, : self.channels[g]]
            x = F.conv1d(x, weight.permute(2, 1, 0), self.conv_bias[i][g], padding="same")
            x = F.dropout(F.relu(self._norm_one(i, g, x)), self.dropout, self.training)
        x = torch.addmm(self.fc_bias[g], x.transpose(1, 2).flatten(1), self.dense_weight[g])
        return F.dropout(F.relu(self._norm_one(self.depth, g, x)), self.dropout, self.training)

    # ---------------------------------------------------------------------------------- fused path
    def _norm_group(self, i: int, sel: _Selection, x: Tensor) -> Tensor:
        """BatchNorm i, ReLU and dropout of the members `sel` on x [G, N, W]."""
        stats = self._stats(i)
        return _norm_relu_rows(x, self.norm_weight[i], self.norm_bias[i], *stats, sel, self.training, self.momentum, self.eps, self.dropout)

    def forward(self, xs: Sequence[Tensor], members: Optional[Sequence[int]] = None) -> Tensor:
        """Members `members` (default: all, in order) on xs[j] [B, T, C_j] → [len(xs), B, out_dim]."""
        g = len(xs)
        members = list(range(len(self.channels))) if members is None else list(members)
        if len(members) != g:
            raise ValueError(f"{g} inputs for {len(members)} members")
        sel = _selection(members, len(self.channels), xs[0].device)
        widest = max(self.channels)
        pads = [widest - self.channels[j] for j in members]  # from the bank's shape: a trace sees no shape tests
        x = torch.stack([F.pad(x, (0, pad)) if pad else x for x, pad in zip(xs, pads)])  # [G, B, T, C]
        batch, steps, hidden = x.shape[1], self.steps, self.hidden
        for i in range(self.depth):
            weight, bias = _take(self.conv_weight[i], sel), _take(self.conv_bias[i], sel)
            if steps <= self.kernel_size:
                y = _conv_as_matmuls(x, weight, bias, steps, self.kernel_size, self.training)
            else:
                conv = weight.permute(0, 3, 2, 1).reshape(g * hidden, -1, self.kernel_size)  # [G*H, C, K]
                y = F.conv1d(x.permute(1, 0, 3, 2).reshape(batch, -1, steps), conv, bias.reshape(-1), padding="same", groups=g)
                y = y.view(batch, g, hidden, steps).permute(1, 0, 3, 2)
            x = self._norm_group(i, sel, y.reshape(g, -1, hidden)).view(g, batch, steps, hidden)
        flat = x.reshape(g, batch, steps * hidden)  # a view, time-major, as the dense weight's rows
        y = torch.baddbmm(_take(self.fc_bias, sel).unsqueeze(1), flat, _take(self.dense_weight, sel))
        return self._norm_group(self.depth, sel, y)


class LinearBank(nn.Module):
    """G small MLPs of one shape by name — Linear layers with ReLU between them and, with `norm`,
    BatchNorm + ReLU after the last: MDiCo's projections (Linear, BatchNorm, ReLU) and heads
    (`make_head`) — stored stacked in the layout the batched matmul reads: weights [G, in, out],
    biases [G, out], BatchNorm parameters and statistics [G, W]. Nothing is stacked or transposed
    per step.

    Member g is exactly the nn.Sequential it replaces (`member`, `load_member`; `forward_one` is its
    computation), and a state dict of those modules under their names — the ModuleDict this bank
    replaced, `<name>.<layer>.weight` … — still loads.
    """

    momentum = 0.1  # nn.BatchNorm1d's defaults
    eps = 1e-5

    def __init__(self, names: Sequence[str], sizes: Sequence[int], norm: bool = False):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError(f"LinearBank needs at least an input and an output size, got {list(sizes)}")
        self.names = list(names)
        self.sizes = [int(n) for n in sizes]
        self.norm = norm
        g = len(self.names)
        self.weight = nn.ParameterList(nn.Parameter(torch.zeros(g, a, b)) for a, b in zip(self.sizes[:-1], self.sizes[1:]))
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(g, b)) for b in self.sizes[1:])
        if norm:
            width = self.sizes[-1]
            self.norm_weight = nn.Parameter(torch.ones(g, width))
            self.norm_bias = nn.Parameter(torch.zeros(g, width))
            self.register_buffer("running_mean", torch.zeros(g, width))
            self.register_buffer("running_var", torch.ones(g, width))
            self.register_buffer("num_batches_tracked", torch.zeros(g, dtype=torch.long))
        for i in range(g):  # nn.Linear's initialisation, member by member (the same draws as the modules)
            self.load_member(i, self._new_member())

    def _new_member(self) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(self.sizes[:-1], self.sizes[1:])):
            layers += [nn.ReLU(), nn.Linear(a, b)] if i else [nn.Linear(a, b)]
        if self.norm:
            layers += [BatchNorm1d(self.sizes[-1]), nn.ReLU()]
        return nn.Sequential(*layers)

    def _linears(self, member: nn.Sequential) -> list[nn.Linear]:
        return [layer for layer in member if isinstance(layer, nn.Linear)]

    @torch.no_grad()
    def load_member(self, g: int, member: nn.Sequential) -> None:
        """Copy an nn.Sequential of this bank's shape (see `member`) into slot g."""
        for i, linear in enumerate(self._linears(member)):
            self.weight[i][g].copy_(linear.weight.T)
            self.bias[i][g].copy_(linear.bias)
        if self.norm:
            bn = member[-2]
            self.norm_weight[g].copy_(bn.weight)
            self.norm_bias[g].copy_(bn.bias)
            self.running_mean[g].copy_(bn.running_mean)
            self.running_var[g].copy_(bn.running_var)
            self.num_batches_tracked[g].copy_(bn.num_batches_tracked)

    @torch.no_grad()
    def member(self, g: int) -> nn.Sequential:
        """Member g as a standalone nn.Sequential (a copy), in this bank's train/eval mode."""
        out = self._new_member()
        for i, linear in enumerate(self._linears(out)):
            linear.weight.copy_(self.weight[i][g].T)
            linear.bias.copy_(self.bias[i][g])
        if self.norm:
            bn = out[-2]
            bn.weight.copy_(self.norm_weight[g])
            bn.bias.copy_(self.norm_bias[g])
            bn.running_mean.copy_(self.running_mean[g])
            bn.running_var.copy_(self.running_var[g])
            bn.num_batches_tracked.copy_(self.num_batches_tracked[g])
        return out.train(self.training)

    def member_keys(self) -> dict[str, str]:
        """Bank tensor name → the member nn.Sequential's state-dict key holding its row."""
        last = len(self.sizes) - 2
        keys = {}
        for i in range(last + 1):
            keys.update({f"weight.{i}": f"{2 * i}.weight", f"bias.{i}": f"{2 * i}.bias"})
        if self.norm:
            norm = 2 * last + 1
            keys.update(
                {name: f"{norm}.{key}" for name, key in [("norm_weight", "weight"), ("norm_bias", "bias"),
                 ("running_mean", "running_mean"), ("running_var", "running_var"), ("num_batches_tracked", "num_batches_tracked")]}
            )  # fmt: skip
        return keys

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Before the bank, one nn.Sequential per name (`<prefix><name>.<layer>.<tensor>`): stacked here
        when every one of those tensors is there (otherwise strict loading names what is missing)."""
        old = {ours: [f"{prefix}{name}.{key}" for name in self.names] for ours, key in self.member_keys().items()}
        if all(k in state_dict for keys in old.values() for k in keys):
            for ours, keys in old.items():
                rows = [state_dict.pop(k) for k in keys]
                state_dict[prefix + ours] = torch.stack([r.T if ours.startswith("weight.") else r for r in rows])
        super()._load_from_state_dict(state_dict, prefix, *args)

    # ---------------------------------------------------------------------------------- computation
    def forward_one(self, g: int, x: Tensor) -> Tensor:
        """Member g on x [B, in] → [B, out]: the nn.Sequential's computation."""
        for i, (weight, bias) in enumerate(zip(self.weight, self.bias)):
            x = torch.addmm(bias[g], F.relu(x) if i else x, weight[g])
        if not self.norm:
            return x
        if self.training:
            self.num_batches_tracked[g] += 1
        # running_mean[g] / running_var[g] are views: batch_norm updates the bank's statistics in place.
        x = batch_norm(
            x, self.running_mean[g], self.running_var[g], self.norm_weight[g], self.norm_bias[g], self.training, self.momentum, self.eps
        )
        return F.relu(x)

    def forward(self, x: Tensor, members: Optional[Sequence[int]] = None) -> Tensor:
        """Members `members` (default: all, in order) on x [len(members), B, in] → [len(members), B, out]."""
        members = list(range(len(self.names))) if members is None else list(members)
        if len(members) != x.shape[0]:
            raise ValueError(f"{x.shape[0]} inputs for {len(members)} members")
        sel = _selection(members, len(self.names), x.device)
        for i, (weight, bias) in enumerate(zip(self.weight, self.bias)):
            x = torch.baddbmm(_take(bias, sel).unsqueeze(1), F.relu(x) if i else x, _take(weight, sel))
        if not self.norm:
            return x
        stats = (self.running_mean, self.running_var, self.num_batches_tracked)
        return _norm_relu_rows(x, self.norm_weight, self.norm_bias, *stats, sel, self.training, self.momentum, self.eps)


__all__ = ["LinearBank", "TempCNNBank", "batch_norm_stacked", "fast_dropout", "norm_relu_dropout"]
