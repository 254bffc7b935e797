"""objective.py: task losses by hand, NT-Xent against pytorch-metric-learning, the MDiCo assembly,
the "reference" double count, distillation, and world 2 × b ≡ world 1 × 2b (even and uneven)."""

from __future__ import annotations

import itertools
import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from colearn_dist.config import ObjectiveConfig
from colearn_dist.methods import build_objective
from colearn_dist.objective import (
    DistillObjective,
    MDiCoObjective,
    SupervisedObjective,
    TaskSpec,
    _contrastive,
    inverse_frequency_weights,
)

from helpers import nt_xent

torch.set_num_threads(1)

KEYS = ("pred", "aux_spe", "aux_sha", "z_sha", "z_spe", "z_unu", "mod_spe", "mod_second")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_outputs(n: int, spec: TaskSpec, mods: list[str], dim: int = 6, seed: int = 0, dtype=torch.float64):
    """Random model outputs and a batch for the global batch of n samples."""
    gen = torch.Generator().manual_seed(seed)
    k, m = spec.num_outputs, len(mods)
    shapes = {"pred": k, "aux_spe": k, "aux_sha": k, "z_sha": dim, "z_spe": dim, "z_unu": dim, "mod_spe": m, "mod_second": m}
    out = {key: {mod: torch.randn(n, shapes[key], generator=gen, dtype=dtype) for mod in mods} for key in KEYS}
    if spec.task == "regression":
        target = torch.randn(n, generator=gen) * spec.target_std + spec.target_mean
    elif spec.task == "multilabel":
        target = (torch.rand(n, k, generator=gen) > 0.5).float()
    else:
        target = torch.randint(0, k, (n,), generator=gen)
    teacher = torch.randn(n, k, generator=gen, dtype=dtype)
    return out, {"target": target, "teacher_pred": teacher}


def leaf_slice(out: dict, batch: dict, lo: int, hi: int):
    """Rows lo:hi as fresh leaves, so each process / reference gets its own gradients."""
    o = {key: {m: t[lo:hi].clone().requires_grad_(True) for m, t in d.items()} for key, d in out.items()}
    b = {key: v[lo:hi].clone() for key, v in batch.items()}
    return o, b


def grads(o: dict) -> dict[str, torch.Tensor]:
    return {f"{key}/{m}": (t.grad.clone() if t.grad is not None else torch.zeros_like(t)) for key, d in o.items() for m, t in d.items()}


# ----------------------------------------------------------------------------- TaskSpec, task losses


def test_inverse_frequency_weights_mean_one():
    w = inverse_frequency_weights([10, 30, 60])
    torch.testing.assert_close(w, torch.tensor([2.0, 2 / 3, 1 / 3]))
    assert math.isclose(float(w.mean()), 1.0, rel_tol=1e-6)
    assert torch.isfinite(inverse_frequency_weights([5, 0, 5])).all()


def test_from_manifest_every_task():
    reg = TaskSpec.from_manifest(
        SimpleNamespace(task="regression", class_names=[], target_shape=[], target_stats={"mean": 120.0, "std": 30.0})
    )
    assert (reg.task, reg.num_outputs, reg.target_mean, reg.target_std, reg.class_weights) == ("regression", 1, 120.0, 30.0, None)
    mc = TaskSpec.from_manifest(
        {"task": "multiclass", "class_names": ["a", "b", "c"], "target_shape": [], "target_stats": {"class_counts": [10, 30, 60]}}
    )
    assert mc.num_outputs == 3
    torch.testing.assert_close(mc.class_weights, torch.tensor([2.0, 2 / 3, 1 / 3]))
    bi = TaskSpec.from_manifest(
        SimpleNamespace(task="binary", class_names=["no", "yes"], target_shape=[], target_stats={"class_counts": [3, 1]})
    )
    assert bi.num_outputs == 2 and bi.class_weights.shape == (2,) and bi.class_weights[1] > bi.class_weights[0]
    ml = TaskSpec.from_manifest(
        SimpleNamespace(
            task="multilabel", class_names=[], target_shape=[4], target_stats={"positive_counts": [1, 2, 3, 4], "num_samples": 9}
        )
    )
    assert ml.num_outputs == 4 and ml.class_weights is None
    with pytest.raises(ValueError):
        TaskSpec.from_manifest(SimpleNamespace(task="ranking", class_names=[], target_shape=[], target_stats={}))


def test_to_target_units():
    reg = TaskSpec("regression", 1, target_mean=10.0, target_std=4.0)
    torch.testing.assert_close(reg.to_target_units(torch.tensor([[0.5], [-1.0]])), torch.tensor([12.0, 6.0]))
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(TaskSpec("multiclass", 3).to_target_units(logits), torch.softmax(logits, -1))
    torch.testing.assert_close(TaskSpec("multilabel", 3).to_target_units(logits), torch.sigmoid(logits))


def test_weighted_cross_entropy_by_hand():
    w = [0.5, 1.0, 1.5]
    spec = TaskSpec("multiclass", 3, class_weights=torch.tensor(w))
    logits = [[2.0, 0.0, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.5], [0.0, 0.0, 4.0]]
    target = [0, 2, 1, 2]
    num = den = 0.0
    for row, y in zip(logits, target):
        nll = math.log(sum(math.exp(v) for v in row)) - row[y]
        num += w[y] * nll
        den += w[y]
    loss, logs = SupervisedObjective(spec)({"pred": torch.tensor(logits)}, {"target": torch.tensor(target)})
    assert math.isclose(float(loss), num / den, rel_tol=1e-6)
    assert math.isclose(float(logs["main"]), num / den, rel_tol=1e-6)
    # same definition as torch's weighted mean
    ref = F.cross_entropy(torch.tensor(logits), torch.tensor(target), weight=torch.tensor(w))
    assert math.isclose(float(loss), float(ref), rel_tol=1e-6)


def test_mse_on_standardised_target_by_hand():
    spec = TaskSpec("regression", 1, target_mean=10.0, target_std=4.0)
    pred = torch.tensor([[0.5], [-1.0], [2.0]])
    target = torch.tensor([12.0, 4.0, 30.0])  # standardised: 0.5, -1.5, 5.0
    loss, _ = SupervisedObjective(spec)({"pred": pred}, {"target": target})
    assert math.isclose(float(loss), (0.0 + 0.25 + 9.0) / 3, rel_tol=1e-6)
    # a [B] prediction is accepted too
    loss1, _ = SupervisedObjective(spec)({"pred": pred[:, 0]}, {"target": target})
    assert math.isclose(float(loss1), float(loss), rel_tol=1e-7)


def test_multilabel_bce_and_binary():
    logits = torch.tensor([[0.3, -2.0], [1.5, 0.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss, _ = SupervisedObjective(TaskSpec("multilabel", 2))({"pred": logits}, {"target": target})
    by_hand = (
        -sum(
            y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x)))
            for row, trow in zip(logits.tolist(), target.tolist())
            for x, y in zip(row, trow)
        )
        / 4
    )
    assert math.isclose(float(loss), by_hand, rel_tol=1e-6)
    bl = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    loss, _ = SupervisedObjective(TaskSpec("binary", 2))({"pred": bl}, {"target": torch.tensor([1, 1])})
    assert math.isclose(float(loss), float(F.cross_entropy(bl, torch.tensor([1, 1]))), rel_tol=1e-6)


# ----------------------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("n", [2, 3, 8, 33])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_pytorch_metric_learning(n, temperature):
    from pytorch_metric_learning.losses import NTXentLoss, SelfSupervisedLoss

    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, 16, generator=gen, dtype=torch.float64)
    b = torch.randn(n, 16, generator=gen, dtype=torch.float64)
    # pml symmetric: embeddings [a; b], labels [0..n-1, 0..n-1]; one positive pair per anchor, every
    # differently-labelled row a negative; MeanReducer over the 2n positive pairs.
    ref = SelfSupervisedLoss(NTXentLoss(temperature=temperature), symmetric=True)(a, b)
    ours = nt_xent(a, b, temperature)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # float32 embeddings are computed in float32 and agree to float32 precision
    torch.testing.assert_close(nt_xent(a.float(), b.float(), temperature).double(), ref, rtol=1e-5, atol=1e-5)


def test_nt_xent_is_symmetric_and_scale_invariant():
    a, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    torch.testing.assert_close(nt_xent(a, b), nt_xent(b, a))
    torch.testing.assert_close(nt_xent(3 * a, 0.5 * b), nt_xent(a, b))


@pytest.mark.parametrize("temperature", [0.1, 0.01])  # 0.01: the max-shifted logsumexp (no fixed shift)
def test_contrastive_terms_match_pytorch_metric_learning_value_and_gradient(temperature):
    """Five sensors at once: every pair's term, and the gradient of their sum (mode "sum"), equal pml
    pair by pair."""
    from pytorch_metric_learning.losses import NTXentLoss, SelfSupervisedLoss

    mods = ["a", "b", "c", "d", "e"]
    gen = torch.Generator().manual_seed(7)
    z = {m: torch.randn(9, 6, generator=gen, dtype=torch.float64, requires_grad=True) for m in mods}
    pairs = list(itertools.combinations(mods, 2))
    con, ours = _contrastive({"z_sha": z}, mods, pairs, temperature, "sum")
    ours_grad = torch.autograd.grad(con, [z[m] for m in mods])
    pml = SelfSupervisedLoss(NTXentLoss(temperature=temperature), symmetric=True)
    ref = {f"con/{a}-{b}": pml(z[a], z[b]) for a, b in pairs}
    ref_grad = torch.autograd.grad(sum(ref.values()), [z[m] for m in mods])
    assert set(ours) == set(ref)
    for key, value in ref.items():
        torch.testing.assert_close(ours[key], value.detach(), rtol=1e-10, atol=1e-10, msg=key)
    torch.testing.assert_close(con, sum(ref.values()), rtol=1e-10, atol=1e-10)
    for g, r in zip(ours_grad, ref_grad):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_contrastive_terms_never_index_or_zero_fill_pairwise_tensors():
    """No index/scatter/zero-fill op (forward or backward) on a tensor of the [M, n, N] size or more:
    memory and time stay those of the similarity matmuls, linear in the number of pairs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    suspects = {
        aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default,
        aten.zeros.default, aten.new_zeros.default, aten.zero_.default, aten.fill_.Scalar, aten.scatter.src,
        aten.index_select.default, aten.gather.default, aten.diagonal_backward.default,
    }  # fmt: skip
    seen: list[tuple[str, int]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in suspects and isinstance(out, torch.Tensor):
                seen.append((str(func), out.numel()))
            return out

    m, n, dim = 5, 8, 4
    mods = [f"s{i}" for i in range(m)]
    z = {k: torch.randn(n, dim, requires_grad=True) for k in mods}
    with Record():
        con, _ = _contrastive({"z_sha": z}, mods, list(itertools.combinations(mods, 2)), 0.1, "normalised")
        con.backward()
    assert all(z[k].grad is not None and z[k].grad.abs().sum() > 0 for k in mods)
    big = [(f, size) for f, size in seen if size >= m * n * n]
    assert not big, big


def test_contrastive_terms_allocate_one_pairwise_buffer():
    """Forward + backward allocate one tensor of the [M·n, M·N] size (the similarity matmul's, turned
    into exponentials and then into the softmax gradient in place), not one per elementwise pass."""
    from torch.utils._python_dispatch import TorchDispatchMode

    big: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
            fresh = isinstance(out, torch.Tensor) and out.untyped_storage().data_ptr() not in inputs  # no view, no in-place op
            if fresh and out.numel() >= m * n * m * n:
                big.append(str(func))
            return out

    m, n = 5, 12
    mods = [f"s{i}" for i in range(m)]
    z = {k: torch.randn(n, 8, requires_grad=True) for k in mods}
    with Record():
        con, _ = _contrastive({"z_sha": z}, mods, list(itertools.combinations(mods, 2)), 0.1, "normalised")
        con.backward()
    assert all(z[k].grad.abs().sum() > 0 for k in mods)
    assert big == ["aten.mm.default"], big


# ----------------------------------------------------------------------------- MDiCo assembly


def test_mdico_assembly_by_definition():
    mods = ["s1", "s2", "s3"]
    cfg = ObjectiveConfig(main=1.0, aux=0.5, con=0.3, mod=0.2, temperature=0.2)
    spec = TaskSpec("multiclass", 3, class_weights=torch.tensor([0.5, 1.0, 1.5]))
    out, batch = make_outputs(7, spec, mods)
    leaves, _ = leaf_slice(out, batch, 0, 7)
    loss, logs = MDiCoObjective(cfg, spec, mods)(leaves, batch)
    sup = SupervisedObjective(spec)
    task = {key: {m: float(sup({"pred": out[key][m]}, batch)[0]) for m in mods} for key in ("pred", "aux_spe", "aux_sha")}
    modce = {
        key: {m: float(F.cross_entropy(out[key][m], torch.full((7,), i))) for i, m in enumerate(mods)} for key in ("mod_spe", "mod_second")
    }
    pairs = [("s1", "s2"), ("s1", "s3"), ("s2", "s3")]
    con = {p: float(nt_xent(out["z_sha"][p[0]], out["z_sha"][p[1]], 0.2)) for p in pairs}
    main = sum(task["pred"].values()) / 3
    aux = (sum(task["aux_spe"].values()) + sum(task["aux_sha"].values())) / 6
    mod = (sum(modce["mod_spe"].values()) + sum(modce["mod_second"].values())) / 6
    c = sum(con.values()) / 3
    expected = main + 0.5 * aux + 0.3 * c + 0.2 * mod
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-10)
    for m in mods:
        assert math.isclose(float(logs[f"main/{m}"]), task["pred"][m], rel_tol=1e-10)
        assert math.isclose(float(logs[f"aux_spe/{m}"]), task["aux_spe"][m], rel_tol=1e-10)
        assert math.isclose(float(logs[f"aux_sha/{m}"]), task["aux_sha"][m], rel_tol=1e-10)
        assert math.isclose(float(logs[f"mod_spe/{m}"]), modce["mod_spe"][m], rel_tol=1e-10)
        assert math.isclose(float(logs[f"mod_second/{m}"]), modce["mod_second"][m], rel_tol=1e-10)
    for a, b in pairs:
        assert math.isclose(float(logs[f"con/{a}-{b}"]), con[(a, b)], rel_tol=1e-10)
    for key, value in {"main": main, "aux": aux, "con": c, "mod": mod, "loss": expected}.items():
        assert math.isclose(float(logs[key]), value, rel_tol=1e-10)
    assert all(not v.requires_grad for v in logs.values())
    assert loss.requires_grad


def test_joint_head_adds_one_main_weighted_task_term():
    mods = ["s1", "s2", "s3"]
    cfg = ObjectiveConfig(main=0.7)
    spec = TaskSpec("regression", 1, target_mean=5.0, target_std=2.0)
    out, batch = make_outputs(7, spec, mods, seed=4)
    joint = torch.randn(7, 1, dtype=torch.float64, requires_grad=True)
    base, _ = MDiCoObjective(cfg, spec, mods)(out, batch)
    loss, logs = MDiCoObjective(cfg, spec, mods)({**out, "pred_joint": {"all": joint}}, batch)
    expected = float(SupervisedObjective(spec)({"pred": joint.detach()}, batch)[0])
    assert math.isclose(float(logs["main/joint"]), expected, rel_tol=1e-10)
    assert math.isclose(float((loss - base).detach()), 0.7 * expected, rel_tol=1e-10)
    assert math.isclose(float(logs["loss"]), float(loss.detach()), rel_tol=1e-10)
    loss.backward()
    assert joint.grad is not None and joint.grad.abs().sum() > 0


@pytest.mark.parametrize("mods", [["s1", "s2"], ["s1", "s2", "s3"]])
def test_reference_pairs_double_count(mods):
    spec = TaskSpec("regression", 1, target_mean=5.0, target_std=2.0)
    out, batch = make_outputs(6, spec, mods, seed=3)
    norm_cfg = ObjectiveConfig(con=0.7, contrastive_pairs="normalised")
    ref_cfg = ObjectiveConfig(con=0.7, contrastive_pairs="reference")
    loss_n, logs_n = MDiCoObjective(norm_cfg, spec, mods)(out, batch)
    loss_r, logs_r = MDiCoObjective(ref_cfg, spec, mods)(out, batch)
    pair_sum = sum(v for k, v in logs_n.items() if k.startswith("con/"))
    num_pairs = len(mods) * (len(mods) - 1) // 2
    # reference = both ordered pairs (a,b) and (b,a) added = twice the sum over unordered pairs
    torch.testing.assert_close(logs_r["con"], 2 * pair_sum)
    torch.testing.assert_close(logs_r["con"], 2 * num_pairs * logs_n["con"])
    if len(mods) == 2:
        torch.testing.assert_close(logs_r["con"], 2 * logs_n["con"])
    torch.testing.assert_close(loss_r - loss_n, 0.7 * (logs_r["con"] - logs_n["con"]))
    for k in logs_n:
        if k not in ("con", "loss"):
            torch.testing.assert_close(logs_r[k], logs_n[k])


def test_mdico_rejects_one_modality_and_names_missing_output():
    spec = TaskSpec("regression", 1)
    with pytest.raises(ValueError):
        MDiCoObjective(ObjectiveConfig(), spec, ["s1"])
    out, batch = make_outputs(4, spec, ["s1", "s2"])
    del out["mod_second"]["s2"]
    with pytest.raises(KeyError, match="mod_second"):
        MDiCoObjective(ObjectiveConfig(), spec, ["s1", "s2"])(out, batch)


# ----------------------------------------------------------------------------- distillation, build


def test_distill_terms():
    t_temp = 3.0
    spec = TaskSpec("multiclass", 3, class_weights=torch.tensor([1.0, 2.0, 0.5]))
    out, batch = make_outputs(6, spec, ["s1"], seed=5)
    pred = out["pred"]["s1"]
    loss, logs = DistillObjective(spec, weight=0.4, temperature=t_temp)({"pred": pred}, batch)
    kl = F.kl_div(F.log_softmax(pred / t_temp, -1), F.softmax(batch["teacher_pred"] / t_temp, -1), reduction="batchmean")
    task = F.cross_entropy(pred, batch["target"], weight=spec.class_weights.double())
    torch.testing.assert_close(logs["distill"], kl * t_temp**2)
    torch.testing.assert_close(loss, task + 0.4 * kl * t_temp**2)

    reg = TaskSpec("regression", 1, target_mean=3.0, target_std=2.0)
    out, batch = make_outputs(5, reg, ["s1"], seed=6)
    batch["teacher_pred"] = batch["teacher_pred"][:, :1]
    pred = out["pred"]["s1"]
    _, logs = DistillObjective(reg, weight=1.0)({"pred": pred}, batch)
    torch.testing.assert_close(logs["distill"], F.mse_loss(pred, batch["teacher_pred"]))

    ml = TaskSpec("multilabel", 3)
    out, batch = make_outputs(5, ml, ["s1"], seed=7)
    pred = out["pred"]["s1"]
    _, logs = DistillObjective(ml)({"pred": pred}, batch)
    torch.testing.assert_close(logs["distill"], F.binary_cross_entropy_with_logits(pred, torch.sigmoid(batch["teacher_pred"])))

    # the teacher gets no gradient
    teacher = batch["teacher_pred"].clone().requires_grad_(True)
    loss, _ = DistillObjective(ml)({"pred": pred.clone().requires_grad_(True)}, {**batch, "teacher_pred": teacher})
    loss.backward()
    assert teacher.grad is None


def test_build_objective_dispatch():
    spec, cfg = TaskSpec("regression", 1), ObjectiveConfig()
    assert isinstance(build_objective("mdico", cfg, spec, ["a", "b"]), MDiCoObjective)
    for method in ("single", "fusion", "dropout"):
        assert isinstance(build_objective(method, cfg, spec, ["a"]), SupervisedObjective)
    d = build_objective("distill", cfg, spec, ["a"], distill_weight=0.3, distill_temperature=4.0)
    assert isinstance(d, DistillObjective) and d.weight == 0.3 and d.temperature == 4.0
    with pytest.raises(ValueError):
        build_objective("bogus", cfg, spec, ["a"])


# ----------------------------------------------------------------------------- world 2 × b ≡ world 1 × 2b

MODS2, MODS3 = ["s1", "s2"], ["s1", "s2", "s3"]
REG = dict(task="regression", num_outputs=1, target_mean=50.0, target_std=12.0)
MC = dict(task="multiclass", num_outputs=3, class_weights=[2.0, 0.5, 0.5])
CFG = dict(main=1.0, aux=0.5, con=0.3, mod=0.2, temperature=0.2)
# (name, objective kind, spec, modalities, local sizes, dtype, extra cfg)
SCENARIOS = [
    ("reg-even", "mdico", REG, MODS2, (4, 4), torch.float32, {}),
    ("mc-even", "mdico", MC, MODS2, (4, 4), torch.float32, {}),
    ("mc-uneven", "mdico", MC, MODS2, (5, 3), torch.float32, {}),
    ("reg-uneven-3mod-reference", "mdico", REG, MODS3, (3, 5), torch.float32, {"contrastive_pairs": "reference"}),
    ("mc-uneven-f64", "mdico", MC, MODS3, (5, 3), torch.float64, {}),
    ("distill-mc-uneven", "distill", MC, ["s1"], (5, 3), torch.float32, {}),
    ("single-reg-uneven", "single", REG, ["s1"], (2, 6), torch.float32, {}),
]


def _spec(d: dict) -> TaskSpec:
    d = dict(d)
    if d.get("class_weights") is not None:
        d["class_weights"] = torch.tensor(d["class_weights"])
    return TaskSpec(**d)


def _run(kind, spec_d, mods, sizes, dtype, extra, rank_: int):
    """Objective on this rank's rows: (returned loss, detached logs, gradients of every output)."""
    spec = _spec(spec_d)
    objective = build_objective(kind, ObjectiveConfig(**CFG, **extra), spec, mods, distill_weight=0.7, distill_temperature=2.5)
    out, batch = make_outputs(sum(sizes), spec, mods, seed=11, dtype=dtype)
    if kind != "mdico":
        out = {"pred": out["pred"]}
    lo = sum(sizes[:rank_])
    o, b = leaf_slice(out, batch, lo, lo + sizes[rank_])
    if kind != "mdico":
        o = {"pred": {mods[0]: o["pred"][mods[0]]}}
        loss, logs = objective({"pred": o["pred"][mods[0]]}, b)
    else:
        loss, logs = objective(o, b)
    loss.backward()
    return loss.detach(), logs, grads(o)


def _equivalence_worker(rank_: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank_, world_size=world)
    try:
        results = {s[0]: _run(*s[1:], rank_) for s in SCENARIOS}
        torch.save(results, os.path.join(out_dir, f"rank{rank_}.pt"))
    finally:
        dist.destroy_process_group()


def test_world2_equals_world1_even_and_uneven(tmp_path):
    world = 2
    mp.spawn(_equivalence_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, kind, spec_d, mods, sizes, dtype, extra in SCENARIOS:
        # world 1 holding the whole global batch
        ref_loss, ref_logs, ref_grads = _run(kind, spec_d, mods, (sum(sizes),), dtype, extra, 0)
        # float32: 1e-6 relative (a loss near 10 has an ulp of ~1e-6); float64: the algebra is exact
        tol_loss, tol_grad = (1e-6, 1e-5) if dtype == torch.float32 else (1e-12, 1e-12)
        # DeepSpeed's view: the mean over ranks of the returned loss is the global loss
        mean_loss = sum(res[r][name][0] for r in range(world)) / world
        torch.testing.assert_close(mean_loss, ref_loss, rtol=tol_loss, atol=tol_loss, msg=name)
        # the logged terms are rank contributions: their sum over ranks is the global value
        assert set(res[0][name][1]) == set(ref_logs)
        for key, value in ref_logs.items():
            total = sum(res[r][name][1][key] for r in range(world))
            torch.testing.assert_close(total, value, rtol=tol_loss, atol=tol_loss, msg=f"{name} {key}")
        # gradients after DeepSpeed's 1/world averaging equal the single-process gradients, row for row
        for key, g in ref_grads.items():
            dist_g = torch.cat([res[r][name][2][key] for r in range(world)]) / world
            assert dist_g.shape == g.shape, (name, key)
            torch.testing.assert_close(dist_g, g, rtol=0, atol=tol_grad, msg=f"{name} grad {key}")
        # and the gradients are not trivially zero where the loss depends on the input
        assert any(g.abs().sum() > 0 for k, g in ref_grads.items() if k.startswith(("pred/", "z_sha/")))


def test_low_precision_outputs_give_float32_loss_and_grads():
    mods = ["s1", "s2"]
    spec = TaskSpec("multiclass", 3, class_weights=torch.tensor([1.0, 2.0, 0.5]))
    out, batch = make_outputs(6, spec, mods, dtype=torch.bfloat16)
    leaves, _ = leaf_slice(out, batch, 0, 6)
    loss, logs = MDiCoObjective(ObjectiveConfig(), spec, mods)(leaves, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    g = leaves["z_sha"]["s1"].grad
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all() and g.abs().sum() > 0
    # same value as the float32 computation on the same (bf16-rounded) numbers
    ref, _ = MDiCoObjective(ObjectiveConfig(), spec, mods)({k: {m: t.float() for m, t in d.items()} for k, d in out.items()}, batch)
    torch.testing.assert_close(loss.detach(), ref)


def test_missing_regression_targets_are_masked_from_the_task_terms_only():
    """A NaN target adds nothing to any task loss (no NaN loss, no gradient through its task heads)
    while its sample still counts in the label-free terms (contrastive, modality classifiers)."""
    mods = ["s1", "s2"]
    spec = TaskSpec("regression", 1, target_mean=50.0, target_std=10.0)
    out, batch = make_outputs(8, spec, mods)
    batch["target"][[1, 4, 5]] = float("nan")
    kept = torch.tensor([i for i in range(8) if i not in (1, 4, 5)])
    leaves, _ = leaf_slice(out, batch, 0, 8)
    loss, logs = MDiCoObjective(ObjectiveConfig(), spec, mods)(leaves, batch)
    loss.backward()
    assert torch.isfinite(loss)
    labelled = {key: {m: t[kept] for m, t in d.items()} for key, d in out.items()}
    ref_loss, ref_logs = MDiCoObjective(ObjectiveConfig(), spec, mods)(labelled, {"target": batch["target"][kept]})
    for key in ("main", "aux_spe/s1", "aux_sha/s2"):
        assert math.isclose(float(logs[key]), float(ref_logs[key]), rel_tol=1e-10)
    full_con = float(MDiCoObjective(ObjectiveConfig(), spec, mods)(out, {"target": torch.zeros(8)})[1]["con"])
    assert math.isclose(float(logs["con"]), full_con, rel_tol=1e-10)  # all 8 samples, labels or not
    for key in ("pred", "aux_spe", "aux_sha"):
        assert torch.all(leaves[key]["s1"].grad[[1, 4, 5]] == 0) and torch.all(torch.isfinite(leaves[key]["s1"].grad))
    sup_loss, sup_logs = SupervisedObjective(spec)({"pred": out["pred"]["s1"]}, batch)
    assert math.isclose(
        float(sup_logs["main"]),
        float(SupervisedObjective(spec)({"pred": out["pred"]["s1"][kept]}, {"target": batch["target"][kept]})[1]["main"]),
        rel_tol=1e-10,
    )
