"""Presto (Tseng et al. 2023): our implementation of its encoder, loading the public pretrained weights.

The weights (`bundled/presto_weights/default_model.pt`, MIT) were pretrained on 21.5M pixel time series
of S1, S2, ERA5, SRTM and Dynamic World. Presto embeds each band group of each step as one token
(SRTM: one token for the series), adds [month ; channel group ; step position] sinusoid / learned
embeddings, drops masked tokens, runs 2 pre-norm Transformer blocks and pools the kept tokens by their
mean, then a LayerNorm (the public code's eval path).

`PrestoEncoder` makes this the encoder of ONE modality: its bands are matched to Presto's groups by
name and every other group is masked, so the deployed per-sensor model needs only that sensor. It
takes the loader's z-scored input and undoes the z-scoring with the manifest's per-band mean/std
before Presto's own `(raw + shift) / div`; the two affine maps are folded into one. Missing values
(NaN, which the loader sets to 0 = the train mean) therefore reach Presto as the train mean.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS = Path(__file__).resolve().parent / "bundled" / "presto_weights" / "default_model.pt"

# Presto's band groups, in the order of its channel-group embedding (index = position; Dynamic World is 9).
GROUPS: dict[str, tuple[str, ...]] = {
    "S1": ("VV", "VH"),
    "S2_RGB": ("B2", "B3", "B4"),
    "S2_Red_Edge": ("B5", "B6", "B7"),
    "S2_NIR_10m": ("B8",),
    "S2_NIR_20m": ("B8A",),
    "S2_SWIR": ("B11", "B12"),
    "ERA5": ("temperature_2m", "total_precipitation"),
    "SRTM": ("elevation", "slope"),
    "NDVI": ("NDVI",),
}
DW_GROUP = "dynamic_world"
CHANNEL_INDEX = {**{g: i for i, g in enumerate(GROUPS)}, DW_GROUP: len(GROUPS)}
STATIC_GROUPS = ("SRTM",)  # one token for the whole series
IGNORED_BANDS = ("B9",)  # present in Presto's exports, not used by the model
DW_CLASSES = 9  # Dynamic World classes 0..8; Presto's code 9 = no observation (masked)
# Pretraining normalisation x' = (x + shift) / div, per band (Presto's units: S1 dB, S2 reflectance × 10000,
# ERA5 K and m, SRTM m and degrees, NDVI as is).
SHIFT = {"VV": 25.0, "VH": 25.0, "temperature_2m": -272.15}
DIV = {
    "VV": 25.0, "VH": 25.0,
    **{b: 1e4 for g in ("S2_RGB", "S2_Red_Edge", "S2_NIR_10m", "S2_NIR_20m", "S2_SWIR") for b in GROUPS[g]},
    "temperature_2m": 35.0, "total_precipitation": 0.03,
    "elevation": 2000.0, "slope": 50.0,
    "NDVI": 1.0,
}  # fmt: skip

DIM = 128
MONTH_DIM, CHANNEL_DIM, POSITION_DIM = 32, 32, 64
MAX_STEPS = 24
DEPTH, HEADS, MLP_HIDDEN = 2, 8, 512


class PrestoError(ValueError):
    """A modality or weights file Presto cannot use; the message names the band or file."""


# ------------------------------------------------------------------------------------ fixed tables


def month_table(dim: int = MONTH_DIM) -> Tensor:
    """[12, dim]: sin of the calendar angle in the first half, cos in the second (one frequency)."""
    angle = torch.arange(12, dtype=torch.float64) * (2 * math.pi / 12)
    half = dim // 2
    return torch.cat([angle.sin()[:, None].expand(12, half), angle.cos()[:, None].expand(12, half)], dim=1).float()


def position_table(steps: int = MAX_STEPS, dim: int = POSITION_DIM) -> Tensor:
    """[steps, dim]: sinusoids of the step index with base 1000, sin on even and cos on odd features."""
    pos = torch.arange(steps, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(1000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    return torch.where(j.long() % 2 == 0, angle.sin(), angle.cos()).float()


# ------------------------------------------------------------------------------------ Transformer


class Attention(nn.Module):
    def __init__(self, dim: int = DIM, heads: int = HEADS):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        b, n = x.shape[0], x.shape[1]
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(y.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int = DIM, hidden: int = MLP_HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block (attention with qkv bias, GELU MLP), as in the weights."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim)

    def forward(self, x: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        x = x + self.attn(self.norm1(x), bias)
        return x + self.mlp(self.norm2(x))


class PrestoBackbone(nn.Module):
    """Presto's encoder, with only the token embeddings of `groups` (and Dynamic World / location when
    asked): a sensor's model holds no parameters it never uses. State-dict keys are the public file's
    `encoder.*` keys without the prefix; the fixed month / position tables are rebuilt, not stored."""

    month_table: Tensor
    position_table: Tensor

    def __init__(self, groups: Sequence[str] = tuple(GROUPS), dynamic_world: bool = True, location: bool = True):
        super().__init__()
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise PrestoError(f"unknown Presto band group(s) {unknown}; known: {list(GROUPS)}")
        self.eo_patch_embed = nn.ModuleDict({g: nn.Linear(len(GROUPS[g]), DIM) for g in groups})
        self.dw_embed = nn.Embedding(DW_CLASSES + 1, DIM) if dynamic_world else None
        self.latlon_embed = nn.Linear(3, DIM) if location else None
        self.channel_embed = nn.Embedding(len(CHANNEL_INDEX), CHANNEL_DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.norm = nn.LayerNorm(DIM)
        self.register_buffer("month_table", month_table(), persistent=False)
        self.register_buffer("position_table", position_table(), persistent=False)

    def context(self, group: str, steps: int, month: Optional[Tensor], batch: int) -> Tensor:
        """[B, T, 128] (or [B, 1, 128] for a static group) added to a group's tokens."""
        channel = self.channel_embed.weight[CHANNEL_INDEX[group]]
        if group in STATIC_GROUPS or steps == 0:
            return torch.cat([channel.new_zeros(MONTH_DIM), channel, channel.new_zeros(POSITION_DIM)]).expand(batch, 1, DIM)
        if month is None:  # no calendar: the month part stays zero, as for a static token
            months = channel.new_zeros(batch, steps, MONTH_DIM)
        else:
            months = self.month_table[(month.long() - 1).clamp(0, 11)]  # calendar 1..12 → Presto's 0..11
        return torch.cat(
            [months, channel.expand(batch, steps, CHANNEL_DIM), self.position_table[:steps].expand(batch, steps, POSITION_DIM)],
            dim=-1,
        )

    def group_tokens(self, group: str, x: Tensor, month: Optional[Tensor]) -> Tensor:
        """Normalised values of one group, [B, T, n] (or [B, n] static) → tokens [B, T, 128] (or [B, 1, 128])."""
        if x.dim() == 2 or group in STATIC_GROUPS:
            x = x if x.dim() == 2 else x[:, 0]
            return self.eo_patch_embed[group](x).unsqueeze(1) + self.context(group, 0, None, x.shape[0])
        return self.eo_patch_embed[group](x) + self.context(group, x.shape[1], month, x.shape[0])

    def dw_tokens(self, codes: Tensor, month: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Dynamic World codes [B, T] (9 = missing) → tokens [B, T, 128] and keep mask [B, T]."""
        assert self.dw_embed is not None, "built without Dynamic World"
        codes = codes.long()
        keep = (codes >= 0) & (codes < DW_CLASSES)
        tokens = self.dw_embed(torch.where(keep, codes, torch.full_like(codes, DW_CLASSES)))
        return tokens + self.context(DW_GROUP, codes.shape[1], month, codes.shape[0]), keep

    def location_token(self, latlon: Optional[Tensor], like: Tensor) -> Tensor:
        """[B, 2] degrees → [B, 1, 128] from the cartesian (x, y, z) of the location. Presto's sequence
        always holds this token; without a location it is that of lat/lon (0, 0), which reproduces
        Presto's published no-location probe figures (benchmarks/bench_presto_probe.py)."""
        assert self.latlon_embed is not None, "built without location"
        if latlon is None:
            latlon = like.new_zeros(like.shape[0], 2, dtype=self.latlon_embed.weight.dtype)
        lat, lon = (latlon.to(self.latlon_embed.weight.dtype) * (math.pi / 180)).unbind(-1)
        xyz = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)
        return self.latlon_embed(xyz).unsqueeze(1)

    def encode(self, tokens: Tensor, keep: Optional[Tensor] = None) -> Tensor:
        """Tokens [B, N, 128] (keep [B, N] bool: False = masked) → pooled embedding [B, 128].

        A masked token is neither attended to nor pooled, which is exactly Presto's removing it; a
        sample with no kept token gets the final LayerNorm of zeros (its bias)."""
        bias = None
        if keep is not None:
            # finite, not -inf: a row with every key masked stays finite (and is pooled to zero below)
            bias = torch.zeros(keep.shape, dtype=tokens.dtype, device=tokens.device).masked_fill(~keep, -1e9)
            bias = bias[:, None, None, :]
        x = tokens
        for block in self.blocks:
            x = block(x, bias)
        if keep is None:
            return self.norm(x.mean(dim=1))
        w = keep.to(x.dtype).unsqueeze(-1)
        return self.norm((x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1.0))


# ------------------------------------------------------------------------------------ weights


@functools.lru_cache(maxsize=4)
def _read_weights(path: str, mtime: float) -> dict[str, Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle / zip / runtime errors for bad files
        raise PrestoError(f"{path}: not a Presto state dict readable with weights_only=True ({str(exc).splitlines()[0]})") from exc
    if not isinstance(state, Mapping) or not any(str(k).startswith("encoder.") for k in state):
        raise PrestoError(f"{path}: no 'encoder.*' keys; expected the public Presto state dict (default_model.pt)")
    return {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}


def encoder_state(path: str | Path | None = None) -> dict[str, Tensor]:
    """The `encoder.*` tensors of a Presto weights file (prefix removed; decoder keys ignored)."""
    file = Path(path) if path else WEIGHTS
    if not file.is_file():
        raise PrestoError(f"{file}: Presto weights file not found (the bundled default is {WEIGHTS})")
    return _read_weights(str(file), file.stat().st_mtime)


def load_weights(backbone: PrestoBackbone, path: str | Path | None = None) -> list[str]:
    """Load the weights into `backbone`, strictly: every parameter of the backbone comes from the file.
    The file's fixed tables (month_embed, pos_embed) must equal ours. Returns the file keys left unused
    (the token embeddings of groups the backbone was built without)."""
    state = dict(encoder_state(path))
    where = Path(path) if path else WEIGHTS
    for key, ours in (("month_embed.weight", backbone.month_table), ("pos_embed", backbone.position_table)):
        theirs = state.pop(key, None)
        if theirs is None or not torch.allclose(theirs.reshape(ours.shape).float(), ours, atol=1e-5):
            raise PrestoError(f"{where}: key 'encoder.{key}' is not Presto's fixed sinusoid table; not a Presto weights file")
    wanted = set(backbone.state_dict())
    missing = sorted(wanted - set(state))
    if missing:
        raise PrestoError(f"{where}: key(s) {['encoder.' + k for k in missing]} missing; not a Presto weights file")
    try:
        backbone.load_state_dict({k: state[k] for k in wanted}, strict=True)
    except RuntimeError as exc:
        raise PrestoError(f"{where}: {str(exc).splitlines()[-1].strip()}") from exc
    return sorted(set(state) - wanted)


# ------------------------------------------------------------------------------------ one modality


def band_plan(name: str, kind: str, bands: Sequence[str]) -> dict[str, list[int]]:
    """Presto group → column indices of the modality's bands, matched by name.

    Every band must belong to a Presto group (B9 is accepted and ignored, as Presto does), and a group
    is used only complete. NDVI is computed from B8 and B4 when the sensor has them and no NDVI band.
    A categorical modality must be Dynamic World (its one band named `dynamic_world`)."""
    bands = list(bands)
    if kind == "categorical":
        if bands != [DW_GROUP]:
            raise PrestoError(
                f"modality {name!r}: categorical band {bands[0] if bands else None!r} does not map onto Presto "
                f"(only Dynamic World, band {DW_GROUP!r}, has a Presto embedding)"
            )
        return {DW_GROUP: [0]}
    if kind not in ("series", "static"):
        raise PrestoError(f"modality {name!r}: Presto encodes series, static and categorical modalities, not {kind!r}")
    if not bands:
        raise PrestoError(f"modality {name!r}: the manifest names no bands; Presto matches bands by name")
    group_of = {b: g for g, members in GROUPS.items() for b in members}
    for band in bands:
        if band not in group_of and band not in IGNORED_BANDS:
            raise PrestoError(
                f"modality {name!r}: band {band!r} does not map onto a Presto band group "
                f"(known bands: {sorted(group_of)}; ignored: {list(IGNORED_BANDS)})"
            )
    plan: dict[str, list[int]] = {}
    for group, members in GROUPS.items():
        have = [b for b in members if b in bands]
        if have and len(have) < len(members):
            lacking = [b for b in members if b not in bands]
            raise PrestoError(
                f"modality {name!r}: band {have[0]!r} belongs to Presto group {group} {list(members)}, which also needs {lacking}"
            )
        if have:
            plan[group] = [bands.index(b) for b in members]
    if not plan:
        raise PrestoError(f"modality {name!r}: bands {bands} fill no Presto band group")
    return plan


class PrestoEncoder(nn.Module):
    """One modality through pretrained Presto, the other band groups masked: `forward(x, month)` →
    [B, out_dim] (a Linear on Presto's pooled 128-d embedding, trained even when `freeze`).

    `mean` / `std` are the manifest's per-band statistics the loader z-scored with (None for a
    categorical modality); `freeze` keeps the pretrained weights fixed (no gradient); `lr_scale`
    multiplies the backbone's learning rate (`param_groups`)."""

    scale: Tensor
    offset: Tensor
    raw_scale: Tensor
    raw_offset: Tensor

    def __init__(
        self,
        name: str,
        kind: str,
        bands: Sequence[str],
        out_dim: int,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        *,
        freeze: bool = False,
        weights: str | Path | None = None,
        missing_value: Optional[int] = None,
        lr_scale: float = 1.0,
    ):
        super().__init__()
        self.name, self.kind = name, kind
        self.lr_scale = lr_scale  # of the backbone's learning rate; read by param_groups
        self.plan = band_plan(name, kind, bands)
        self.categorical = kind == "categorical"
        self.missing_value = -1 if missing_value is None else int(missing_value)
        self.compute_ndvi = "NDVI" not in self.plan and "B8" in bands and "B4" in bands
        groups = [g for g in self.plan if g != DW_GROUP] + (["NDVI"] if self.compute_ndvi else [])
        self.backbone = PrestoBackbone(groups, dynamic_world=self.categorical, location=True)
        load_weights(self.backbone, weights)
        if not self.categorical:
            if mean is None or std is None or len(mean) != len(bands) or len(std) != len(bands):
                raise PrestoError(f"modality {name!r}: Presto needs the manifest's per-band mean and std of its {len(bands)} bands")
            mean_t, std_t = torch.tensor(list(mean), dtype=torch.float32), torch.tensor(list(std), dtype=torch.float32)
            shift = torch.tensor([SHIFT.get(b, 0.0) for b in bands])
            div = torch.tensor([DIV.get(b, 1.0) for b in bands])
            # z-scored x → Presto's input: ((x * std + mean) + shift) / div
            self.register_buffer("scale", std_t / div)
            self.register_buffer("offset", (mean_t + shift) / div)
            self.register_buffer("raw_scale", std_t)
            self.register_buffer("raw_offset", mean_t)
            self.index = {g: idx for g, idx in self.plan.items()}
            self.ndvi_bands = (list(bands).index("B8"), list(bands).index("B4")) if self.compute_ndvi else None
        self.freeze = freeze
        if freeze:
            self.backbone.requires_grad_(False)
        self.out = nn.Linear(DIM, out_dim)

    def embed(self, x: Tensor, month: Optional[Tensor] = None, latlon: Optional[Tensor] = None) -> Tensor:
        """Presto's pooled 128-d embedding of the loader's input x (the frozen-probe features)."""
        location = self.backbone.location_token(latlon, x)
        if self.categorical:
            codes = x.long()
            codes = torch.where(codes == self.missing_value, torch.full_like(codes, DW_CLASSES), codes)
            tokens, keep = self.backbone.dw_tokens(codes, month)
            keep = torch.cat([torch.ones_like(keep[:, :1]), keep], dim=1)
            return self.backbone.encode(torch.cat([location, tokens], dim=1), keep)
        v = x * self.scale + self.offset
        parts = [self.backbone.group_tokens(g, v[..., idx], month) for g, idx in self.index.items()]
        if self.ndvi_bands is not None:
            raw = x * self.raw_scale + self.raw_offset
            nir, red = raw[..., self.ndvi_bands[0]], raw[..., self.ndvi_bands[1]]
            total = nir + red
            ndvi = torch.where(total > 0, (nir - red) / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(total))
            parts.append(self.backbone.group_tokens("NDVI", ndvi.unsqueeze(-1), month))
        return self.backbone.encode(torch.cat([location] + parts, dim=1))

    def forward(self, x: Tensor, month: Optional[Tensor] = None) -> Tensor:
        if self.freeze:
            with torch.no_grad():  # no graph through the fixed backbone: a third of the cost
                z = self.embed(x, month)
            return self.out(z)
        return self.out(self.embed(x, month))


__all__ = [
    "CHANNEL_INDEX",
    "DIV",
    "GROUPS",
    "PrestoBackbone",
    "PrestoEncoder",
    "PrestoError",
    "SHIFT",
    "WEIGHTS",
    "band_plan",
    "encoder_state",
    "load_weights",
    "month_table",
    "position_table",
]
