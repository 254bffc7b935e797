"""Models: MDiCo outputs, gradients and any-subset prediction; fusion masking and sensor dropout; the fused
path against the plain one; build_model dispatch; tracing a per-sensor predictor."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from colearn_dist.config import EncoderConfig, ModelConfig
from colearn_dist.encoders import CategoricalEncoder, MLPEncoder, TempCNN, TemporalAttention
from colearn_dist.manifest import Modality
from colearn_dist.methods import build_model
from colearn_dist.model import OUTPUT_KEYS, FusionModel, MDiCo

from helpers import OneSensor

torch.set_num_threads(1)

B, T, OUT = 6, 3, 2
INPUTS = {
    "s1": Modality("s1", "series", T, 2),
    "s2": Modality("s2", "series", T, 5),
    "srtm": Modality("srtm", "static", None, 2),
    "dw": Modality("dw", "categorical", T, 1, num_classes=10, missing_value=9),
}


def config(method="mdico", dropout=0.0, **kw) -> ModelConfig:
    enc = EncoderConfig("tempcnn", hidden=8, depth=2, dropout=dropout, heads=2, categorical_dim=3)
    return ModelConfig(method=method, embedding_dim=16, encoders=kw.pop("encoders", {"default": enc}), **kw)


def batch(n: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "s1": torch.randn(n, T, 2, generator=g),
        "s2": torch.randn(n, T, 5, generator=g),
        "srtm": torch.randn(n, 2, generator=g),
        "dw": torch.randint(0, 10, (n, T), generator=g),
    }


def mdico(**kw) -> MDiCo:
    torch.manual_seed(0)
    second = kw.pop("second_classifier_on", "unused")
    return MDiCo(INPUTS, config(**kw), OUT, second_classifier_on=second)


# ------------------------------------------------------------------------------------------ MDiCo


def test_mdico_outputs_and_shapes():
    model = mdico()
    out = model(batch())
    assert set(out) == set(OUTPUT_KEYS)
    for key in OUTPUT_KEYS:
        assert list(out[key]) == list(INPUTS)
        for m, t in out[key].items():
            width = {"pred": OUT, "aux_spe": OUT, "aux_sha": OUT, "mod_spe": 4, "mod_second": 4}.get(key, 8)
            assert t.shape == (B, width), (key, m)
    assert model.modalities == list(INPUTS)


def test_mdico_computes_only_present_modalities():
    model = mdico()
    x = batch()
    out = model({"s2": x["s2"], "dw": x["dw"], "unrelated": torch.zeros(1)})
    assert all(list(out[k]) == ["s2", "dw"] for k in OUTPUT_KEYS)
    with pytest.raises(KeyError):
        model({"other": x["s1"]})


def test_unique_and_common_encoders_are_separate_and_depth_is_honoured():
    model = mdico()
    for m in INPUTS:
        u, c = model.encoder("unique", m), model.encoder("common", m)
        assert u is not c
        core = u.encoder if isinstance(u, CategoricalEncoder) else u
        if INPUTS[m].kind == "static":
            assert isinstance(core, MLPEncoder)
        else:
            assert isinstance(core, TempCNN) and len(core.blocks) == 2
    # a standalone copy computes what the model computes
    model.eval()
    x = batch()
    z = model._encode(x, list(INPUTS), None)
    for role in ("unique", "common"):
        for m in INPUTS:
            assert torch.allclose(model.encoder(role, m).eval()(x[m]), z[(role, m)], atol=1e-5)


def _unique_grads(model: MDiCo, m: str) -> list[torch.Tensor]:
    """The gradient of modality m's unique encoder (its slot, when it lives in a bank)."""
    if m in model.encoders["unique"]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.encoders["unique"][m].parameters()]
    bank, g = model.slots[("unique", m)]
    return [p.grad[g] if p.grad is not None else torch.zeros_like(p[g]) for p in model.banks[bank].parameters()]


@pytest.mark.parametrize("fused", [True, False])
def test_modality_classifier_on_unused_trains_z_unu(fused):
    """A loss on mod_second must reach the unique encoders through z_unu ("unused", the paper)
    and must not in "shared" mode (the reference code's choice: z_sha)."""
    for mode, expect in (("unused", True), ("shared", False)):
        model = mdico(second_classifier_on=mode)
        model.fused = fused
        out = model(batch())
        loss = sum(F.cross_entropy(logits, torch.full((B,), i)) for i, logits in enumerate(out["mod_second"].values()))
        loss.backward()
        for m in INPUTS:
            reached = any(g.abs().sum() > 0 for g in _unique_grads(model, m))
            assert reached == expect, (mode, m)
        assert model.mod_second.weight.grad.abs().sum() > 0
    # z_unu really is the unused half of the unique encoder's output
    model.eval()
    out = model(batch())
    z = model._encode(batch(), list(INPUTS), None)
    assert torch.allclose(out["z_unu"]["s1"], z[("unique", "s1")][:, 8:])
    assert torch.allclose(out["z_spe"]["s1"], z[("unique", "s1")][:, :8])


def test_mdico_predict_averages_heads_over_any_subset():
    model = mdico().eval()
    x = batch()
    pred = model(x)["pred"]
    for subset in (["s1"], ["dw"], ["s2", "srtm"], list(INPUTS)):
        expect = torch.stack([pred[m] for m in subset]).mean(0)
        assert torch.allclose(model.predict(x, modalities=subset), expect, atol=1e-5), subset
    assert torch.allclose(model.predict(x), torch.stack(list(pred.values())).mean(0), atol=1e-5)
    # one sensor needs only its own input
    assert torch.allclose(model.predict({"s2": x["s2"]}), pred["s2"], atol=1e-5)
    with pytest.raises(KeyError, match="s1"):
        model.predict({"s2": x["s2"]}, modalities=["s1"])
    with pytest.raises(KeyError, match="nope"):
        model.predict(x, modalities=["nope"])


@pytest.mark.parametrize("mode", ["detached", "trained"])
def test_joint_head_predicts_all_sensors_only(mode):
    """model.joint_head: every sensor present → one head on all [z_spe ; z_sha]; any subset → the
    mean of the heads as before. "detached" keeps its loss out of the encoders, "trained" does not."""
    model = mdico(joint_head=mode).eval()
    x = batch()
    out = model(x)
    spe, sha = out["z_spe"], out["z_sha"]
    expect = model.joint_head(torch.cat([t for m in INPUTS for t in (spe[m], sha[m])], dim=1))
    assert torch.allclose(out["pred_joint"]["all"], expect, atol=1e-6)
    assert torch.allclose(model.predict(x), expect, atol=1e-6)
    assert not torch.allclose(model.predict(x), torch.stack(list(out["pred"].values())).mean(0), atol=1e-3)
    subset = {m: x[m] for m in ("s1", "s2")}
    assert "pred_joint" not in model(subset)
    assert torch.allclose(model.predict(subset), (out["pred"]["s1"] + out["pred"]["s2"]) / 2, atol=1e-5)
    model.train()
    model(x)["pred_joint"]["all"].sum().backward()
    assert model.joint_head[0].weight.grad.abs().sum() > 0
    reached = [p.grad is not None and p.grad.abs().sum() > 0 for p in model.banks.parameters()]
    assert any(reached) == (mode == "trained")
    assert "pred_joint" not in mdico()(x) and mdico().joint_head is None


def test_mdico_fused_equals_plain():
    """Same parameters, same outputs, gradients and updated statistics (dropout off: masks differ)."""
    fused = mdico()
    plain = copy.deepcopy(fused)
    plain.fused = False
    x = batch()
    for train in (True, False):
        fused.train(train), plain.train(train)
        a, b = fused(x), plain(x)
        for key in OUTPUT_KEYS:
            for m in INPUTS:
                assert torch.allclose(a[key][m], b[key][m], atol=1e-5), (key, m)
        if train:
            loss = lambda o: sum((t * torch.linspace(-1, 1, t.shape[1])).sum() for k in OUTPUT_KEYS for t in o[k].values())  # noqa: E731
            loss(a).backward()
            loss(b).backward()
            for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
                assert torch.allclose(p.grad, q.grad, atol=1e-4), name
    for (name, s), r in zip(fused.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(s.float(), r.float(), atol=1e-6), name
    for subset in (["s1"], ["s2", "dw"]):
        assert torch.allclose(fused.predict(x, modalities=subset), plain.predict(x, modalities=subset), atol=1e-5)


def test_mdico_with_other_encoder_types_and_months():
    cfg = config(
        encoders={
            "default": EncoderConfig("attention", hidden=8, depth=1, heads=2, categorical_dim=3),
            "s1": EncoderConfig("gru", hidden=8, depth=2),
            "s2": EncoderConfig("tempcnn", hidden=8, depth=1),
        }
    )
    torch.manual_seed(0)
    model = MDiCo(INPUTS, cfg, OUT)
    assert isinstance(model.encoder("common", "dw").encoder, TemporalAttention)
    assert isinstance(model.encoder("unique", "srtm"), MLPEncoder)
    month = torch.randint(1, 13, (B, T))
    out = model(batch(), month)
    assert out["pred"]["dw"].shape == (B, OUT)
    model.eval()
    assert not torch.allclose(model.predict(batch(), month, ["dw"]), model.predict(batch(), None, ["dw"]))


# ------------------------------------------------------------------------------------------ fusion


def fusion(modalities=None, sensor_dropout=0.0, inputs=INPUTS, **kw) -> FusionModel:
    torch.manual_seed(0)
    return FusionModel(inputs, config(**kw), OUT, modalities or list(inputs), sensor_dropout)


def test_fusion_is_early_and_single_is_one_sensor():
    model = fusion()
    assert model.early and model.modalities == list(INPUTS)
    assert model(batch())["pred"].shape == (B, OUT)
    single = fusion(["s2"])
    assert single.modalities == ["s2"] and isinstance(single.encoder, TempCNN)
    assert single(batch())["pred"].shape == (B, OUT)  # other inputs are ignored
    static = fusion(["srtm"])
    assert isinstance(static.encoder, MLPEncoder) and static(batch())["pred"].shape == (B, OUT)


def test_fusion_falls_back_to_late_fusion_without_a_common_time_axis():
    inputs = dict(INPUTS, s2=Modality("s2", "series", 5, 5))
    model = fusion(inputs=inputs)
    assert not model.early
    x = dict(batch(), s2=torch.randn(B, 5, 5))
    assert model(x)["pred"].shape == (B, OUT)
    model.eval()
    zeroed = dict(x, s2=torch.zeros(B, 5, 5))
    assert torch.allclose(model.predict(x, modalities=["s1", "srtm", "dw"]), model.predict(zeroed), atol=1e-6)


def test_fusion_masks_absent_modalities():
    model = fusion().eval()
    x = batch()
    blanked = dict(x, s2=torch.zeros(B, T, 5), srtm=torch.zeros(B, 2), dw=torch.full((B, T), 9))
    dropped = model.predict(x, modalities=["s1"])
    assert torch.allclose(dropped, model.predict(blanked), atol=1e-6)
    assert torch.allclose(dropped, model.predict({"s1": x["s1"]}), atol=1e-6)
    assert not torch.allclose(dropped, model.predict(x))
    with pytest.raises(KeyError):
        model.predict(x, modalities=["nope"])


def test_sensor_dropout_keeps_at_least_one_sensor():
    model = fusion(sensor_dropout=0.9)
    torch.manual_seed(1)
    keep = model.sensor_mask(4000, 4)
    assert keep.any(dim=1).all()
    assert 0.05 < keep.float().mean().item() < 0.35  # mostly dropped, never all
    single = fusion(sensor_dropout=0.5)
    torch.manual_seed(2)
    assert single.sensor_mask(1000, 1).all()


def test_sensor_dropout_zeroes_inputs_in_training_only():
    model = fusion(sensor_dropout=0.5).train()
    x = batch(n=16)
    torch.manual_seed(3)
    got = model(x)["pred"]
    torch.manual_seed(3)
    keep = model.sensor_mask(16, 4)
    manual = dict(x)
    for j, m in enumerate(INPUTS):
        k = keep[:, j].view(-1, *([1] * (x[m].dim() - 1)))
        manual[m] = torch.where(k, x[m], torch.full_like(x[m], 9 if m == "dw" else 0))
    ref = model._run(manual, list(INPUTS), None, None)
    assert torch.allclose(got, ref, atol=1e-6)
    model.eval()
    assert torch.allclose(model(x)["pred"], model.predict(x))


# ------------------------------------------------------------------------------------------ dispatch


@pytest.mark.parametrize(
    "method,cls,modalities",
    [("mdico", MDiCo, list(INPUTS)), ("single", FusionModel, ["s2"]), ("fusion", FusionModel, list(INPUTS)),
     ("dropout", FusionModel, list(INPUTS)), ("distill", FusionModel, ["s2"])],
)  # fmt: skip
def test_build_model_dispatches_on_method(method, cls, modalities):
    model = build_model(config(method, modality="s2", sensor_dropout=0.3, teacher="runs/t"), INPUTS, OUT, "shared")
    assert type(model) is cls and model.modalities == modalities
    if method == "dropout":
        assert model.sensor_dropout == 0.3
    if method == "mdico":
        assert model.second_classifier_on == "shared"
    with pytest.raises(KeyError):
        build_model(config("single", modality="nope"), INPUTS, OUT)


# ------------------------------------------------------------------------------------------ tracing


@pytest.mark.parametrize("kind", ["mdico", "fusion"])
def test_per_sensor_trace_matches_eager(kind):
    model = (mdico() if kind == "mdico" else fusion()).eval()
    x = batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for m in INPUTS:
            traced = torch.jit.trace(OneSensor(model, m), (x[m],))
            other = batch(n=3, seed=1)[m]  # another batch size: the trace must not bake shapes in
            for inp in (x[m], other):
                assert torch.allclose(traced(inp), model.predict({m: inp}, modalities=[m]), atol=1e-5), m
        # the export's form, a lambda: works once parameters need no gradient
        model.requires_grad_(False)
        fn = torch.jit.trace(lambda t: model.predict({"s2": t}, modalities=["s2"]), (x["s2"],))
        assert torch.allclose(fn(x["s2"]), model.predict(x, modalities=["s2"]), atol=1e-5)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("mode", ["unused", "shared"])
def test_shared_heads_see_the_embeddings_the_paper_gives_them(fused, mode):
    """By definition, per modality: the auxiliary head on z_spe and on z_sha, the first modality
    classifier on z_spe, the second on z_unu ("unused", the paper) or z_sha ("shared")."""
    model = mdico(second_classifier_on=mode).eval()
    model.fused = fused
    out = model(batch())
    second = "z_unu" if mode == "unused" else "z_sha"
    for m in INPUTS:
        assert torch.allclose(out["aux_spe"][m], model.aux_head(out["z_spe"][m]), atol=1e-6)
        assert torch.allclose(out["aux_sha"][m], model.aux_head(out["z_sha"][m]), atol=1e-6)
        assert torch.allclose(out["mod_spe"][m], model.mod_spe(out["z_spe"][m]), atol=1e-6)
        assert torch.allclose(out["mod_second"][m], model.mod_second(out[second][m]), atol=1e-6)
        # the three embeddings differ, so feeding a head the wrong one cannot pass by coincidence
        assert not torch.allclose(out["z_spe"][m], out["z_unu"][m]) and not torch.allclose(out["z_spe"][m], out["z_sha"][m])


# ------------------------------------------------------------------------------------------ context
MONTHS = torch.tensor([[1, 2, 3]] * B)
LATLON = torch.tensor([[40.0, -3.0]] * B)


def _with_context(kinds, join="input", method="mdico", fused=True, encoder="tempcnn"):
    from colearn_dist.context import ContextSpec

    enc = EncoderConfig(encoder, hidden=8, depth=2, dropout=0.0, heads=2, categorical_dim=3)
    cfg = config(method, encoders={"default": enc, "srtm": EncoderConfig("mlp", hidden=8, depth=1, dropout=0.0)})
    spec = None if kinds is None else ContextSpec(tuple(kinds), T, join)
    torch.manual_seed(0)
    if method == "mdico":
        return MDiCo(INPUTS, cfg, OUT, fused=fused, context=spec).eval()
    return build_model(ModelConfig(**{**cfg.__dict__, "modality": "s1"}), INPUTS, OUT, context=spec).eval()


@pytest.mark.parametrize("join", ["input", "output"])
@pytest.mark.parametrize("encoder", ["tempcnn", "attention"])  # banked and unbanked encoders
@pytest.mark.parametrize("method", ["mdico", "single", "fusion"])
def test_every_sensor_of_every_method_sees_the_calendar(method, encoder, join):
    model = _with_context(["calendar"], join, method, encoder=encoder)
    x = batch()
    sensors = list(INPUTS) if method != "single" else ["s1"]
    with torch.no_grad():
        for m in sensors:
            a = model.predict(x, MONTHS, modalities=[m])
            b = model.predict(x, MONTHS + 6, modalities=[m])
            assert not torch.allclose(a, b), m
            # calendar only: the location is not an input
            assert torch.equal(a, model.predict(x, MONTHS, modalities=[m], latlon=-LATLON))


@pytest.mark.parametrize("join", ["input", "output"])
def test_location_is_an_input_only_when_asked(join):
    x = batch()
    both = _with_context(["calendar", "location"], join)
    with torch.no_grad():
        for m in INPUTS:
            a = both.predict(x, MONTHS, modalities=[m], latlon=LATLON)
            assert not torch.allclose(a, both.predict(x, MONTHS, modalities=[m], latlon=LATLON + 30.0)), m
    with pytest.raises(ValueError, match="'location': the batch needs 'latlon'"):
        both.predict(x, MONTHS)


@pytest.mark.parametrize("join", ["input", "output"])
def test_fused_and_plain_paths_agree_with_context(join):
    fused, plain = _with_context(["calendar", "location"], join), _with_context(["calendar", "location"], join, fused=False)
    plain.load_state_dict(fused.state_dict())
    x = batch()
    with torch.no_grad():
        for m in INPUTS:
            a = fused.predict(x, MONTHS, modalities=[m], latlon=LATLON)
            torch.testing.assert_close(a, plain.predict(x, MONTHS, modalities=[m], latlon=LATLON))


def test_without_the_context_key_tempcnn_ignores_months_as_before():
    """`model.context` unset = the old behaviour: TempCNN / MLP models ignore the month, attention
    encoders see it; an empty context removes it from attention too."""
    x = batch()
    old, empty = _with_context(None), _with_context([])
    assert set(old.state_dict()) == set(empty.state_dict())  # no context parameters: old checkpoints load
    with torch.no_grad():
        for model in (old, empty):
            assert torch.equal(model.predict(x, MONTHS), model.predict(x, MONTHS + 6))
    attention_old, attention_empty = _with_context(None, encoder="attention"), _with_context([], encoder="attention")
    with torch.no_grad():
        assert not torch.allclose(attention_old.predict(x, MONTHS), attention_old.predict(x, MONTHS + 6))
        assert torch.equal(attention_empty.predict(x, MONTHS), attention_empty.predict(x, MONTHS + 6))


def _old_layout(model: MDiCo) -> dict[str, torch.Tensor]:
    """`model`'s state dict as MDiCo wrote it before its projections, heads and TempCNN dense layers
    were stored stacked: project.<m>.<layer>.*, heads.<m>.<layer>.*, banks.<b>.fc_weight [G, out, H·T]."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("project.", "heads.")) and "dense_weight" not in k}
    for part in ("project", "heads"):
        bank = getattr(model, part)
        for g, m in enumerate(model.modalities):
            state.update({f"{part}.{m}.{k}": v for k, v in bank.member(g).state_dict().items()})
    for b, bank in enumerate(model.banks):
        state[f"banks.{b}.fc_weight"] = torch.stack([bank.member(g).fc[0].weight for g in range(len(bank.channels))])
    return state


@pytest.mark.parametrize("head_hidden", [0, 5])
def test_mdico_loads_state_dicts_of_the_unstacked_layout(head_hidden):
    """Checkpoints and best-weight files written before the stacked layout load, to the same model."""
    trained = mdico(head_hidden=head_hidden).train()
    for seed in range(3):  # non-trivial BatchNorm statistics and counters
        trained(batch(seed=seed))
    old = _old_layout(trained)
    assert "project.s1.1.running_mean" in old and "heads.dw.0.weight" in old and "banks.0.fc_weight" in old
    torch.manual_seed(1)
    fresh = MDiCo(INPUTS, config(head_hidden=head_hidden), OUT)
    fresh.load_state_dict(old)
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    trained.eval(), fresh.eval()
    for subset in (None, ["s1"], ["s2", "dw"]):
        assert torch.equal(fresh.predict(batch(), modalities=subset), trained.predict(batch(), modalities=subset))


def test_fused_mdico_step_relays_out_no_weight():
    """A fused training step (forward + backward) stacks, copies or zero-fills no parameter and no
    tensor of a parameter's shape: every weight is read in the layout it is stored in."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    relayouts = {aten.stack.default, aten.cat.default, aten.clone.default, aten.copy_.default, aten._to_copy.default}
    fills = {aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default, aten.zero_.default, aten.fill_.Scalar}
    model = mdico().train()
    params = list(model.parameters())
    shapes = {tuple(p.shape) for p in params if p.dim() > 1}
    storages = {p.untyped_storage().data_ptr() for p in params}
    statistics = {b.untyped_storage().data_ptr() for b in model.buffers()}  # written in place each step: fine
    seen: list[str] = []

    def tensors(args):
        for a in args:
            yield from (x for x in (a if isinstance(a, (list, tuple)) else [a]) if isinstance(x, torch.Tensor))

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            reads_weight = any(t.untyped_storage().data_ptr() in storages for t in tensors(args))
            weight_sized = isinstance(out, torch.Tensor) and tuple(out.shape) in shapes
            if func == aten.copy_.default and args[0].untyped_storage().data_ptr() in statistics:
                return out
            if (func in relayouts and (reads_weight or weight_sized)) or (func in fills and weight_sized):
                seen.append(f"{func}{[tuple(t.shape) for t in tensors(args)]}")
            return out

    with Record():
        out = model(batch(8))
        sum(t.square().sum() for k in ("pred", "z_sha", "z_spe", "z_unu") for t in out[k].values()).backward()
    assert all(p.grad is not None for part in (model.banks, model.project, model.heads) for p in part.parameters())
    assert not seen, seen
