"""Context inputs: what every encoder sees besides its own sensor, known wherever that sensor's model
is deployed — the calendar of each step and, optionally, the location (`model.context`).

Features per step, `[B, T, K]`: "calendar" → sin and cos of the month angle (2; December sits next
to January); "location" → the point on the unit sphere (3; no seam at ±180°, no statistics needed),
the same at every step. The archive stores months only (docs/DESIGN.md), so the calendar is the
month; a day-of-year feature would need dates in the archive format.

`model.context` unset (None) is the behaviour of runs made before the key existed: the month reaches
attention encoders only (as sinusoids of their width). That path is kept so those runs resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

CONTEXTS = ("calendar", "location")
FEATURES = {"calendar": 2, "location": 3}
JOINS = ("input", "output")


@dataclass(frozen=True)
class ContextSpec:
    """Which context a model sees and how: `kinds` ⊆ CONTEXTS (empty = none), `steps` the calendar's T."""

    kinds: tuple[str, ...]
    steps: int
    join: str = "input"

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in CONTEXTS]
        if unknown:
            raise ValueError(f"model.context: {unknown} not in {list(CONTEXTS)}")
        if self.join not in JOINS:
            raise ValueError(f"model.context_join: {self.join!r} is not one of {list(JOINS)}")
        if self.steps < 1:
            raise ValueError(f"context needs steps ≥ 1, got {self.steps}")

    @property
    def step_dim(self) -> int:
        """Features per step (K)."""
        return sum(FEATURES[k] for k in self.kinds)

    @property
    def flat_dim(self) -> int:
        """Features of the whole sample (T·K): what a static encoder or an output join sees."""
        return self.steps * self.step_dim

    def describe(self) -> str:
        return " + ".join(self.kinds) if self.kinds else "none"


def month_encoding(month: Tensor, dim: int) -> Tensor:
    """Sinusoids of the calendar angle, so December sits next to January (month 1..12 → [.., dim])."""
    angle = (month.to(torch.float32) - 1.0) * (2.0 * math.pi / 12.0)
    half = (dim + 1) // 2
    k = torch.arange(1, half + 1, device=month.device, dtype=torch.float32)
    a = angle.unsqueeze(-1) * k
    return torch.cat([a.sin(), a.cos()], dim=-1)[..., :dim]


def location_features(latlon: Tensor) -> Tensor:
    """[B, 2] latitude, longitude in degrees → [B, 3] point on the unit sphere."""
    lat, lon = torch.deg2rad(latlon.to(torch.float32)).unbind(-1)
    return torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)


def context_features(spec: ContextSpec, month: Optional[Tensor], latlon: Optional[Tensor], like: Tensor) -> Tensor:
    """The context of a batch, `[B, spec.steps, spec.step_dim]`, in `like`'s dtype and device."""
    parts = []
    if "calendar" in spec.kinds:
        if month is None:
            raise ValueError("model.context has 'calendar': the batch needs 'month' (int64 [B, T])")
        parts.append(month_encoding(month, FEATURES["calendar"]))
    if "location" in spec.kinds:
        if latlon is None:
            raise ValueError("model.context has 'location': the batch needs 'latlon' (float [B, 2], degrees)")
        parts.append(location_features(latlon).unsqueeze(1).expand(-1, spec.steps, -1))
    if not parts:
        return like.new_zeros((like.shape[0], spec.steps, 0), dtype=like.dtype if like.is_floating_point() else torch.float32)
    out = torch.cat(parts, dim=-1)
    return out.to(like.dtype) if like.is_floating_point() else out


def join_input(x: Tensor, context: Tensor) -> Tensor:
    """A series [B, T, C] gets the context as extra channels; a static layer [B, C] gets it flattened."""
    context = context.to(x.dtype)
    if x.dim() == 3:
        return torch.cat([x, context], dim=-1)
    return torch.cat([x, context.flatten(1)], dim=-1)


def context_label(kinds: Sequence[str] | None) -> str:
    """The context a run's config asks for, as result tables name it."""
    if kinds is None:
        return "month to attention only"
    return " + ".join(k for k in CONTEXTS if k in kinds) or "none"


def describe_context(spec: ContextSpec | None, has_month: bool) -> str:
    """One line for logs and result tables: which context a model used."""
    if spec is None:
        if not has_month:
            return "none (model.context unset; the archive has no months)"
        return "month to attention encoders only (model.context unset: the behaviour before the key)"
    return f"{spec.describe()} ({spec.join} join)" if spec.kinds else "none (model.context: [])"


def context_spec(
    kinds: Sequence[str] | None,
    join: str,
    modalities: Mapping[str, Mapping[str, Any]],
    has_month: bool,
    has_latlon: bool,
    where: str = "shards",
) -> ContextSpec | None:
    """The spec for `model.context` on shards with this manifest; None = the pre-context behaviour.

    Bad input is a one-line error naming the key: calendar without months, location without latlon."""
    if kinds is None:
        return None
    if "calendar" in kinds and not has_month:
        raise ValueError(f"model.context: 'calendar' needs months, and {where} have none (archive array 'month')")
    if "location" in kinds and not has_latlon:
        raise ValueError(
            f"model.context: 'location' needs latlon, and {where} have none "
            "(archive array 'latlon'; shards written before latlon was carried need `colearn-dist shard` again)"
        )
    steps = [int(m["shape"][0]) for m in modalities.values() if m["kind"] in ("series", "categorical")]
    ordered = tuple(k for k in CONTEXTS if k in kinds)
    return ContextSpec(ordered, steps[0] if steps else 1, join)


__all__ = [
    "CONTEXTS",
    "ContextSpec",
    "FEATURES",
    "context_features",
    "context_label",
    "context_spec",
    "describe_context",
    "join_input",
    "location_features",
    "month_encoding",
]
