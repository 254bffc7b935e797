"""Stop signals caught from a process's first moment: one that arrives before the trainer exists
(Slurm's warning while torch is still being imported) is kept, not fatal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from colearn_dist.signals import STOP_SIGNALS, StopRequested, catch_early

from helpers import write_config


def test_a_signal_before_the_trainer_is_kept_not_fatal():
    script = (
        "import os, signal\n"
        "from colearn_dist.signals import StopRequested, catch_early\n"
        "catch_early()\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"  # Python's default action: exit 138, no checkpoint
        "import torch\n"
        "stop = StopRequested(); stop.install()\n"
        "print(stop.flag, stop.signal)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", str(int(signal.SIGUSR1))]


def test_the_first_signal_names_the_stop():
    stop = StopRequested()
    stop._handle(signal.SIGUSR2, None)
    stop._handle(signal.SIGTERM, None)  # Slurm's SIGTERM at the time limit after its warning
    assert stop.flag and stop.signal == signal.SIGUSR2


def test_an_early_signal_stops_training_at_its_first_step_with_a_checkpoint(run_shards, tmp_path):
    from colearn_dist.config import load_config
    from colearn_dist.engine import train

    cfg = load_config(write_config(tmp_path / "c.yaml", run_shards, tmp_path / "run", train={"epochs": 2}))
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)}
    try:
        catch_early()
        os.kill(os.getpid(), signal.SIGUSR2)
        result = train(cfg)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    assert result == {"status": "stopped", "step": 1, "signal": signal.SIGUSR2}
    assert "stop requested (signal 12): checkpoint step000000001 written" in (tmp_path / "run" / "train.log").read_text()


def test_a_finished_run_ignores_late_stop_signals(monkeypatch, tmp_path):
    """A time-limit warning that lands while a finished job's Python shuts down (when Python gives
    signals their default, fatal action back) made Slurm mark the finished job FAILED: `train` and
    the Slurm job ignore stop signals once the run is saved."""
    import colearn_dist.cli as cli
    import colearn_dist.slurm as slurm

    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        cfg = write_config(tmp_path / "c.yaml", tmp_path / "shards", tmp_path / "run")
        monkeypatch.setattr(cli, "train", lambda *a, **k: {"status": "finished"})
        assert cli.main(["train", str(cfg)]) == 0
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in STOP_SIGNALS)
        os.kill(os.getpid(), signal.SIGUSR2)  # ignored: the test process lives on

        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        monkeypatch.setattr(slurm, "train", lambda *a, **k: {"status": "finished"})
        monkeypatch.setattr(
            slurm.submitit.helpers, "TorchDistributedEnvironment", lambda: type("E", (), {"export": lambda self, **k: None})()
        )
        assert slurm.TrainJob(str(cfg), [])()["status"] == "finished"
        assert all(signal.getsignal(sig) == signal.SIG_IGN for sig in STOP_SIGNALS)
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
