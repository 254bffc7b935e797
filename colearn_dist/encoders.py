"""Per-modality encoders: every one maps one modality's batch to a `[B, out_dim]` embedding.

All encoders share the call `forward(x, month=None)` so models can treat them alike; only the temporal
attention encoder uses `month` (the others accept and ignore it). Inputs follow docs/DESIGN.md:
series `[B, T, C]` float, static `[B, C]` float, categorical `[B, T]` int64.

`fused_tempcnn` runs several TempCNNs of the same shape as one grouped computation; it reads the
parameters of the ordinary modules, so it is an execution strategy, not a different model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig

KINDS = ("series", "static", "categorical")


@dataclass(frozen=True)
class ModalityInput:
    """What a model needs to know about one modality's tensors (from the shard manifest)."""

    name: str
    kind: str  # "series" [B,T,C] float | "static" [B,C] float | "categorical" [B,T] int64
    steps: int | None  # T; None for static
    channels: int  # C; 1 for categorical
    num_classes: int | None = None
    missing_value: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"modality {self.name!r}: kind {self.kind!r} is not one of {list(KINDS)}")
        if self.kind != "static" and (self.steps is None or self.steps < 1):
            raise ValueError(f"modality {self.name!r} ({self.kind}) needs steps ≥ 1, got {self.steps}")
        if self.kind == "categorical" and (self.num_classes is None or self.num_classes < 1):
            raise ValueError(f"modality {self.name!r} (categorical) needs num_classes ≥ 1, got {self.num_classes}")
        if self.channels < 1:
            raise ValueError(f"modality {self.name!r}: channels must be ≥ 1, got {self.channels}")


def modality_inputs(manifest_modalities: Mapping[str, Mapping[str, Any]], names: Sequence[str] | None = None) -> dict[str, ModalityInput]:
    """Build the inputs from the manifest's "modalities" mapping; `names` (None or empty = all) picks and orders them."""
    names = list(names) if names else list(manifest_modalities)
    out: dict[str, ModalityInput] = {}
    for name in names:
        if name not in manifest_modalities:
            raise KeyError(f"modality {name!r} is not in the manifest (have {list(manifest_modalities)})")
        meta = manifest_modalities[name]
        kind = meta.get("kind")
        shape = list(meta.get("shape") or [])
        layout = {"series": 2, "static": 1, "categorical": 1}
        if kind not in layout:
            raise ValueError(f"modality {name!r}: kind {kind!r} is not one of {list(KINDS)}")
        if len(shape) != layout[kind]:
            expected = {"series": "[T, C]", "static": "[C]", "categorical": "[T]"}[kind]
            raise ValueError(f"modality {name!r} ({kind}): manifest shape {shape} is not {expected}")
        if kind == "series":
            steps, channels = int(shape[0]), int(shape[1])
        elif kind == "static":
            steps, channels = None, int(shape[0])
        else:
            steps, channels = int(shape[0]), 1
        num_classes = meta.get("num_classes")
        missing = meta.get("missing_value")
        out[name] = ModalityInput(
            name=name,
            kind=kind,
            steps=steps,
            channels=channels,
            num_classes=None if num_classes is None else int(num_classes),
            missing_value=None if missing is None else int(missing),
        )
    return out


# --------------------------------------------------------------------------------------------- encoders


class TempCNN(nn.Module):
    """Pelletier et al. (2019): `depth` conv blocks, then a dense layer over the flattened time axis."""

    def __init__(self, channels: int, steps: int, out_dim: int, hidden: int = 64, depth: int = 3, kernel_size: int = 5, dropout: float = 0.2):
        super().__init__()
        self.steps, self.hidden, self.kernel_size, self.dropout = steps, hidden, kernel_size, dropout
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(channels if i == 0 else hidden, hidden, kernel_size, padding="same"),
                nn.BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
            )
            for i in range(depth)
        )
        flat = (hidden if depth else channels) * steps
        self.fc = nn.Sequential(nn.Linear(flat, out_dim), nn.BatchNorm1d(out_dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        x = x.transpose(1, 2)  # [B, C, T]: Conv1d convolves the last axis
        for block in self.blocks:
            x = block(x)
        return self.fc(x.flatten(1))


def month_encoding(month: Tensor, dim: int) -> Tensor:
    """Sinusoids of the calendar angle, so December sits next to January (month 1..12 → [.., dim])."""
    angle = (month.to(torch.float32) - 1.0) * (2.0 * math.pi / 12.0)
    half = (dim + 1) // 2
    k = torch.arange(1, half + 1, device=month.device, dtype=torch.float32)
    a = angle.unsqueeze(-1) * k
    return torch.cat([a.sin(), a.cos()], dim=-1)[..., :dim]


def position_encoding(steps: int, dim: int, device: torch.device | None = None) -> Tensor:
    """The usual transformer sinusoids of the step index, for data without months ([T, dim])."""
    half = (dim + 1) // 2
    pos = torch.arange(steps, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * (-2.0 * math.log(10000.0) / dim))
    a = pos * freq
    return torch.cat([a.sin(), a.cos()], dim=-1)[:, :dim]


class TemporalAttention(nn.Module):
    """A small pre-norm Transformer encoder over time, mean-pooled: order-aware via month or position sinusoids."""

    def __init__(self, channels: int, steps: int, out_dim: int, hidden: int = 64, depth: int = 3, heads: int = 4, dropout: float = 0.2):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"attention encoder: hidden ({hidden}) must be divisible by heads ({heads})")
        self.hidden = hidden
        self.inp = nn.Linear(channels, hidden)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(hidden, heads, dim_feedforward=2 * hidden, dropout=dropout, batch_first=True, norm_first=True)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        h = self.inp(x)
        if month is not None:
            h = h + month_encoding(month, self.hidden)
        else:
            h = h + position_encoding(x.shape[1], self.hidden, x.device)
        for layer in self.layers:
            h = layer(h)
        return self.out(self.norm(h).mean(dim=1))


class Recurrent(nn.Module):
    """GRU or LSTM with `depth` layers; the top layer's last hidden state summarises the series."""

    def __init__(self, channels: int, out_dim: int, hidden: int = 64, depth: int = 3, dropout: float = 0.2, cell: str = "gru"):
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn(channels, hidden, num_layers=depth, batch_first=True, dropout=dropout if depth > 1 else 0.0)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        _, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state  # LSTM returns (h_n, c_n)
        return self.out(h[-1])


class MLPEncoder(nn.Module):
    """`depth` hidden layers for static layers (or a flattened series when `mlp` is configured)."""

    def __init__(self, in_features: int, out_dim: int, hidden: int = 64, depth: int = 3, dropout: float = 0.2):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        return self.net(x.flatten(1))


class CategoricalEmbedding(nn.Module):
    """Class codes → vectors; missing or out-of-range codes get the all-zero padding vector (= "no information")."""

    def __init__(self, num_classes: int, dim: int, missing_value: int | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.missing_value = -1 if missing_value is None else int(missing_value)
        self.embedding = nn.Embedding(num_classes + 1, dim, padding_idx=num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.long()
        bad = (x < 0) | (x >= self.num_classes) | (x == self.missing_value)
        return self.embedding(x.masked_fill(bad, self.num_classes))


class CategoricalEncoder(nn.Module):
    """Embedding, then the configured encoder on the resulting `[B, T, categorical_dim]` series."""

    def __init__(self, embed: CategoricalEmbedding, encoder: nn.Module):
        super().__init__()
        self.embed = embed
        self.encoder = encoder

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        return self.encoder(self.embed(x), month)


def _series_encoder(cfg: EncoderConfig, channels: int, steps: int, out_dim: int) -> nn.Module:
    if cfg.type == "tempcnn":
        return TempCNN(channels, steps, out_dim, cfg.hidden, cfg.depth, cfg.kernel_size, cfg.dropout)
    if cfg.type == "attention":
        return TemporalAttention(channels, steps, out_dim, cfg.hidden, cfg.depth, cfg.heads, cfg.dropout)
    if cfg.type in ("gru", "lstm"):
        return Recurrent(channels, out_dim, cfg.hidden, cfg.depth, cfg.dropout, cell=cfg.type)
    if cfg.type == "mlp":
        return MLPEncoder(channels * steps, out_dim, cfg.hidden, cfg.depth, cfg.dropout)
    raise ValueError(f"unknown encoder type {cfg.type!r}")


def build_encoder(cfg: EncoderConfig, inp: ModalityInput, out_dim: int) -> nn.Module:
    """The encoder for one modality. A static modality always gets the MLP, whatever temporal type is
    configured: it has no time axis to convolve or attend over, and "default" usually names a temporal type."""
    if cfg.depth < 0 or (cfg.depth < 1 and cfg.type in ("attention", "gru", "lstm")):
        raise ValueError(f"encoder {cfg.type!r} for {inp.name!r}: depth {cfg.depth} is too small")
    if inp.kind == "static":
        return MLPEncoder(inp.channels, out_dim, cfg.hidden, cfg.depth, cfg.dropout)
    assert inp.steps is not None
    if inp.kind == "categorical":
        assert inp.num_classes is not None
        embed = CategoricalEmbedding(inp.num_classes, cfg.categorical_dim, inp.missing_value)
        return CategoricalEncoder(embed, _series_encoder(cfg, cfg.categorical_dim, inp.steps, out_dim))
    return _series_encoder(cfg, inp.channels, inp.steps, out_dim)


# ------------------------------------------------------------------------------------------ fused path


def tempcnn_core(encoder: nn.Module) -> tuple[nn.Module | None, TempCNN] | None:
    """(embedding or None, TempCNN) when `encoder` can join a fused group, else None."""
    if isinstance(encoder, TempCNN):
        core, embed = encoder, None
    elif isinstance(encoder, CategoricalEncoder) and isinstance(encoder.encoder, TempCNN):
        core, embed = encoder.encoder, encoder.embed
    else:
        return None
    norms = [m for m in core.modules() if isinstance(m, nn.BatchNorm1d)]
    if not core.blocks or any(n.momentum is None or not n.track_running_stats for n in norms):
        return None
    return embed, core


def fusion_key(core: TempCNN) -> tuple:
    """TempCNNs with equal keys can run as one grouped computation (input channels may differ)."""
    bn = core.fc[1]
    return (core.steps, core.hidden, len(core.blocks), core.kernel_size, core.dropout, core.fc[0].out_features, bn.eps, bn.momentum)


def group_batch_norm(norms: Sequence[nn.BatchNorm1d], x: Tensor) -> Tensor:
    """G BatchNorms (same width H) on x [G, N, H], group g normalised by norms[g]; running stats are
    written back to each module. Why not F.batch_norm: its CPU kernels are slow for these small, wide
    batches (backward especially), while two reductions over the middle axis are cheap."""
    first = norms[0]
    weight = torch.stack([n.weight for n in norms]).unsqueeze(1)
    bias = torch.stack([n.bias for n in norms]).unsqueeze(1)
    if first.training or first.running_mean is None:
        mean = x.mean(dim=1, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=1, keepdim=True)
        if first.training and first.running_mean is not None:
            n = x.shape[1]
            with torch.no_grad():
                momentum = first.momentum
                assert momentum is not None, "cumulative BatchNorm averages (momentum=None) are not fused"
                unbiased = var * (n / max(n - 1, 1))
                torch._foreach_lerp_([m.running_mean for m in norms], list(mean.squeeze(1).unbind(0)), momentum)  # type: ignore[misc]
                torch._foreach_lerp_([m.running_var for m in norms], list(unbiased.squeeze(1).unbind(0)), momentum)  # type: ignore[misc]
                for m in norms:
                    m.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
    else:
        mean = torch.stack([n.running_mean for n in norms]).unsqueeze(1)  # type: ignore[misc]
        var = torch.stack([n.running_var for n in norms]).unsqueeze(1)  # type: ignore[misc]
        centred = x - mean
    return centred * (torch.rsqrt(var + first.eps) * weight) + bias


def fast_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout drawing 16 random bits per element from 64-bit words: a quarter of the generator
    calls of F.dropout, whose CPU random draws dominate these small layers. p is rounded to 1/65536."""
    if not training or p <= 0.0:
        return x
    words = (x.numel() + 3) // 4
    bits = torch.randint(-(2**63), 2**63 - 1, (words,), dtype=torch.int64, device=x.device)
    lanes = bits.view(torch.int16)[: x.numel()].view(x.shape)
    keep = lanes >= int(round(p * 65536)) - 32768
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def _conv_as_matmuls(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """A "same" Conv1d on short series as T batched matmuls, for G groups at once.

    x [G, B, T, C], weight [G, K, C, H] (tap-major), bias [G, H] → [G, B, T, H]. Output step t sees input
    step s through tap s - t + left; read with the output time axis reversed (t' = T-1-t) that tap is
    Q[s + t'] for Q = the taps shifted by T-1-left, so each output step is one matmul with a contiguous
    slice Q[t':t'+T] — no Toeplitz matrix is built and no weight is copied when T ≤ (K+1)/2.
    """
    g, b, steps, c = x.shape
    k = weight.shape[1]
    shift = steps - 1 - (k - 1) // 2  # position of tap 0 in Q
    before, drop = max(shift, 0), max(-shift, 0)
    q = weight[:, drop:]
    after = 2 * steps - 1 - before - q.shape[1]
    if before or after > 0:
        q = F.pad(q, (0, 0, 0, 0, before, max(after, 0)))
    q = q[:, : 2 * steps - 1]
    xf = x.reshape(g, b, steps * c)
    bias = bias.unsqueeze(1)
    out = [torch.baddbmm(bias, xf, q[:, t : t + steps].reshape(g, steps * c, -1)) for t in range(steps)]
    return torch.stack(out[::-1], dim=2)


def fused_tempcnn(cores: Sequence[TempCNN], xs: Sequence[Tensor]) -> Tensor:
    """`torch.stack([core(x) for core, x in zip(cores, xs)])` ([G, B, out]) computed for all G encoders
    at once. Why: in the plain loop a few dozen tiny per-encoder ops cost far more in dispatch and
    autograd bookkeeping than the arithmetic, and CPU conv / batch-norm kernels are slow on such short,
    wide batches; here the op count does not grow with the number of encoders. Activations stay
    [G, B, T, H]; a convolution is T batched matmuls when T ≤ K, else one grouped Conv1d. Input channels
    are zero-padded to the widest input (the matching weights are zero-padded too)."""
    g = len(cores)
    first = cores[0]
    steps, k, p = first.steps, first.kernel_size, first.dropout
    widest = max(x.shape[-1] for x in xs)
    x = torch.stack([x if x.shape[-1] == widest else F.pad(x, (0, widest - x.shape[-1])) for x in xs])  # [G, B, T, C]
    batch = x.shape[1]
    for i in range(len(first.blocks)):
        convs = [core.blocks[i][0] for core in cores]
        bias = torch.stack([c.bias for c in convs])  # [G, H]
        hidden = bias.shape[1]
        if steps <= k:
            # [H, C, K] → [K, C, H], channels padded to the widest input
            weight = torch.stack([F.pad(c.weight, (0, 0, 0, widest - c.weight.shape[1])).permute(2, 1, 0) if i == 0 and c.weight.shape[1] < widest else c.weight.permute(2, 1, 0) for c in convs])
            y = _conv_as_matmuls(x, weight, bias)
        else:
            weight = torch.cat([F.pad(c.weight, (0, 0, 0, widest - c.weight.shape[1])) if i == 0 else c.weight for c in convs])
            xc = x.permute(1, 0, 3, 2).reshape(batch, -1, steps)  # [B, G*C, T]
            y = F.conv1d(xc, weight, bias.reshape(-1), padding="same", groups=g)
            y = y.view(batch, g, hidden, steps).permute(1, 0, 3, 2)
        y = group_batch_norm([core.blocks[i][1] for core in cores], y.reshape(g, -1, hidden))
        x = fast_dropout(F.relu(y), p, first.training).view(g, batch, steps, hidden)
        widest = hidden
    # Each TempCNN flattens [H, T] (channel-major); rows here are [T, H], so the dense weights are permuted to match.
    out = first.fc[0].out_features
    fc = torch.stack([core.fc[0].weight.view(out, -1, steps).transpose(1, 2) for core in cores])  # [G, out, T, H]
    bias = torch.stack([core.fc[0].bias for core in cores]).unsqueeze(1)
    y = torch.baddbmm(bias, x.reshape(g, batch, -1), fc.reshape(g, out, -1).transpose(1, 2))  # [G, B, out]
    y = group_batch_norm([core.fc[1] for core in cores], y)
    return fast_dropout(F.relu(y), p, first.training)


__all__ = [
    "CategoricalEmbedding",
    "CategoricalEncoder",
    "MLPEncoder",
    "ModalityInput",
    "Recurrent",
    "TempCNN",
    "TemporalAttention",
    "build_encoder",
    "fast_dropout",
    "fused_tempcnn",
    "group_batch_norm",
    "fusion_key",
    "modality_inputs",
    "month_encoding",
    "position_encoding",
    "tempcnn_core",
]
