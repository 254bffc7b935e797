"""The fused TempCNN path: several TempCNNs of one shape with their parameters stacked.

MDiCo runs all its TempCNN encoders as one computation; each member is still exactly a TempCNN
(see the bank's tests). Also the stacked batch-norm and dropout kernels the bank and MDiCo share.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .encoders import TempCNN
from .norm import batch_norm, batch_stats

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
    with torch.no_grad():
        new_mean = running_mean.lerp(mean.squeeze(1), momentum)
        new_var = running_var.lerp(unbiased.squeeze(1), momentum)
    return out, new_mean, new_var


def group_batch_norm(norms: Sequence[nn.BatchNorm1d], x: Tensor) -> Tensor:
    """G BatchNorm1d modules (same width) on x [G, N, W], group g through norms[g]; statistics written back."""
    first = norms[0]
    assert first.momentum is not None and first.running_mean is not None, "needs running statistics with a momentum"
    out, mean, var = batch_norm_stacked(
        x,
        torch.stack([n.weight for n in norms]),
        torch.stack([n.bias for n in norms]),
        torch.stack([n.running_mean for n in norms]),  # type: ignore[misc]
        torch.stack([n.running_var for n in norms]),  # type: ignore[misc]
        first.training,
        first.momentum,
        first.eps,
    )
    if mean is not None and var is not None:
        with torch.no_grad():
            for n, m, v in zip(norms, mean, var):
                n.running_mean.copy_(m)  # type: ignore[union-attr]
                n.running_var.copy_(v)  # type: ignore[union-attr]
                n.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
    return out


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout drawing 16 random bits per element from 64-bit words: a quarter of the generator
    calls of F.dropout, whose CPU random draws dominate these small layers. p is rounded to 1/65536."""
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        return x * 0.0
    words = (x.numel() + 3) // 4
    bits = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, device=x.device)
    lanes = bits.view(torch.int16)[: x.numel()].view(x.shape)
    mask = (lanes >= int(round(p * 65536)) - 32768).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * mask


def _window_matmuls(xf: Tensor, q: Tensor, bias: Tensor, steps: int) -> Tensor:
    """Output step T-1-t = bias + xf [G, B, T·C] @ Q[:, t:t+T] (a contiguous view, as [G, T·C, H])."""
    g, _, tc = xf.shape
    out = [torch.baddbmm(bias.unsqueeze(1), xf, q[:, t : t + steps].reshape(g, tc, -1)) for t in range(steps)]
    return torch.stack(out[::-1], dim=2)


class _WindowMatmuls(torch.autograd.Function):
    """out[:, :, T-1-t] = bias + xf @ Q[:, t:t+T] (as [T·C, H]) for t < T, with a hand-written backward.

    Autograd's own backward of the T window slices zero-fills a whole Q-sized gradient per slice and
    adds them up (six [G, K, C, H] fills per step for MDiCo); here the gradient of Q is one batched
    matmul of all windows at once (xfᵀ · grad, [G, T·C, T·H]) whose column blocks are added into Q's
    rows in place, and the input gradient is T matmuls accumulated in place."""

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
            every = torch.bmm(xf.transpose(1, 2), grad.view(g, b, steps * h)).view(g, tc, steps, h)
            grad_q = torch.zeros_like(q)
            for t in range(steps):
                grad_q[:, t : t + steps].view(g, tc, h).add_(every[:, :, steps - 1 - t])
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
        self.fc_weight = nn.Parameter(torch.zeros(g, out_dim, hidden * steps))
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
        self.fc_weight[g].copy_(core.fc[0].weight)
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
        core.fc[0].weight.copy_(self.fc_weight[g])
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
        x = F.linear(x.flatten(1), self.fc_weight[g], self.fc_bias[g])
        return F.dropout(F.relu(self._norm_one(self.depth, g, x)), self.dropout, self.training)

    # ---------------------------------------------------------------------------------- fused path
    def _norm_group(self, i: int, sel: _Selection, x: Tensor) -> Tensor:
        mean, var, count = self._stats(i)
        out, new_mean, new_var = batch_norm_stacked(
            x, _take(self.norm_weight[i], sel), _take(self.norm_bias[i], sel), _take(mean, sel), _take(var, sel),
            self.training, self.momentum, self.eps,
        )  # fmt: skip
        if new_mean is not None and new_var is not None:
            with torch.no_grad():
                _put(mean, sel, new_mean)
                _put(var, sel, new_var)
                _put(count, sel, _take(count, sel) + 1)
        return out

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
            y = self._norm_group(i, sel, y.reshape(g, -1, hidden))
            x = fast_dropout(F.relu(y), self.dropout, self.training).view(g, batch, steps, hidden)
        # TempCNN flattens [H, T] (channel-major): transpose the activations to match the dense weights.
        flat = x.transpose(2, 3).reshape(g, batch, -1)
        y = torch.baddbmm(_take(self.fc_bias, sel).unsqueeze(1), flat, _take(self.fc_weight, sel).transpose(1, 2))
        y = self._norm_group(self.depth, sel, y)
        return fast_dropout(F.relu(y), self.dropout, self.training)


__all__ = ["TempCNNBank", "batch_norm_stacked", "fast_dropout", "group_batch_norm"]
