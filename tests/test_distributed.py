"""distributed.py: identity without a process group, gradient-exact uneven all-gather, thread budget."""

from __future__ import annotations

import os
import platform
import resource
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from colearn_dist import distributed as D

torch.set_num_threads(1)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- single process


def test_identity_without_process_group():
    x = torch.randn(4, 3, requires_grad=True)
    g, offset = D.gather_with_grad(x)
    assert g is x and offset == 0
    assert D.rank() == 0 and D.world_size() == 1 and not D.is_distributed()
    t = torch.tensor([1.0, 2.0], requires_grad=True)
    r = D.all_reduce_sum(t)
    assert torch.equal(r, t.detach()) and not r.requires_grad
    r += 1  # a copy: the caller's tensor is untouched
    assert torch.equal(t.detach(), torch.tensor([1.0, 2.0]))
    assert D.global_count(7) == 7
    assert D.all_reduce_with_grad(x) is x
    assert D.agree_with_rank0(torch.nn.BatchNorm1d(2)) == {"buffers": 0.0, "parameters": 0.0}


@pytest.mark.parametrize(
    "local_world, workers, cores, expected",
    [
        (1, 0, 16, 16),  # one rank, no workers: every core
        (2, 3, 16, 5),  # 16 // 2 = 8 per rank, 3 go to loader workers
        (4, 1, 16, 3),
        (2, 1, 2, 1),  # oversubscribed: never below 1
        (8, 0, 4, 1),
        (3, 0, 16, 5),  # floor: 3 × 5 = 15 ≤ 16
    ],
)
def test_threads_per_rank_arithmetic(local_world, workers, cores, expected):
    t = D.threads_per_rank(local_world, workers, cores)
    assert t == expected
    if local_world * (1 + workers) <= cores:
        assert local_world * (t + workers) <= cores


def test_threads_per_rank_reads_slurm_and_affinity(monkeypatch):
    affinity = len(os.sched_getaffinity(0))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert D.available_cores() == affinity
    assert D.threads_per_rank(1, 0) == affinity
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert D.available_cores() == 1
    assert D.threads_per_rank(1, 0) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(affinity + 100))  # never more than the affinity
    assert D.available_cores() == affinity


def test_configure_threads_sets_torch_and_child_env(monkeypatch):
    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.delenv(var, raising=False)
    try:
        D.configure_threads(2)
        assert torch.get_num_threads() == 2
        assert os.environ["OMP_NUM_THREADS"] == "2" and os.environ["MKL_NUM_THREADS"] == "2"
        D.configure_threads(0)  # clamped
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


_REALLOC_FAULTS = """
import ctypes, resource, sys
from colearn_dist.distributed import keep_freed_memory
took = keep_freed_memory() if sys.argv[1] == "1" else False
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
faults = []
for _ in range(2):  # 64 blocks of 1 MiB, written, freed; then the same again
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [libc.malloc(1 << 20) for _ in range(64)]
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    for b in reversed(blocks):
        libc.free(b)
print(took, faults[1])
"""


def _realloc_faults(keep: bool, env: dict[str, str] | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _REALLOC_FAULTS, "1" if keep else "0"], capture_output=True, text=True, env=env, check=True)
    took, faults = out.stdout.split()
    return took, int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_keep_freed_memory_reuses_freed_blocks_without_page_faults():
    pages = 64 * (1 << 20) // resource.getpagesize()
    took, faults = _realloc_faults(keep=True)
    assert took == "True" and faults < pages // 8  # the freed MiBs come back already mapped
    _, default = _realloc_faults(keep=False)
    assert default > pages // 2  # glibc's default maps them afresh: the case the setting is for
    # a user's own malloc tunables stay in charge
    took, _ = _realloc_faults(keep=True, env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert took == "False"


# ----------------------------------------------------------------------------- 2 processes (gloo)

SIZES = [3, 5]  # uneven local batches
EMPTY_SIZES = [2, 0]  # a rank with no rows at all


def _coeffs(world: int, total: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    """A different loss weighting per rank, so a missing cross-rank gradient would show."""
    gen = torch.Generator().manual_seed(1)
    return [torch.randn((total, *shape), generator=gen, dtype=torch.float64) for _ in range(world)]


def _gather_worker(rank: int, world: int, port: int, data: torch.Tensor, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {"rank": D.rank(), "world": D.world_size(), "is_dist": D.is_distributed()}
        for name, sizes in (("uneven", SIZES), ("empty", EMPTY_SIZES)):
            lo = sum(sizes[:rank])
            x = data[lo : lo + sizes[rank]].clone().requires_grad_(True)
            g, offset = D.gather_with_grad(x)
            c = _coeffs(world, sum(sizes), tuple(data.shape[1:]))[rank]
            loss = (c * g.pow(2)).sum() + (c * g).sum()  # depends on every rank's rows
            loss.backward()
            results[name] = {"gathered": g.detach(), "offset": offset, "grad": x.grad.clone()}
        results["count"] = D.global_count(SIZES[rank])
        results["sum"] = D.all_reduce_sum(torch.tensor([float(rank + 1), 10.0 * rank], requires_grad=True))
        # the differentiable all-reduce: forward the sum, backward the sum of the ranks' gradients
        x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True) * (rank + 1)
        x.retain_grad()
        total = D.all_reduce_with_grad(x)
        (total * torch.tensor([1.0, -1.0], dtype=torch.float64) * (rank + 2)).sum().backward()
        results["reduced"] = {"total": total.detach(), "grad": x.grad.clone()}
        # rank 0's buffers on every rank, and how far each rank was from them
        bn = torch.nn.BatchNorm1d(2)
        bn.running_mean.fill_(float(rank))  # per-rank statistics
        results["agree_bn"] = D.agree_with_rank0(bn)
        results["agree_bn_after"] = D.agree_with_rank0(bn)
        results["bn_mean"] = bn.running_mean.clone()
        lin = torch.nn.Linear(2, 2)
        with torch.no_grad():
            lin.weight.fill_(1.0 + rank)
        results["agree_params"] = D.agree_with_rank0(lin)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gather_with_grad_two_processes_uneven(tmp_path):
    world = 2
    data = torch.randn(max(sum(SIZES), sum(EMPTY_SIZES)), 2, 3, dtype=torch.float64)
    mp.spawn(_gather_worker, args=(world, free_port(), data, str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    for r in range(world):
        assert res[r]["rank"] == r and res[r]["world"] == world and res[r]["is_dist"]
        assert res[r]["count"] == sum(SIZES)
        torch.testing.assert_close(res[r]["sum"], torch.tensor([3.0, 10.0]), rtol=0, atol=0)
        assert not res[r]["sum"].requires_grad
        torch.testing.assert_close(res[r]["reduced"]["total"], torch.tensor([3.0, 6.0], dtype=torch.float64), rtol=0, atol=0)
        # d(Σ_q loss_q)/dx_r with loss_q = (q + 2)·(t_0 − t_1): 2 + 3 = 5 for each rank's first entry
        torch.testing.assert_close(res[r]["reduced"]["grad"], torch.tensor([5.0, -5.0], dtype=torch.float64), rtol=0, atol=0)
        assert res[r]["agree_bn"] == {"buffers": 1.0, "parameters": 0.0}
        assert res[r]["agree_bn_after"] == {"buffers": 0.0, "parameters": 0.0}
        torch.testing.assert_close(res[r]["bn_mean"], torch.zeros(2), rtol=0, atol=0)
        assert res[r]["agree_params"]["parameters"] > 0  # checked, not overwritten

    for name, sizes in (("uneven", SIZES), ("empty", EMPTY_SIZES)):
        total = sum(sizes)
        full = data[:total]
        cs = _coeffs(world, total, tuple(data.shape[1:]))
        # d(Σ_s loss_s)/d(global) — the gradient every rank's loss sends to each row
        expected = sum(2 * c * full + c for c in cs)
        for r in range(world):
            lo = sum(sizes[:r])
            out = res[r][name]
            assert out["offset"] == lo
            torch.testing.assert_close(out["gathered"], full, rtol=0, atol=0)
            assert out["grad"].shape == (sizes[r], 2, 3)
            torch.testing.assert_close(out["grad"], expected[lo : lo + sizes[r]], rtol=1e-12, atol=1e-12)
