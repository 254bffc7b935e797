"""Rank / world helpers, a gradient-exact all-gather for uneven local batches, and the process's
thread and host-memory settings.

Everything here degrades to the identity without `torch.distributed`, so the objective and the
engine run the same code on 1 process and on N.
"""

from __future__ import annotations

import ctypes
import os

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """True only when collectives are needed: a process group exists and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient for this rank's rows.

    The loss on rank s uses rank r's rows as contrastive candidates, so d(total)/d(x_r) needs the
    gradients of every rank's loss, not only the local one (the "put the local tensor back"
    shortcut silently drops those terms). Backward therefore all-reduces the gradient of the
    gathered tensor and keeps this rank's slice. With DeepSpeed's 1/world averaging of parameter
    gradients this gives exactly the gradient of the mean of the per-rank losses.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:
        largest = max(sizes)
        padded = x.new_zeros((largest, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        offset = sum(ctx.sizes[: ctx.rank])
        return grad[offset : offset + ctx.sizes[ctx.rank]], None


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Global batch along dim 0 (ranks in order, local sizes may differ) and this rank's row offset.

    Collective: every rank must call it (and backpropagate through it) in the same order.
    """
    if not is_distributed():
        return x, 0
    sizes = _gather_sizes(x.shape[0], x.device)
    return _GatherWithGrad.apply(x, sizes), sum(sizes[: dist.get_rank()])


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward is the same sum of the ranks' gradients: every rank's loss
    depends on the total, so d(Σ_q loss_q)/d(x_r) = Σ_q d(loss_q)/d(total) (as in `_GatherWithGrad`)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum of `x` over ranks, differentiable (global batch statistics, see norm.py); the identity
    without ranks. Collective: every rank must call it, and backpropagate through it, in the same order."""
    if not is_distributed():
        return x
    return _AllReduceWithGrad.apply(x)


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum over ranks of a detached copy (normalisers, logging); never carries gradient.

    NCCL reduces only CUDA tensors, so a CPU tensor (a flag, a count) makes the trip to the
    current device and comes back; callers need not know the backend.
    """
    t = t.detach().clone()
    if not is_distributed():
        return t
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        work = t.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(work, op=dist.ReduceOp.SUM)
        return work.to(t.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def global_count(n: int) -> int:
    """Number of samples over all ranks (local batches may differ in size)."""
    return int(all_reduce_sum(torch.tensor([n], dtype=torch.long)).item())


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by Slurm's allotment when set.

    Slurm without cgroup confinement leaves the affinity at the whole node, so SLURM_CPUS_PER_TASK
    is the honest figure there; with confinement the affinity is already right and the min is a no-op.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm:
        try:
            cores = min(cores, int(slurm))
        except ValueError:
            pass
    return max(1, cores)


def threads_per_rank(local_world_size: int, loader_workers: int, cores: int | None = None) -> int:
    """Intra-op threads per rank such that ranks × (threads + loader workers) ≤ cores, at least 1.

    Each loader worker decodes while the rank computes, so it occupies a core of its own.
    Oversubscribing is far worse than under-using: torch's OpenMP threads spin-wait at barriers,
    and 2 threads on a core shared with a busy process were measured 40× slower than 1 thread.
    `local_world_size` is the number of ranks sharing the same pool of `cores`.
    """
    if cores is None:
        cores = available_cores()
    local_world_size = max(1, int(local_world_size))
    loader_workers = max(0, int(loader_workers))
    return max(1, cores // local_world_size - loader_workers)


def configure_threads(n: int) -> None:
    """Set torch's intra-op threads and the OpenMP/MKL env that child processes inherit.

    Children (spawned ranks, loader workers) read OMP_NUM_THREADS at start-up; without it each one
    would default to every core and oversubscribe the machine (see `threads_per_rank`).
    """
    n = max(1, int(n))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        # only settable before the first inter-op parallel work; harmless to keep the default then
        pass


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed blocks for reuse instead of handing them back to the kernel.

    By default glibc serves a block above a moving threshold with its own mmap, unmaps it when it is
    freed and trims the heap's free top, so a training step that frees and re-allocates the same
    activations page-faults them in again every step: measured up to 4,800 minor faults and 7 ms of
    system time per batch-256 MDiCo step on one CPU thread. Blocks up to `mmap_threshold` (32 MiB,
    glibc's most) then come from the heap, which keeps up to `trim_threshold` free: the process holds
    its peak working set, as a caching allocator does. Returns whether it took effect: not with
    another C library, nor where the user set malloc tunables (GLIBC_TUNABLES, MALLOC_*_), which stay
    in charge.
    """
    if any(v in os.environ for v in _MALLOC_ENV) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def agree_with_rank0(module: torch.nn.Module) -> dict[str, float]:
    """Make every rank hold rank 0's buffers (BatchNorm running statistics …) and say how far each
    had been from them: {"buffers": largest difference on any rank, "parameters": the same for a
    fingerprint of the parameters (per tensor: sum and sum of squares, float64)}.

    Validation is split across ranks but only rank 0's weights are saved: for the recorded score to
    be the score of the saved weights, every rank must score with rank 0's model. With global batch
    statistics the buffers are identical by construction and both figures are 0; with per-rank
    statistics the buffers differ and rank 0's are taken. Parameters are only checked (DeepSpeed
    keeps them equal; an optimizer's master copy would undo an overwrite). Two collectives plus one
    broadcast per buffer dtype; a no-op on one process.
    """
    if not is_distributed():
        return {"buffers": 0.0, "parameters": 0.0}
    gaps = []
    buffers = list(module.buffers())
    for dtype in sorted({b.dtype for b in buffers}, key=str):
        group = [b for b in buffers if b.dtype == dtype]
        mine = torch.cat([b.detach().reshape(-1) for b in group])
        theirs = mine.clone()
        dist.broadcast(theirs, src=0)
        if mine.numel():
            gaps.append((mine.double() - theirs.double()).abs().max())
        offset = 0
        with torch.no_grad():
            for b in group:
                b.copy_(theirs[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
    params = [p.detach().double() for p in module.parameters()]
    mine = torch.stack([torch.stack([p.sum(), (p * p).sum()]) for p in params]).reshape(-1) if params else torch.zeros(1)
    theirs = mine.clone()
    dist.broadcast(theirs, src=0)
    buffer_gap = torch.stack(gaps).max().to(mine) if gaps else torch.zeros((), dtype=mine.dtype, device=mine.device)
    worst = torch.stack([buffer_gap, (mine - theirs).abs().max()])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"buffers": float(worst[0]), "parameters": float(worst[1])}
