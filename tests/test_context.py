"""Context inputs: calendar and location features, the spec a manifest allows, one-line errors."""

from __future__ import annotations

import pytest
import torch

from colearn_dist.context import ContextSpec, context_features, context_spec, describe_context, location_features

MODS = {"s1": {"kind": "series", "shape": [3, 2]}, "srtm": {"kind": "static", "shape": [2]}}


def test_calendar_is_cyclic_and_location_on_the_sphere():
    spec = ContextSpec(("calendar", "location"), 3)
    month = torch.tensor([[12, 1, 7]])
    latlon = torch.tensor([[45.0, 179.9]])
    f = context_features(spec, month, latlon, torch.zeros(1))
    assert f.shape == (1, 3, 5) and spec.step_dim == 5 and spec.flat_dim == 15
    # December is as close to January as January is to February; July is opposite
    assert torch.allclose(f[0, 0, :2], torch.tensor([-0.5, 3**0.5 / 2]), atol=1e-6)
    assert torch.allclose(f[0, 1, :2], torch.tensor([0.0, 1.0]))
    assert torch.allclose(f[0, 2, :2], torch.tensor([0.0, -1.0]), atol=1e-6)
    # the location is the same at every step, a unit vector, continuous across the date line
    assert torch.equal(f[0, 0, 2:], f[0, 2, 2:])
    assert torch.allclose(f[0, 0, 2:].norm(), torch.tensor(1.0))
    east, west = location_features(torch.tensor([[45.0, 179.9], [45.0, -179.9]]))
    assert (east - west).norm() < 0.01


def test_spec_from_the_manifest():
    assert context_spec(None, "input", MODS, True, True) is None  # unset: the old behaviour
    spec = context_spec(["location", "calendar"], "output", MODS, True, True)
    assert spec == ContextSpec(("calendar", "location"), 3, "output")
    assert context_spec([], "input", MODS, False, False) == ContextSpec((), 3)
    assert describe_context(spec, True) == "calendar + location (output join)"
    assert "no months" in describe_context(None, False)


def test_errors_name_the_key():
    with pytest.raises(ValueError, match=r"^model.context: 'calendar' needs months, and shards/x have none"):
        context_spec(["calendar"], "input", MODS, False, True, "shards/x")
    with pytest.raises(ValueError, match=r"^model.context: 'location' needs latlon, and shards/x have none"):
        context_spec(["calendar", "location"], "input", MODS, True, False, "shards/x")
    with pytest.raises(ValueError, match="'calendar': the batch needs 'month'"):
        context_features(ContextSpec(("calendar",), 3), None, None, torch.zeros(1))


def test_build_refuses_a_context_the_shards_lack(synthetic_shards):
    from colearn_dist.config import RunConfig
    from colearn_dist.runs import build

    manifest = synthetic_shards(n=64, month=False, latlon=False)
    cfg = RunConfig()
    cfg.data.shards = str(manifest.path)
    cfg.model.context = ["calendar"]
    with pytest.raises(ValueError, match="^model.context: 'calendar' needs months"):
        build(cfg, manifest)
    cfg.model.context = ["location"]
    with pytest.raises(ValueError, match="^model.context: 'location' needs latlon"):
        build(cfg, manifest)
    cfg.model.context = None  # unset: archives without months work as before
    assert build(cfg, manifest).context is None


def test_labels_in_result_tables():
    from colearn_dist.context import context_label

    assert context_label(["location", "calendar"]) == "calendar + location"
    assert context_label(["calendar"]) == "calendar" and context_label([]) == "none"
    assert context_label(None) == "month to attention only"
