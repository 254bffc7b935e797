"""Per-modality encoders: every one maps one modality's batch to a `[B, out_dim]` embedding.

All encoders share the call `forward(x, month=None)` so models can treat them alike; only the temporal
attention encoder uses `month` (the others accept and ignore it): the behaviour of runs without
`model.context`. With a context (colearn_dist/context.py), `build_encoder` wraps every encoder in
`WithContext`, whose call is `forward(x, context)`: every kind then sees the calendar. Inputs follow docs/DESIGN.md:
series `[B, T, C]` float, static `[B, C]` float, categorical `[B, T]` int64, image `[B, C, H, W]` float.

The fused path (several TempCNNs stacked into one computation) lives in `tempcnn_bank`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import EncoderConfig
from .context import ContextSpec, join_input, month_encoding
from .manifest import Modality
from .norm import BatchNorm1d, BatchNorm2d
from .presto import PrestoEncoder

# --------------------------------------------------------------------------------------------- encoders


class TempCNN(nn.Module):
    """Pelletier et al. (2019): `depth` conv blocks, then a dense layer over the flattened time axis."""

    def __init__(
        self, channels: int, steps: int, out_dim: int, hidden: int = 64, depth: int = 3, kernel_size: int = 5, dropout: float = 0.2
    ):
        super().__init__()
        self.steps, self.hidden, self.kernel_size, self.dropout = steps, hidden, kernel_size, dropout
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv1d(channels if i == 0 else hidden, hidden, kernel_size, padding="same"),
                BatchNorm1d(hidden),
                nn.ReLU(),
                nn.Dropout(dropout),
            )
            for i in range(depth)
        )
        flat = (hidden if depth else channels) * steps
        self.fc = nn.Sequential(nn.Linear(flat, out_dim), BatchNorm1d(out_dim), nn.ReLU(), nn.Dropout(dropout))

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        x = x.transpose(1, 2)  # [B, C, T]: Conv1d convolves the last axis
        for block in self.blocks:
            x = block(x)
        return self.fc(x.flatten(1))


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
            layers += [nn.Linear(width, hidden), BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout)]
            width = hidden
        layers.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        return self.net(x.flatten(1))


class CategoricalEmbedding(nn.Module):
    """Class codes → vectors; missing or out-of-range codes get the zero vector (= "no information") and
    send no gradient, like a padding index (masked instead, which traces without warnings)."""

    def __init__(self, num_classes: int, dim: int, missing_value: int | None = None):
        super().__init__()
        self.num_classes = num_classes
        self.missing_value = -1 if missing_value is None else int(missing_value)
        self.embedding = nn.Embedding(num_classes, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.long()
        valid = (x >= 0) & (x < self.num_classes) & (x != self.missing_value)
        return self.embedding(x.clamp(0, self.num_classes - 1)) * valid.unsqueeze(-1).to(self.embedding.weight.dtype)


class CategoricalEncoder(nn.Module):
    """Embedding, then the configured encoder on the resulting `[B, T, categorical_dim]` series."""

    def __init__(self, embed: CategoricalEmbedding, encoder: nn.Module):
        super().__init__()
        self.embed = embed
        self.encoder = encoder

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        return self.encoder(self.embed(x), month)


class ResidualBlock(nn.Module):
    """Two 3×3 convolutions with a shortcut (He et al. 2016); stride 2 halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            BatchNorm2d(out_channels),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ImageCNN(nn.Module):
    """A small ResNet for image patches [B, C, H, W], trained from scratch (no weights to download).

    Stem (3×3 conv, stride 2, `hidden` channels), then `depth` residual blocks that each halve the
    resolution (widths hidden, 2·hidden, 4·hidden, 4·hidden, …), then global average pooling: any patch
    size works, from 8×8 test patches to 304×304 aerial ones, and the cost falls fast with resolution.
    """

    def __init__(self, channels: int, out_dim: int, hidden: int = 64, depth: int = 3, dropout: float = 0.2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, hidden, 3, stride=2, padding=1, bias=False), BatchNorm2d(hidden), nn.ReLU())
        blocks: list[nn.Module] = []
        width = hidden
        for i in range(depth):
            out = min(hidden * 2**i, 4 * hidden)
            blocks.append(ResidualBlock(width, out, stride=2))
            width = out
        self.blocks = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(width, out_dim)

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        h = self.blocks(self.stem(x))
        return self.fc(self.dropout(h.mean(dim=(2, 3))))


class WithContext(nn.Module):
    """An encoder that also sees the sample's context [B, T, K]: joined to its input (each step's
    features; flattened for a static layer) or, as a linear map of it, added to its output (images
    always: a calendar is no pixel). A categorical sensor's embedding runs first, then the join."""

    def __init__(self, core: nn.Module, spec: ContextSpec, out_dim: int, embed: Optional[nn.Module] = None, join: str | None = None):
        super().__init__()
        self.core = core
        self.embed = embed
        self.join = join or spec.join
        self.proj = nn.Linear(spec.flat_dim, out_dim) if self.join == "output" else None

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        if self.embed is not None:
            x = self.embed(x)
        if self.proj is None:
            return self.core(join_input(x, context))
        return self.core(x) + self.proj(context.flatten(1).to(self.proj.weight.dtype))


def context_width(inp: Modality, channels: int, spec: ContextSpec | None) -> int:
    """Input channels of an encoder once the context is joined to its input (`channels` without)."""
    if spec is None or spec.join != "input" or inp.kind == "image":
        return channels
    if inp.kind == "static":
        return channels + spec.flat_dim
    if inp.steps != spec.steps:
        raise ValueError(
            f"model.context_join: 'input' needs {inp.name!r} to have the calendar's {spec.steps} steps, it has {inp.steps}; "
            "use context_join: output"
        )
    return channels + spec.step_dim


def _series_encoder(cfg: EncoderConfig, channels: int, steps: int, out_dim: int) -> nn.Module:
    if cfg.type == "tempcnn":
        return TempCNN(channels, steps, out_dim, cfg.hidden, cfg.depth, cfg.kernel_size, cfg.dropout)
    if cfg.type == "attention":
        return TemporalAttention(channels, steps, out_dim, cfg.hidden, cfg.depth, cfg.heads, cfg.dropout)
    if cfg.type in ("gru", "lstm"):
        return Recurrent(channels, out_dim, cfg.hidden, cfg.depth, cfg.dropout, cell=cfg.type)
    if cfg.type == "mlp":
        return MLPEncoder(channels * steps, out_dim, cfg.hidden, cfg.depth, cfg.dropout)
    if cfg.type == "cnn":
        raise ValueError("encoder type 'cnn' is for image modalities [B, C, H, W]; give series a temporal type (e.g. tempcnn)")
    raise ValueError(f"unknown encoder type {cfg.type!r}")


def build_encoder(cfg: EncoderConfig, inp: Modality, out_dim: int, context: ContextSpec | None = None) -> nn.Module:
    """The encoder for one modality. A static modality always gets the MLP, whatever temporal type is
    configured: it has no time axis to convolve or attend over, and "default" usually names a temporal type.
    With a `context` that has kinds, the encoder is a `WithContext` (call it with the context tensor);
    a Presto encoder gets it as an output join."""
    if cfg.type == "presto":
        # Pretrained Presto for any kind it has tokens for: series, static (e.g. SRTM, one token) and
        # Dynamic World; bands matched by name (errors name the band), other groups masked.
        if inp.kind != "categorical" and (inp.mean is None or inp.std is None):
            raise ValueError(f"encoder 'presto' for {inp.name!r} needs the manifest's band stats (modality_inputs(..., stats=...))")
        presto = PrestoEncoder(
            inp.name, inp.kind, inp.bands, out_dim, inp.mean, inp.std,
            freeze=cfg.freeze, weights=cfg.weights, missing_value=inp.missing_value, lr_scale=cfg.lr_scale,
        )  # fmt: skip
        if context is not None and context.kinds:
            return WithContext(presto, context, out_dim, join="output")
        return presto
    if cfg.depth < 0 or (cfg.depth < 1 and cfg.type in ("attention", "gru", "lstm")):
        raise ValueError(f"encoder {cfg.type!r} for {inp.name!r}: depth {cfg.depth} is too small")
    spec = context if context is not None and context.kinds else None
    embed = None
    if inp.kind == "categorical":
        assert inp.num_classes is not None and inp.steps is not None
        embed = CategoricalEmbedding(inp.num_classes, cfg.categorical_dim, inp.missing_value)
    channels = cfg.categorical_dim if embed is not None else inp.channels
    width = context_width(inp, channels, spec)
    core: nn.Module
    if inp.kind == "static":
        core = MLPEncoder(width, out_dim, cfg.hidden, cfg.depth, cfg.dropout)
    elif inp.kind == "image":
        # Like static → MLP: an image has no time axis, so whatever temporal type "default" names, it gets the CNN.
        core = ImageCNN(inp.channels, out_dim, cfg.hidden, cfg.depth, cfg.dropout)
    else:
        assert inp.steps is not None
        core = _series_encoder(cfg, width, inp.steps, out_dim)
    if spec is not None:
        return WithContext(core, spec, out_dim, embed, join="output" if inp.kind == "image" else None)
    return CategoricalEncoder(embed, core) if embed is not None else core


__all__ = [
    "CategoricalEmbedding",
    "CategoricalEncoder",
    "ImageCNN",
    "MLPEncoder",
    "Recurrent",
    "ResidualBlock",
    "TempCNN",
    "TemporalAttention",
    "WithContext",
    "build_encoder",
    "context_width",
    "month_encoding",
    "position_encoding",
]
