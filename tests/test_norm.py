"""norm.py: batch statistics over the global batch — every BatchNorm kind, 2 gloo processes against 1."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from colearn_dist import norm
from colearn_dist.launch import free_port
from colearn_dist.tempcnn_bank import TempCNNBank, batch_norm_stacked

torch.set_num_threads(1)

SIZES = (3, 5)  # uneven local batches


# ----------------------------------------------------------------------------- single process


def test_one_process_is_torch_batch_norm_bit_for_bit():
    """Without ranks the layers are nn.BatchNorm, state-dict keys and numbers alike (old runs load)."""
    torch.manual_seed(0)
    for ours, theirs, shape in (
        (norm.BatchNorm1d(4), nn.BatchNorm1d(4), (6, 4)),
        (norm.BatchNorm1d(4), nn.BatchNorm1d(4), (6, 4, 5)),
        (norm.BatchNorm2d(4), nn.BatchNorm2d(4), (6, 4, 3, 3)),
        (norm.BatchNorm1d(4, momentum=None), nn.BatchNorm1d(4, momentum=None), (6, 4)),
    ):
        theirs.load_state_dict(ours.state_dict())
        assert list(ours.state_dict()) == list(theirs.state_dict())
        for step in range(3):
            x = torch.randn(shape) * 3 + step
            assert torch.equal(ours(x), theirs(x))
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
        ours.eval(), theirs.eval()
        x = torch.randn(shape)
        assert torch.equal(ours(x), theirs(x))


def test_scope_is_checked():
    with pytest.raises(ValueError, match="'node' is not one of"):
        norm.set_batch_stats("node")
    assert norm.batch_stats_scope() == "global" and not norm.global_batch_stats()  # no process group


# ----------------------------------------------------------------------------- 2 processes (gloo)


def _layers(dtype: torch.dtype) -> dict[str, nn.Module]:
    """Every kind, non-trivial affine parameters and running statistics (same seed on every rank)."""
    torch.manual_seed(5)
    layers: dict[str, nn.Module] = {
        "bn1d": norm.BatchNorm1d(3),
        "bn1d-series": norm.BatchNorm1d(3),
        "bn2d": norm.BatchNorm2d(3),
        "bank": TempCNNBank([2, 3], steps=4, out_dim=5, hidden=3, depth=1, dropout=0.0),
    }
    for layer in layers.values():
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(torch.randn_like(p) * 0.3)
    return {k: v.to(dtype).train() for k, v in layers.items()}


def _inputs(dtype: torch.dtype, offset: float = 0.0) -> dict[str, list[torch.Tensor]]:
    """The global batch of each layer (rows 0..7; the bank has two members), in `dtype`'s values."""
    g = torch.Generator().manual_seed(9)
    n = sum(SIZES)

    def r(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)

    return {"bn1d": [r(n, 3)], "bn1d-series": [r(n, 3, 4)], "bn2d": [r(n, 3, 2, 2)], "bank": [r(n, 4, 2), r(n, 4, 3)]}


def _apply(name: str, layer: nn.Module, xs: list[torch.Tensor]) -> torch.Tensor:
    if name == "bank":  # fused path: batch_norm_stacked over [G, N·T, W] and [G, N, out]
        return layer(xs).transpose(0, 1)  # [N, G, out]
    return layer(xs[0])


def _run(rank: int, world: int, dtype: torch.dtype, offset: float = 0.0) -> dict:
    """Outputs, input and parameter gradients, running statistics of every layer on this rank's rows
    (world 1: all rows), for a loss whose row weights differ by rank (a missing cross-rank term shows)."""
    lo = sum(SIZES[:rank]) if world > 1 else 0
    hi = lo + (SIZES[rank] if world > 1 else sum(SIZES))
    out = {}
    for name, layer in _layers(dtype).items():
        xs = [x[lo:hi].clone().requires_grad_(True) for x in _inputs(dtype, offset)[name]]
        y = _apply(name, layer, xs)
        coeff = torch.randn(y.shape, generator=torch.Generator().manual_seed(100 + rank), dtype=torch.float64).to(dtype)
        (coeff * y).pow(2).sum().backward()  # the total loss is the sum of the ranks' losses
        out[name] = {
            "y": y.detach(),
            "coeff": coeff,
            "x_grad": [x.grad for x in xs],
            "p_grad": {k: p.grad for k, p in layer.named_parameters() if p.grad is not None},
            "buffers": {k: b.clone() for k, b in layer.named_buffers()},
        }
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        res = {
            "f64": _run(rank, world, torch.float64),
            "f32-offset": _run(rank, world, torch.float32, offset=1e3),
        }
        norm.set_batch_stats("rank")
        res["rank"] = _run(rank, world, torch.float64)
        norm.set_batch_stats("global")
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reference(dtype: torch.dtype, coeffs: dict, offset: float = 0.0, inputs: torch.dtype | None = None) -> dict:
    """One process, the whole batch, the sum of both ranks' losses (each rank's weights on its rows);
    with `inputs`, the values of that dtype computed in `dtype`."""
    out = {}
    for name, layer in _layers(dtype).items():
        xs = [x.to(dtype).clone().requires_grad_(True) for x in _inputs(inputs or dtype, offset)[name]]
        y = _apply(name, layer, xs)
        loss = sum((c * y[sum(SIZES[:r]) : sum(SIZES[: r + 1])]).pow(2).sum() for r, c in enumerate(coeffs[name]))
        loss.backward()
        out[name] = {
            "y": y.detach(),
            "x_grad": [x.grad for x in xs],
            "p_grad": {k: p.grad for k, p in layer.named_parameters() if p.grad is not None},
            "buffers": {k: b.clone() for k, b in layer.named_buffers()},
        }
    return out


def _compare(ranks: list[dict], ref: dict, tol: float) -> None:
    for name, one in ref.items():
        two = [r[name] for r in ranks]
        torch.testing.assert_close(torch.cat([t["y"] for t in two]), one["y"], rtol=tol, atol=tol, msg=name)
        for i, g in enumerate(one["x_grad"]):
            grads = torch.cat([t["x_grad"][i] for t in two])
            torch.testing.assert_close(grads, g, rtol=tol, atol=tol, msg=f"{name} input grad")
        for k, g in one["p_grad"].items():  # each rank's parameter gradient is its loss's: they add up
            torch.testing.assert_close(two[0]["p_grad"][k] + two[1]["p_grad"][k], g, rtol=tol, atol=tol, msg=f"{name} {k}")
        for k, b in one["buffers"].items():
            for t in two:
                torch.testing.assert_close(t["buffers"][k], b, rtol=tol, atol=tol, msg=f"{name} {k}")


def test_two_ranks_equal_one_process_every_batch_norm(tmp_path):
    """BatchNorm1d ([N, C] and [N, C, T]), BatchNorm2d and the fused stacked BatchNorm of a TempCNN
    bank on 3 + 5 rows equal one process on 8: outputs, input and parameter gradients (the cross-rank
    terms included), running statistics — to float64 rounding; in float32 with a mean 500 × the
    spread, to 1e-5 of the float64 truth (a float32 sum of squares would be ~1 % off). Per-rank statistics (scope "rank") do not."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    coeffs = {name: [r["f64"][name]["coeff"] for r in res] for name in res[0]["f64"]}
    _compare([r["f64"] for r in res], _reference(torch.float64, coeffs), tol=1e-12)
    coeffs32 = {name: [r["f32-offset"][name]["coeff"] for r in res] for name in res[0]["f32-offset"]}
    ref32 = _reference(torch.float64, {k: [c.double() for c in v] for k, v in coeffs32.items()}, 1e3, torch.float32)
    for name in ref32:  # float32 ranks against the float64 truth: what float32 inputs allow
        torch.testing.assert_close(
            torch.cat([r["f32-offset"][name]["y"] for r in res]).double(), ref32[name]["y"], rtol=1e-5, atol=1e-4, msg=name
        )
        for k, b in ref32[name]["buffers"].items():
            if "running_var" in k:
                torch.testing.assert_close(res[0]["f32-offset"][name]["buffers"][k].double(), b, rtol=1e-5, atol=1e-6, msg=k)
    with pytest.raises(AssertionError):
        _compare([r["rank"] for r in res], _reference(torch.float64, coeffs), tol=1e-6)
    rank_stats = [r["rank"]["bn1d"]["buffers"]["running_mean"] for r in res]
    assert not torch.allclose(rank_stats[0], rank_stats[1])


def test_stacked_batch_norm_plain_and_fused_agree_without_ranks():
    """batch_norm_stacked (the fused path) against nn.BatchNorm1d per group, one process."""
    torch.manual_seed(1)
    x = torch.randn(3, 10, 4, dtype=torch.float64)
    bns = [nn.BatchNorm1d(4).double() for _ in range(3)]
    w, b = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    zeros, ones = torch.zeros(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
    out, mean, var = batch_norm_stacked(x, w, b, zeros, ones, True, 0.1, 1e-5)
    for g, bn in enumerate(bns):
        with torch.no_grad():
            bn.weight.copy_(w[g]), bn.bias.copy_(b[g])
        torch.testing.assert_close(out[g], bn(x[g]))
        torch.testing.assert_close(mean[g], bn.running_mean)
        torch.testing.assert_close(var[g], bn.running_var)
