"""runlock.py: one writer per run directory; the lock of a process that died never blocks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from colearn_dist.runlock import RunLock, RunLockedError

HOLD = (
    "import sys, time; from colearn_dist.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"
)


def test_a_second_writer_is_refused_and_a_dead_holder_is_detected(tmp_path):
    env = {**os.environ, "SLURM_JOB_ID": "4242"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"host {socket.gethostname()}, pid {holder.pid}, Slurm job 4242"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)  # dies without releasing: the kernel drops its flock
        holder.wait()
    lock = RunLock(tmp_path)
    lock.acquire()
    assert lock.stale is not None and lock.stale["pid"] == holder.pid  # said in train.log by the trainer
    lock.release()
    again = RunLock(tmp_path)
    again.acquire()
    assert again.stale is None  # a clean release leaves no stale holder behind
    again.release()


def test_one_process_may_open_its_run_twice(tmp_path):
    a, b = RunLock(tmp_path), RunLock(tmp_path)
    a.acquire()
    b.acquire()
    a.release()
    out = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode != 0 and "RunLockedError" in out.stderr  # b still holds it
    b.release()
    out = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", "pass"), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_train_refuses_a_run_another_process_writes(run_shards, tmp_path, capsys):
    from colearn_dist.cli import main

    from helpers import write_config

    cfg = write_config(tmp_path / "c.yaml", run_shards, tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", str(cfg)]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert f"another process is writing this run (host {socket.gethostname()}, pid {holder.pid}" in err
    assert not (tmp_path / "run" / "checkpoints").exists()
