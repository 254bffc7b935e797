"""Process start-up and exit: a stale DeepSpeed op build lock is an error with a message, not a silent
hang; the process group is destroyed at a normal exit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from colearn_dist.launch import DEEPSPEED_CPU_OP, wait_for_op_build


def test_a_stale_op_build_lock_fails_with_its_path(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    wait_for_op_build(timeout_s=0)  # no lock: no wait, no message
    assert capsys.readouterr().err == ""
    lock = tmp_path / DEEPSPEED_CPU_OP / "lock"
    lock.write_text("")  # what an interrupted build leaves
    with pytest.raises(RuntimeError, match=f"{lock} is still there after 0 s.*rm {lock}"):
        wait_for_op_build(timeout_s=0, poll_s=0)
    assert f"waiting for {lock}" in capsys.readouterr().err


def test_process_group_destroyed_at_normal_exit(tmp_path):
    """init_distributed registers close_distributed with atexit, once: the group is gone before the
    interpreter's teardown (where gloo's threads can abort a finished run)."""
    script = """
import atexit, torch.distributed as dist
from colearn_dist import launch
calls = []
real = launch.close_distributed
def counted():
    calls.append(1)
    real()
atexit.unregister(real)
launch.close_distributed = counted
launch.init_distributed()
launch.init_distributed()  # a second trainer in the same process
assert dist.is_initialized()
atexit._run_exitfuncs()
print(dist.is_initialized(), len(calls))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "1"]
