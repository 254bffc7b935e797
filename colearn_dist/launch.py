"""Where processes come from: one process, a local multi-process launch, or Slurm tasks.

All three end in `init_distributed`, which reads the rendezvous from the environment the launcher
left (torchrun / DeepSpeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; Slurm:
SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first node of SLURM_JOB_NODELIST) so that the
training code path is the same everywhere.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.cpp_extension import _get_build_directory


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0].split("[")[0] or "127.0.0.1"


def rendezvous_from_env() -> ProcessInfo:
    """Fill the torch.distributed variables from whichever launcher started us; default: one process."""
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("LOCAL_WORLD_SIZE", env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        env.setdefault("MASTER_ADDR", _slurm_master_addr())
        # Same port on every task of the job without talking to each other: derived from the job id.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if "RANK" not in env:
        env.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
        env.setdefault("MASTER_ADDR", "127.0.0.1")
    world = int(env["WORLD_SIZE"])
    return ProcessInfo(
        rank=int(env["RANK"]),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
    )


# The op DeepSpeed compiles on CPU when it starts (deepspeed.comm.torch.build_shm_op), into the
# user's torch extensions cache (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions/…).
DEEPSPEED_CPU_OP = "deepspeed_shm_comm"


def build_deepspeed_op() -> None:
    """Compile DeepSpeed's CPU op once (launchers/setup.sh), so that jobs only load it."""
    from deepspeed.comm.torch import build_shm_op

    build_shm_op()


def wait_for_op_build(timeout_s: float | None = None, poll_s: float = 2.0) -> None:
    """torch holds `<build dir>/lock` while it compiles an op and every later process waits for it
    to go, without a timeout: a lock left by an interrupted build hangs every job after it,
    silently. Wait here with a message instead, and fail after COLEARN_OP_BUILD_TIMEOUT_S (600 s)."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("COLEARN_OP_BUILD_TIMEOUT_S", "600"))
    lock = Path(_get_build_directory(DEEPSPEED_CPU_OP, verbose=False)) / "lock"
    if not lock.exists():
        return
    print(f"waiting for {lock} (DeepSpeed's CPU op being built by another process, or a stale lock)", file=sys.stderr, flush=True)
    deadline = time.monotonic() + timeout_s
    while lock.exists():
        if time.monotonic() >= deadline:
            raise RuntimeError(
                f"{lock} is still there after {timeout_s:.0f} s: DeepSpeed's CPU op build is stuck, or an interrupted "
                f"build left the lock. If no other job is building it, delete the lock (rm {lock}); "
                f"launchers/setup.sh builds the op once for all jobs"
            )
        time.sleep(poll_s)


def init_distributed() -> ProcessInfo:
    """Initialise the process group (nccl on GPU, gloo on CPU) through DeepSpeed."""
    import deepspeed

    info = rendezvous_from_env()
    wait_for_op_build()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized() and info.world_size == 1 and "MASTER_PORT" not in os.environ:
        # One process needs no network rendezvous: a file store cannot collide on a port with
        # other jobs on the same machine.
        store = tempfile.NamedTemporaryFile(prefix="colearn-pg-", delete=False).name
        torch.distributed.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    atexit.unregister(close_distributed)  # one entry however many trainers a process makes
    atexit.register(close_distributed)
    return info


def close_distributed() -> None:
    """Destroy the process group at a normal exit, while the interpreter is still whole (what PyTorch
    asks of a program, pytorch/pytorch#190489). It did not alone stop the teardown abort of finished
    2-rank runs ("terminate called without an active exception", exit -6: seen again with it in
    place); torchrun ranks skip the teardown, and with it this handler, through `cli.exit_rank`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def cli_command(argv: list[str], nproc: int | None = None) -> list[str]:
    """The command line of `colearn-dist <argv>` in this interpreter; through torchrun with `nproc`
    local processes if `nproc` is given."""
    if nproc is None:
        return [sys.executable, "-m", "colearn_dist.cli", *argv]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "colearn_dist.cli",
        *argv,
    ]


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run `colearn-dist <argv>` in `nproc` local processes through torchrun; returns its exit code."""
    return subprocess.call(cli_command(argv, nproc))
