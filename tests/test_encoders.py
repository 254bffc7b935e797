"""Encoders: input specs from the manifest, shapes of every type × kind, depth, months, missing classes,
and the stacked TempCNN bank against the plain TempCNN."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from colearn_dist.config import EncoderConfig
from colearn_dist.context import ContextSpec, context_features
from colearn_dist.encoders import (
    CategoricalEmbedding,
    CategoricalEncoder,
    MLPEncoder,
    Recurrent,
    TempCNN,
    TemporalAttention,
    WithContext,
    build_encoder,
    month_encoding,
)
from colearn_dist.manifest import Modality, modality_inputs
from colearn_dist.tempcnn_bank import LinearBank, TempCNNBank, _dropout_mask, batch_norm_stacked, fast_dropout, norm_relu_dropout

torch.set_num_threads(1)

B, T = 5, 3
TYPES = ["tempcnn", "attention", "gru", "lstm", "mlp"]
INPUTS = {
    "series": Modality("s2", "series", T, 4),
    "static": Modality("srtm", "static", None, 2),
    "categorical": Modality("dw", "categorical", T, 1, num_classes=10, missing_value=9),
}


def small(type_: str, **kw) -> EncoderConfig:
    return EncoderConfig(type=type_, hidden=8, depth=kw.pop("depth", 2), heads=2, categorical_dim=3, **kw)


def batch(inp: Modality, n: int = B) -> torch.Tensor:
    if inp.kind == "series":
        return torch.randn(n, inp.steps, inp.channels)
    if inp.kind == "static":
        return torch.randn(n, inp.channels)
    return torch.randint(0, inp.num_classes, (n, inp.steps))


MANIFEST = {
    "s1": {"kind": "series", "shape": [3, 2], "dtype": "float32", "bands": ["VV", "VH"], "num_classes": None, "missing_value": None},
    "srtm": {
        "kind": "static",
        "shape": [2],
        "dtype": "float32",
        "bands": ["elevation", "slope"],
        "num_classes": None,
        "missing_value": None,
    },
    "dw": {"kind": "categorical", "shape": [3], "dtype": "uint8", "bands": ["dynamic_world"], "num_classes": 10, "missing_value": 9},
}


def test_modality_inputs_from_manifest():
    got = modality_inputs(MANIFEST, None)
    assert list(got) == ["s1", "srtm", "dw"]
    assert got["s1"] == Modality("s1", "series", 3, 2, bands=("VV", "VH"))
    assert got["srtm"] == Modality("srtm", "static", None, 2, bands=("elevation", "slope"))
    assert got["dw"] == Modality("dw", "categorical", 3, 1, num_classes=10, missing_value=9, bands=("dynamic_world",))
    with_stats = modality_inputs(MANIFEST, ["s1", "dw"], {"s1": {"mean": [-12, -18], "std": [4, 5]}})
    assert with_stats["s1"].mean == (-12.0, -18.0) and with_stats["s1"].std == (4.0, 5.0)
    assert with_stats["dw"].mean is None and with_stats["dw"].std is None
    assert list(modality_inputs(MANIFEST, ["dw", "s1"])) == ["dw", "s1"]
    assert list(modality_inputs(MANIFEST, [])) == ["s1", "srtm", "dw"]  # empty = all, as data.modalities


def test_modality_inputs_errors_name_the_modality():
    with pytest.raises(KeyError, match="s9"):
        modality_inputs(MANIFEST, ["s9"])
    bad = {"s1": dict(MANIFEST["s1"], shape=[3])}
    with pytest.raises(ValueError, match="s1"):
        modality_inputs(bad)
    with pytest.raises(ValueError, match="num_classes"):
        Modality("dw", "categorical", 3, 1)
    with pytest.raises(ValueError, match="kind"):
        Modality("x", "video", 3, 1)


@pytest.mark.parametrize("kind", list(INPUTS))
@pytest.mark.parametrize("type_", TYPES)
def test_every_type_and_kind_gives_batch_by_out_dim(type_, kind):
    torch.manual_seed(0)
    inp = INPUTS[kind]
    enc = build_encoder(small(type_), inp, 6)
    x = batch(inp)
    month = torch.randint(1, 13, (B, T))
    assert enc(x).shape == (B, 6)
    assert enc(x, month).shape == (B, 6)
    enc.eval()
    assert enc(x[:1], None).shape == (1, 6)


@pytest.mark.parametrize("type_", ["tempcnn", "attention", "gru", "lstm"])
def test_static_modality_falls_back_to_mlp(type_):
    assert isinstance(build_encoder(small(type_), INPUTS["static"], 4), MLPEncoder)


@pytest.mark.parametrize("depth", [1, 2, 4])
def test_depth_is_honoured(depth):
    count = lambda m, cls: sum(isinstance(x, cls) for x in m.modules())  # noqa: E731
    series = INPUTS["series"]
    assert count(build_encoder(small("tempcnn", depth=depth), series, 4), nn.Conv1d) == depth
    assert count(build_encoder(small("tempcnn", depth=depth), INPUTS["categorical"], 4), nn.Conv1d) == depth
    assert count(build_encoder(small("attention", depth=depth), series, 4), nn.TransformerEncoderLayer) == depth
    assert build_encoder(small("gru", depth=depth), series, 4).rnn.num_layers == depth
    assert build_encoder(small("lstm", depth=depth), series, 4).rnn.num_layers == depth
    assert count(build_encoder(small("mlp", depth=depth), INPUTS["static"], 4), nn.Linear) == depth + 1
    assert count(build_encoder(small("mlp", depth=depth), INPUTS["static"], 4), nn.BatchNorm1d) == depth
    assert len(TempCNNBank([2, 3], T, 4, 8, depth).conv_weight) == depth


def test_encoder_classes():
    assert isinstance(build_encoder(small("tempcnn"), INPUTS["series"], 4), TempCNN)
    assert isinstance(build_encoder(small("attention"), INPUTS["series"], 4), TemporalAttention)
    assert isinstance(build_encoder(small("lstm"), INPUTS["series"], 4), Recurrent)
    enc = build_encoder(small("gru"), INPUTS["categorical"], 4)
    assert isinstance(enc, CategoricalEncoder) and isinstance(enc.encoder, Recurrent)


def test_attention_uses_months_and_their_cycle():
    torch.manual_seed(0)
    enc = build_encoder(small("attention"), INPUTS["series"], 4).eval()
    x = torch.randn(B, T, 4)
    a = enc(x, torch.tensor([[1, 2, 3]] * B))
    b = enc(x, torch.tensor([[6, 7, 8]] * B))
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, enc(x))  # position encoding without months
    e = month_encoding(torch.arange(1, 13), 8)
    dist = lambda i, j: (e[i] - e[j]).norm()  # noqa: E731
    assert torch.isclose(dist(11, 0), dist(0, 1))  # December is as close to January as January to February


def test_categorical_missing_and_out_of_range_codes_embed_to_zero_without_gradient():
    emb = CategoricalEmbedding(10, 3, missing_value=9)
    x = torch.tensor([[0, 9, -1, 12, 4]])
    out = emb(x)
    assert out.shape == (1, 5, 3)
    assert torch.equal(out[0, 1:4], torch.zeros(3, 3))
    assert torch.allclose(out[0, 0], emb.embedding.weight[0]) and torch.allclose(out[0, 4], emb.embedding.weight[4])
    out.sum().backward()
    grad = emb.embedding.weight.grad
    assert grad[[0, 4]].abs().sum() > 0 and grad[[1, 2, 3, 5, 6, 7, 8, 9]].abs().sum() == 0


def test_batch_norm_stacked_matches_batch_norm():
    torch.manual_seed(0)
    x = torch.randn(3, 7, 4)
    w, b = torch.rand(3, 4) + 0.5, torch.randn(3, 4)
    rm, rv = torch.randn(3, 4), torch.rand(3, 4) + 0.5
    for training in (True, False):
        out, new_m, new_v = batch_norm_stacked(x, w, b, rm, rv, training, 0.1, 1e-5)
        for g in range(3):
            m, v = rm[g].clone(), rv[g].clone()
            ref = F.batch_norm(x[g], m, v, w[g], b[g], training, 0.1, 1e-5)
            assert torch.allclose(out[g], ref, atol=1e-5)
            if training:
                assert torch.allclose(new_m[g], m, atol=1e-6) and torch.allclose(new_v[g], v, atol=1e-6)


def test_fast_dropout():
    torch.manual_seed(0)
    x = torch.ones(200, 100)
    y = fast_dropout(x, 0.25, True)
    assert abs((y == 0).float().mean().item() - 0.25) < 0.02
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    assert fast_dropout(x, 0.25, False) is x and fast_dropout(x, 0.0, True) is x


# ------------------------------------------------------------------------------------------ the bank


def make_bank(steps=T, kernel=5, channels=(2, 5, 3), dropout=0.0, depth=2):
    torch.manual_seed(0)
    bank = TempCNNBank(list(channels), steps, 6, hidden=8, depth=depth, kernel_size=kernel, dropout=dropout)
    with torch.no_grad():  # non-trivial statistics, so eval mode tests them
        for i in range(depth + 1):
            bank._stats(i)[0].normal_()
            bank._stats(i)[1].uniform_(0.5, 2.0)
    xs = [torch.randn(B, steps, c) for c in channels]
    return bank, xs


def test_bank_member_is_a_tempcnn():
    bank, xs = make_bank()
    for train in (True, False):
        b = copy.deepcopy(bank).train(train)
        for g, x in enumerate(xs):
            core = b.member(g)
            assert isinstance(core, TempCNN) and core.training == train
            assert torch.allclose(core(x), b.forward_one(g, x), atol=1e-6)
            if train:  # both updated their statistics the same way
                assert torch.allclose(core.fc[1].running_mean, b.member(g).fc[1].running_mean, atol=1e-6)
    # load_member / member round trip
    other = TempCNN(5, T, 6, 8, 2, 5, 0.0)
    bank.load_member(1, other)
    for p, q in zip(other.state_dict().values(), bank.member(1).state_dict().values()):
        assert torch.equal(p, q)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("steps,kernel", [(3, 5), (1, 5), (2, 3), (4, 5), (3, 4), (3, 3), (12, 5)])
def test_bank_fused_equals_plain(steps, kernel):
    """Outputs, gradients and running statistics; T ≤ K uses matmuls, T > K the grouped conv."""
    bank, xs = make_bank(steps, kernel)
    for train in (True, False):
        fused, plain = copy.deepcopy(bank).train(train), copy.deepcopy(bank).train(train)
        y = fused(xs)
        ref = torch.stack([plain.forward_one(g, x) for g, x in enumerate(xs)])
        assert y.shape == (3, B, 6)
        assert torch.allclose(y, ref, atol=1e-5)
        (y * torch.arange(6.0)).sum().backward()
        (ref * torch.arange(6.0)).sum().backward()
        for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-4), name
        for (name, s), r in zip(fused.state_dict().items(), plain.state_dict().values()):
            assert torch.allclose(s.float(), r.float(), atol=1e-6), name


@pytest.mark.parametrize("members", [[1, 2], [2, 0], [1]])
def test_bank_runs_a_subset_of_members(members):
    bank, xs = make_bank()
    for train in (True, False):
        fused, plain = copy.deepcopy(bank).train(train), copy.deepcopy(bank).train(train)
        y = fused([xs[g] for g in members], members)
        ref = torch.stack([plain.forward_one(g, xs[g]) for g in members])
        assert torch.allclose(y, ref, atol=1e-5)
        for (name, s), r in zip(fused.state_dict().items(), plain.state_dict().values()):
            assert torch.allclose(s.float(), r.float(), atol=1e-6), name


def test_bank_dropout_is_active_in_training_only():
    bank, xs = make_bank(dropout=0.5)
    bank.train()
    assert not torch.allclose(bank(xs), bank(xs))
    bank.eval()
    assert torch.allclose(bank(xs), bank(xs))


# ------------------------------------------------------------------------------------------- context
CALENDAR = {join: ContextSpec(("calendar",), T, join) for join in ("input", "output")}
IMAGE = Modality("aerial", "image", None, 3, height=8, width=8)


def _context_input(kind: str) -> torch.Tensor:
    torch.manual_seed(0)
    if kind == "categorical":
        return torch.randint(0, 9, (B, T))
    if kind == "image":
        return torch.randn(B, 3, 8, 8)
    return torch.randn(B, T, 4) if kind == "series" else torch.randn(B, 2)


# an image gets the CNN and a static layer the MLP whatever temporal type is configured: one case each
CASES = [(t, k) for t in TYPES for k in ("series", "categorical")] + [("tempcnn", "static"), ("tempcnn", "image")]


@pytest.mark.parametrize("join", ["input", "output"])
@pytest.mark.parametrize(("type_", "kind"), CASES)
def test_every_encoder_sees_the_calendar(type_, kind, join):
    """Changing only the months changes the embedding, for every encoder type × input kind × join."""
    inp = IMAGE if kind == "image" else INPUTS[kind]
    enc = build_encoder(EncoderConfig(type=type_, hidden=8, depth=2, heads=2, dropout=0.0), inp, 6, CALENDAR[join]).eval()
    assert isinstance(enc, WithContext)
    x = _context_input(kind)
    months = torch.tensor([[1, 2, 3]] * B)
    with torch.no_grad():
        a = enc(x, context_features(CALENDAR[join], months, None, torch.zeros(1)))
        b = enc(x, context_features(CALENDAR[join], months + 6, None, torch.zeros(1)))
        again = enc(x, context_features(CALENDAR[join], months, None, torch.zeros(1)))
    assert a.shape == (B, 6)
    assert torch.equal(a, again) and not torch.allclose(a, b)


def test_no_context_keeps_the_old_encoders():
    """Without a context (or an empty one) build_encoder gives the pre-context modules, parameter for parameter."""
    cfg = EncoderConfig(hidden=8, depth=2)
    for inp in INPUTS.values():
        torch.manual_seed(0)
        old = build_encoder(cfg, inp, 6)
        torch.manual_seed(0)
        empty = build_encoder(cfg, inp, 6, ContextSpec((), T))
        assert not isinstance(old, WithContext) and type(old) is type(empty)
        assert all(torch.equal(p, q) for p, q in zip(old.state_dict().values(), empty.state_dict().values()))


def test_input_join_needs_the_calendar_steps():
    with pytest.raises(ValueError, match="model.context_join: 'input' needs 's2' to have the calendar's 5 steps"):
        build_encoder(EncoderConfig(), INPUTS["series"], 6, ContextSpec(("calendar",), 5, "input"))
    build_encoder(EncoderConfig(), INPUTS["series"], 6, ContextSpec(("calendar",), 5, "output"))  # any length


def test_bank_loads_the_dense_layout_it_replaced():
    """State dicts written before the dense weight was stored [G, T·H, out] (`fc_weight`, TempCNN's
    [out, H·T] per member) load into the same members."""
    bank, xs = make_bank()
    old = {k: v for k, v in bank.state_dict().items() if k != "dense_weight"}
    old["fc_weight"] = torch.stack([bank.member(g).fc[0].weight for g in range(3)])
    fresh = TempCNNBank([2, 5, 3], T, 6, hidden=8, depth=2, dropout=0.0)
    fresh.load_state_dict(old)
    for g in range(3):
        for p, q in zip(bank.member(g).state_dict().values(), fresh.member(g).state_dict().values()):
            assert torch.equal(p, q)
    assert torch.equal(fresh.eval()(xs), bank.eval()(xs))


def make_linear_bank(norm, sizes=(5, 7, 3)):
    torch.manual_seed(0)
    bank = LinearBank(["a", "b", "c"], list(sizes), norm=norm)
    if norm:
        with torch.no_grad():
            bank.running_mean.normal_()
            bank.running_var.uniform_(0.5, 2.0)
            bank.norm_weight.uniform_(0.5, 1.5)
    return bank, torch.randn(3, B, sizes[0])


@pytest.mark.parametrize("norm,sizes", [(True, (5, 4)), (False, (5, 7, 3)), (False, (5, 2))])
def test_linear_bank_members_are_the_modules_it_replaces(norm, sizes):
    bank, x = make_linear_bank(norm, sizes)
    reference = LinearBank(["a"], list(sizes), norm=norm)._new_member()
    for g in range(3):
        member = bank.member(g)
        assert [type(layer) for layer in member] == [type(layer) for layer in reference]
        assert set(member.state_dict()) == set(bank.member_keys().values())
        for train in (True, False):
            b = copy.deepcopy(bank).train(train)
            assert torch.allclose(b.member(g)(x[g]), b.forward_one(g, x[g]), atol=1e-6)
    other = reference
    bank.load_member(1, other)
    for p, q in zip(other.state_dict().values(), bank.member(1).state_dict().values()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("members", [None, [1, 2], [2, 0]])
@pytest.mark.parametrize("norm", [True, False])
def test_linear_bank_fused_equals_plain(norm, members):
    bank, x = make_linear_bank(norm)
    rows = [0, 1, 2] if members is None else members
    x = x[: len(rows)]
    for train in (True, False):
        fused, plain = copy.deepcopy(bank).train(train), copy.deepcopy(bank).train(train)
        y = fused(x, members)
        ref = torch.stack([plain.forward_one(g, x[j]) for j, g in enumerate(rows)])
        assert torch.allclose(y, ref, atol=1e-5)
        (y * torch.arange(3.0)).sum().backward()
        (ref * torch.arange(3.0)).sum().backward()
        for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-5), name
        for (name, s), r in zip(fused.state_dict().items(), plain.state_dict().values()):
            assert torch.allclose(s.float(), r.float(), atol=1e-6), name
        if train and norm:
            assert fused.num_batches_tracked.tolist() == [int(g in rows) for g in range(3)]


@pytest.mark.parametrize("norm", [True, False])
def test_linear_bank_loads_the_module_dict_it_replaced(norm):
    """A state dict of the ModuleDict({name: nn.Sequential}) layout (runs written before the bank)."""
    bank, x = make_linear_bank(norm)
    old = nn.ModuleDict({name: bank.member(g) for g, name in enumerate(bank.names)})
    fresh = LinearBank(bank.names, bank.sizes, norm=norm)
    fresh.load_state_dict(old.state_dict())
    for key, value in bank.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    broken = {k: v for k, v in old.state_dict().items() if k != "b.0.bias"}
    with pytest.raises(RuntimeError, match="b.0.weight"):  # incomplete: strict loading names the leftovers
        LinearBank(bank.names, bank.sizes, norm=norm).load_state_dict(broken)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_norm_relu_dropout_is_the_composed_ops_in_one_node(p):
    """The fused BatchNorm + ReLU + dropout: the same output, running statistics and gradients as
    fast_dropout(relu(batch_norm_stacked(...))) with the same random draws, as one autograd node."""
    torch.manual_seed(0)
    x = torch.randn(3, 40, 8, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, 8, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, 8, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(3, 8, dtype=torch.float64), torch.rand(3, 8, dtype=torch.float64) + 0.5
    grad = torch.randn(3, 40, 8, dtype=torch.float64)
    torch.manual_seed(5)
    out, mean, var = norm_relu_dropout(x, w, b, rm, rv, True, 0.1, 1e-5, p)
    assert type(out.grad_fn).__name__ == "_NormReluDropoutBackward"
    fused = torch.autograd.grad(out, (x, w, b), grad)
    torch.manual_seed(5)
    ref, ref_mean, ref_var = batch_norm_stacked(x, w, b, rm, rv, True, 0.1, 1e-5)
    ref = fast_dropout(F.relu(ref), p, True)
    composed = torch.autograd.grad(ref, (x, w, b), grad)
    assert (out == 0).any() and torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(mean, ref_mean, atol=1e-12) and torch.allclose(var, ref_var, atol=1e-12)
    for a, c in zip(fused, composed):
        assert torch.allclose(a, c, atol=1e-12)
    # evaluation: the running statistics, nothing updated
    out, mean, var = norm_relu_dropout(x, w, b, rm, rv, False, 0.1, 1e-5, p)
    assert mean is None and var is None
    assert torch.allclose(out, F.relu(batch_norm_stacked(x, w, b, rm, rv, False, 0.1, 1e-5)[0]))


def test_dropout_mask_is_the_threshold_of_16_bit_lanes():
    """The mask keeps exactly the elements whose 16-bit random lane is at or above p·65536 − 32768."""
    x = torch.empty(300, 70)
    for p in (0.01, 0.2, 0.99):
        torch.manual_seed(3)
        mask = _dropout_mask(x, p)
        torch.manual_seed(3)
        bits = torch.randint(-(2**63), 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64)
        lanes = bits.view(torch.int16)[: x.numel()].view(x.shape)
        keep = lanes >= int(round(p * 65536)) - 32768
        assert torch.equal(mask, keep.float() / (1 - p))
        torch.manual_seed(3)
        assert _dropout_mask(x.bfloat16(), p).eq(0).equal(~keep)  # bf16 cannot hold int16 lanes: cast after


def test_compiled_dropout_mask_is_opaque_with_eager_draws():
    """Under torch.compile on CPU the mask is one opaque op: no int16 lane enters the traced graph
    (inductor's CPU kernels reading int16 ran scalar, README: Speed), and inductor draws nothing
    itself: the masks are eager mode's, the same generator's."""
    import torch._dynamo

    torch._dynamo.reset()
    traced: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        traced.append(gm)
        return gm.forward

    x = torch.ones(40, 30)
    torch.compile(lambda x: fast_dropout(x, 0.2, True), backend=record, fullgraph=True)(x)
    values = [n.meta.get("example_value") for gm in traced for n in gm.graph.nodes]
    assert torch.int16 not in {v.dtype for v in values if isinstance(v, torch.Tensor)}
    compiled = torch.compile(lambda x: fast_dropout(x, 0.2, True), backend="inductor", dynamic=False)
    for seed in (5, 6):
        torch.manual_seed(seed)
        got = compiled(x)
        torch.manual_seed(seed)
        assert torch.equal(got, fast_dropout(x, 0.2, True))
    torch._dynamo.reset()


def test_fused_norm_only_in_one_process_eager(monkeypatch):
    """The fused node runs eagerly in one process; across ranks (global batch statistics) and under
    torch.compile the composed ops run."""
    import colearn_dist.tempcnn_bank as tempcnn_bank

    x, w, b = torch.randn(2, 6, 3, requires_grad=True), torch.ones(2, 3), torch.zeros(2, 3)
    stats = (torch.zeros(2, 3), torch.ones(2, 3))
    out, _, _ = norm_relu_dropout(x, w, b, *stats, True, 0.1, 1e-5, 0.0)
    assert type(out.grad_fn).__name__ == "_NormReluDropoutBackward"
    monkeypatch.setattr(tempcnn_bank, "global_batch_stats", lambda: True)
    out, _, _ = norm_relu_dropout(x, w, b, *stats, True, 0.1, 1e-5, 0.0)
    assert type(out.grad_fn).__name__ != "_NormReluDropoutBackward"
    monkeypatch.undo()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not tempcnn_bank.fused_norm_applies()
