"""Stop signals caught from a process's first moment: one that arrives before the trainer exists
(Slurm's warning while torch is still being imported) is kept, not fatal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

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


def test_ranks_agree_on_the_signal_that_names_the_stop():
    def summed(*ranks: StopRequested) -> list[float]:
        return [sum(v) for v in zip(*(r.votes() for r in ranks))]

    quiet, term, warned, drill = StopRequested(), StopRequested(), StopRequested(), StopRequested()
    term._handle(signal.SIGTERM, None)
    warned._handle(signal.SIGUSR2, None)
    drill.flag = True  # COLEARN_STOP_AFTER_STEPS: a stop with no signal
    assert not StopRequested().agree(summed(quiet, StopRequested())) and not quiet.flag
    assert quiet.agree(summed(quiet, term)) and (quiet.flag, quiet.signal) == (True, signal.SIGTERM)
    assert term.agree(summed(term, warned)) and term.signal == signal.SIGUSR2  # a warning anywhere names it
    assert drill.agree(summed(drill, StopRequested())) and drill.signal is None


def _agree_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from colearn_dist.engine import Trainer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        trainer = SimpleNamespace(stop=StopRequested(), world=2, _stop_after=0, _steps_here=0, _step_delay=0.0)
        first = Trainer._stop_agreed(trainer)  # nobody signalled yet
        if rank == 1:
            trainer.stop._handle(signal.SIGTERM, None)  # scancel's SIGTERM reached this node first
        second = Trainer._stop_agreed(trainer)
        Path(out_dir, f"r{rank}").write_text(f"{first} {second} {trainer.stop.signal}")
    finally:
        dist.destroy_process_group()


def test_a_rank_told_of_the_stop_by_another_stops_for_the_same_signal(tmp_path):
    """Rank 0 learning of scancel's SIGTERM from rank 1 must not stop as for a time limit (signal None)."""
    import torch.multiprocessing as mp

    from colearn_dist.launch import free_port

    mp.spawn(_agree_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    expected = f"False True {int(signal.SIGTERM)}"
    assert [(tmp_path / f"r{r}").read_text() for r in (0, 1)] == [expected, expected]


def test_step_delay_and_stop_after_drills_act_at_each_step_boundary(monkeypatch):
    """COLEARN_STEP_DELAY_S slows every step (so a test can interrupt a run on any machine);
    COLEARN_STOP_AFTER_STEPS stops at its step, with no signal (a time limit's stand-in)."""
    import colearn_dist.engine as engine

    slept: list[float] = []
    monkeypatch.setattr(engine.time, "sleep", slept.append)
    trainer = SimpleNamespace(stop=StopRequested(), world=1, _stop_after=3, _steps_here=0, _step_delay=0.25)
    assert [engine.Trainer._stop_agreed(trainer) for _ in range(3)] == [False, False, True]
    assert slept == [0.25] * 3 and trainer.stop.signal is None


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
