"""Presto backbone: strict weight loading, band mapping, masking, normalisation, freezing, training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from colearn_dist.config import ConfigError, EncoderConfig, load_config
from colearn_dist.encoders import build_encoder
from colearn_dist.manifest import Modality
from colearn_dist.presto import (
    GROUPS,
    WEIGHTS,
    PrestoBackbone,
    PrestoEncoder,
    PrestoError,
    encoder_state,
    load_weights,
    month_table,
    position_table,
)

S2_BANDS = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12", "NDVI"]


def raw_encoder(name: str, bands: list[str], kind: str = "series", **kw) -> PrestoEncoder:
    """An encoder fed raw values (mean 0, std 1: the de-normalisation is the identity)."""
    n = len(bands)
    stats = (None, None) if kind == "categorical" else ([0.0] * n, [1.0] * n)
    return PrestoEncoder(name, kind, bands, 4, *stats, **kw).eval()


def test_bundled_weights_load_strictly_every_encoder_key_used():
    state = encoder_state()
    backbone = PrestoBackbone()
    assert load_weights(backbone) == []  # no encoder key of the file left unused
    ours = backbone.state_dict()
    # every learned tensor is the file's; the two fixed tables are rebuilt and equal the file's
    assert set(ours) | {"month_embed.weight", "pos_embed"} == set(state)
    for key, value in ours.items():
        assert torch.equal(value, state[key]), key
    assert torch.allclose(month_table(), state["month_embed.weight"], atol=1e-6)
    assert torch.allclose(position_table(), state["pos_embed"][0], atol=1e-6)
    assert sum(p.numel() for p in backbone.parameters()) == 404160 - 12 * 32 - 24 * 64


def test_a_sensor_encoder_holds_only_its_groups():
    enc = raw_encoder("s1", ["VV", "VH"])
    assert set(enc.backbone.eo_patch_embed) == {"S1"} and enc.backbone.dw_embed is None
    assert torch.equal(enc.backbone.eo_patch_embed["S1"].weight, encoder_state()["eo_patch_embed.S1.weight"])


def test_weights_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(PrestoError, match=f"{missing}: Presto weights file not found"):
        raw_encoder("s1", ["VV", "VH"], weights=missing)
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    del state["encoder.blocks.1.mlp.fc2.bias"]
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    with pytest.raises(PrestoError, match=r"broken.pt: key\(s\) \['encoder.blocks.1.mlp.fc2.bias'\] missing"):
        raw_encoder("s1", ["VV", "VH"], weights=broken)
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a state dict")
    with pytest.raises(PrestoError, match="garbage.pt: not a Presto state dict"):
        raw_encoder("s1", ["VV", "VH"], weights=garbage)


@pytest.mark.parametrize(
    "kind, bands, named",
    [
        ("series", ["VV", "VH", "HH"], "band 'HH' does not map onto a Presto band group"),
        ("series", ["B2", "B4", "B8", "NDVI"], "band 'B2' belongs to Presto group S2_RGB .* also needs \\['B3'\\]"),
        ("categorical", ["landcover"], "categorical band 'landcover' does not map onto Presto"),
        ("series", ["B9"], "bands \\['B9'\\] fill no Presto band group"),
    ],
)
def test_a_band_that_does_not_map_raises_the_named_error(kind, bands, named):
    with pytest.raises(PrestoError, match=f"modality 'x': {named}"):
        raw_encoder("x", bands, kind)


def test_masking_the_other_groups_changes_nothing_for_the_kept_group():
    """S1 through the full backbone with S2 and ERA5 tokens present but masked = the S1-only encoder:
    masked tokens are neither attended to nor pooled, whatever their values."""
    torch.manual_seed(0)
    b, t = 5, 3
    month = torch.randint(1, 13, (b, t))
    s1 = torch.randn(b, t, 2) * 4 - 12
    enc = raw_encoder("s1", ["VV", "VH"])
    full = PrestoBackbone()
    load_weights(full)

    def masked_full(other_scale: float) -> torch.Tensor:
        v = (s1 + 25.0) / 25.0
        tokens = [full.location_token(None, s1), full.group_tokens("S1", v, month)]
        for group in ("S2_RGB", "ERA5"):
            tokens.append(full.group_tokens(group, other_scale * torch.randn(b, t, len(GROUPS[group])), month))
        keep = torch.zeros(b, 1 + 3 * t, dtype=torch.bool)
        keep[:, : 1 + t] = True
        return full.encode(torch.cat(tokens, dim=1), keep)

    with torch.no_grad():
        alone = enc.embed(s1, month)
        assert torch.allclose(masked_full(1.0), alone, atol=1e-5)
        assert torch.allclose(masked_full(100.0), alone, atol=1e-5)
        # and the mask is what does it: unmasked, the other tokens change the embedding
        v = (s1 + 25.0) / 25.0
        tokens = [full.location_token(None, s1), full.group_tokens("S1", v, month), full.group_tokens("ERA5", torch.randn(b, t, 2), month)]
        assert not torch.allclose(full.encode(torch.cat(tokens, dim=1)), alone, atol=1e-3)


def test_z_scored_input_is_denormalised_before_presto_normalisation():
    torch.manual_seed(1)
    raw = torch.rand(4, 3, len(S2_BANDS)) * 3000 + 100
    raw[..., -1] = (raw[..., 6] - raw[..., 2]) / (raw[..., 6] + raw[..., 2])
    month = torch.randint(1, 13, (4, 3))
    mean = raw.mean(dim=(0, 1))
    std = raw.std(dim=(0, 1))
    z = (raw - mean) / std
    a = raw_encoder("s2", S2_BANDS)
    b = PrestoEncoder("s2", "series", S2_BANDS, 4, mean.tolist(), std.tolist()).eval()
    with torch.no_grad():
        assert torch.allclose(a.embed(raw, month), b.embed(z, month), atol=1e-4)
        # Presto's own scaling matters: feeding z-scores as if raw gives another embedding
        assert not torch.allclose(a.embed(z, month), b.embed(z, month), atol=1e-2)


def test_ndvi_computed_from_b8_b4_when_the_sensor_has_no_ndvi_band():
    bands = [b for b in S2_BANDS if b != "NDVI"]
    raw = torch.rand(3, 2, len(S2_BANDS)) * 3000 + 100
    raw[..., -1] = (raw[..., 6] - raw[..., 2]) / (raw[..., 6] + raw[..., 2])
    month = torch.tensor([[1, 2], [6, 7], [11, 12]])
    with torch.no_grad():
        given = raw_encoder("s2", S2_BANDS).embed(raw, month)
        computed = raw_encoder("s2", bands).embed(raw[..., :-1], month)
    assert torch.allclose(given, computed, atol=1e-5)


def test_dynamic_world_missing_steps_are_masked_and_month_matters():
    enc = raw_encoder("dw", ["dynamic_world"], "categorical", missing_value=4)
    codes = torch.tensor([[0, 1, 4], [0, 1, 2]])
    month = torch.tensor([[3, 4, 5], [3, 4, 5]])
    with torch.no_grad():
        two_steps = enc.embed(codes[:1, :2], month[:1, :2])
        with_missing = enc.embed(codes[:1], month[:1])
        assert torch.allclose(two_steps, with_missing, atol=1e-5)  # the missing step is as if absent
        assert not torch.allclose(enc.embed(codes, month)[1], with_missing[0], atol=1e-3)
        assert not torch.allclose(enc.embed(codes, month), enc.embed(codes, month % 12 + 1), atol=1e-3)


def test_srtm_is_one_static_token():
    enc = raw_encoder("srtm", ["elevation", "slope"], "static")
    x = torch.tensor([[500.0, 10.0], [1500.0, 30.0]])
    with torch.no_grad():
        out = enc.embed(x)
    assert out.shape == (2, 128) and not torch.allclose(out[0], out[1])


def test_frozen_really_freezes_and_fine_tuned_trains():
    inp = Modality("s1", "series", 3, 2, bands=("VV", "VH"), mean=(-12.0, -18.0), std=(4.0, 4.0))
    x, month = torch.randn(6, 3, 2), torch.randint(1, 13, (6, 3))
    frozen = build_encoder(EncoderConfig(type="presto", freeze=True), inp, 8)
    tuned = build_encoder(EncoderConfig(type="presto"), inp, 8)
    frozen(x, month).square().sum().backward()
    tuned(x, month).square().sum().backward()
    assert all(not p.requires_grad and p.grad is None for p in frozen.backbone.parameters())
    assert frozen.out.weight.grad is not None and frozen.out.weight.grad.abs().sum() > 0
    grads = [p.grad for p in tuned.backbone.blocks.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_config_keys(tmp_path):
    base = {"data": {"modalities": ["s1", "s2"]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**base, "model": {"encoders": {"default": {"type": "tempcnn", "freeze": True}}}}))
    with pytest.raises(ConfigError, match="model.encoders.default.freeze applies to type 'presto' only"):
        load_config(path)
    path.write_text(yaml.safe_dump({**base, "model": {"encoders": {"shared/s1": {"type": "presto"}}}}))
    with pytest.raises(ConfigError, match="model.encoders.shared/s1: a key with '/' is <role>/<modality>"):
        load_config(path)
    encoders = {"default": {"type": "tempcnn"}, "common": {"type": "presto"}, "srtm": {"type": "mlp"}, "unique/s1": {"type": "gru"}}
    path.write_text(yaml.safe_dump({**base, "model": {"encoders": encoders}}))
    cfg = load_config(path).model
    assert cfg.encoder_for("s1", "unique").type == "gru" and cfg.encoder_for("s1", "common").type == "presto"
    assert cfg.encoder_for("s2", "unique").type == "tempcnn" and cfg.encoder_for("srtm", "common").type == "mlp"
    assert cfg.encoder_for("s1").type == "tempcnn"  # the baselines' encoder ignores role keys
    # the new keys at their defaults leave old configs' hashes alone; set, they count
    path.write_text(yaml.safe_dump(base))
    old = load_config(path).hash()
    path.write_text(yaml.safe_dump({**base, "model": {"encoders": {"default": {"type": "tempcnn", "freeze": False, "weights": None}}}}))
    assert load_config(path).hash() == old
    path.write_text(yaml.safe_dump({**base, "model": {"encoders": {"default": {"type": "presto", "freeze": True}}}}))
    assert load_config(path, ["model.encoders.default.freeze=false"]).hash() != load_config(path).hash()
    path.write_text(yaml.safe_dump({**base, "model": {"encoders": {"default": {"type": "presto"}}}}))
    presto = load_config(path).hash()
    assert load_config(path, ["model.encoders.default.lr_scale=1.0"]).hash() == presto
    assert load_config(path, ["model.encoders.default.lr_scale=0.1"]).hash() != presto


@pytest.mark.parametrize(
    "encoder, message",
    [
        ({"type": "tempcnn", "lr_scale": 0.1}, "model.encoders.default.lr_scale applies to type 'presto' only"),
        ({"type": "presto", "lr_scale": 0.0}, "model.encoders.default.lr_scale must be a finite number > 0, got 0.0"),
        ({"type": "presto", "lr_scale": -1}, "lr_scale must be a finite number > 0, got -1"),
        ({"type": "presto", "freeze": True, "lr_scale": 0.1}, "lr_scale 0.1 has no effect with freeze: true"),
    ],
)
def test_lr_scale_errors_name_the_key(tmp_path, encoder, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"modalities": ["s1", "s2"]}, "model": {"encoders": {"default": encoder}}}))
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_param_groups_scale_only_the_pretrained_backbone():
    """The backbone of a Presto encoder with lr_scale trains at lr × lr_scale; its new output Linear,
    the other encoders and a frozen backbone are not in that group; each parameter is in one group."""
    from colearn_dist.model import param_groups

    inp = Modality("s1", "series", 3, 2, bands=("VV", "VH"), mean=(-12.0, -18.0), std=(4.0, 4.0))
    tuned = build_encoder(EncoderConfig(type="presto", lr_scale=0.1), inp, 8)
    plain = build_encoder(EncoderConfig(type="presto"), inp, 8)
    frozen = build_encoder(EncoderConfig(type="presto", freeze=True), inp, 8)
    model = torch.nn.ModuleDict({"tuned": tuned, "plain": plain, "frozen": frozen})
    groups = param_groups(model, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, pytest.approx(1e-4)]
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert ids[1] == {id(p) for p in tuned.backbone.parameters()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert ids[0] | ids[1] == trainable and not ids[0] & ids[1]
    assert id(tuned.out.weight) in ids[0] and id(plain.backbone.blocks[0].attn.qkv.weight) in ids[0]
    assert len(param_groups(torch.nn.ModuleDict({"plain": plain}), 1e-3)) == 1  # old optimizer states load


PRESTO_MODALITIES = {
    "s1": ("series", ("VV", "VH"), {"units": ("dB", "dB"), "time_step": "month"}),
    "srtm": ("static", ("elevation", "slope"), {"units": ("m", "degrees")}),
    "dw": ("categorical", ("dynamic_world",), {"num_classes": 10, "missing_value": 9, "time_step": "month"}),
}


@pytest.mark.parametrize("method", ["mdico", "presto"])
def test_presto_encoders_train_end_to_end(synthetic_shards, tmp_path, method):
    """A tiny run: MDiCo with a fine-tuned Presto unique encoder and a frozen Presto common encoder;
    the `presto` baseline (configured encoders are TempCNNs: it uses a fine-tuned Presto all the same).
    The fine-tuned backbones move, the frozen one stays the file's."""
    from colearn_dist.engine import train

    modalities = {m: PRESTO_MODALITIES[m] for m in ("s1", "dw")}
    manifest = synthetic_shards(n=64, t=3, groups=8, with_val=True, modalities=modalities, samples_per_shard=32)
    model = {
        "method": method,
        "embedding_dim": 16,
        "modality": "s1" if method == "presto" else None,
        "encoders": {"default": {"type": "presto"}, "common": {"type": "presto", "freeze": True}}
        if method == "mdico"
        else {"default": {"type": "tempcnn", "hidden": 8}},
    }
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"shards": str(manifest.path), "batch_size": 16, "workers": 0, "shuffle_buffer": 32},
        "model": model,
        "train": {"epochs": 1, "patience": 0, "threads": 1, "lr": 1e-3, "log_every_steps": 100},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_config(path))
    assert result["status"] == "finished"
    records = json.loads(Path(tmp_path / "run" / "metrics_test.json").read_text())
    assert all(r["metrics"]["rmse"] == r["metrics"]["rmse"] for r in records)  # finite, not NaN
    best = tmp_path / "run" / "best" / ("s1.pt" if method == "presto" else "all.pt")
    state = torch.load(best, map_location="cpu", weights_only=False)
    weights = state.get("model", state)
    original = encoder_state()["blocks.0.attn.qkv.weight"]
    qkv = {k: v for k, v in weights.items() if k.endswith("backbone.blocks.0.attn.qkv.weight")}
    assert qkv, sorted(weights)[:10]
    moved = {k: not torch.equal(v, original) for k, v in qkv.items()}
    for key, changed in moved.items():
        assert changed == (".common." not in key), key
    if method == "presto":
        # the deployed file (raw input + month) agrees with the trained model, any batch size (ONNX too,
        # checked by hand: its exporter alone takes longer than this whole file's tests)
        import numpy as np

        from colearn_dist.export import SensorModel, export_sensor, load_exported
        from colearn_dist.runs import load_trained

        eager = SensorModel(load_trained(tmp_path / "run", "s1"), "s1").eval()
        x, month = torch.randn(7, 3, 2) * 3 - 10, torch.randint(1, 13, (7, 3))
        with torch.no_grad():
            want = eager(x, month).numpy()
        for fmt in ("pt2",):
            exported = load_exported(export_sensor(tmp_path / "run", "s1", fmt=fmt))
            got = exported.run(x.numpy(), month.numpy().astype(np.int64))
            assert np.allclose(got, want, atol=1e-4), fmt


def test_engine_trains_the_backbone_at_the_scaled_rate(synthetic_shards, tmp_path):
    """The engine's optimizer honours lr_scale: at lr 1e-2 × 1e-4 the backbone moves by at most one
    scaled Adam step (≈ 1e-6) per optimizer step; unscaled, each step would move it by ≈ 1e-2."""
    from colearn_dist.engine import train

    manifest = synthetic_shards(n=64, t=3, groups=8, with_val=True, modalities={"s1": PRESTO_MODALITIES["s1"]}, samples_per_shard=32)
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"shards": str(manifest.path), "batch_size": 16, "workers": 0, "shuffle_buffer": 32},
        "model": {"method": "presto", "modality": "s1", "embedding_dim": 16, "encoders": {"default": {"type": "presto", "lr_scale": 1e-4}}},
        "train": {"epochs": 1, "patience": 0, "threads": 1, "lr": 1e-2, "log_every_steps": 100, "evaluate_test": False},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert train(load_config(path))["status"] == "finished"
    state = torch.load(tmp_path / "run" / "best" / "s1.pt", map_location="cpu", weights_only=False)
    weights = state.get("model", state)
    steps = manifest.splits["train"]["num_samples"] // 16 + 1
    moved = {
        k: (v - encoder_state()[k.split("backbone.", 1)[1]]).abs().max().item()
        for k, v in weights.items()
        if "backbone.blocks.0." in k and k.endswith("weight") and v.dim() == 2
    }
    assert moved and max(moved.values()) <= steps * 1e-6 * 1.01 and max(moved.values()) > 0, moved
