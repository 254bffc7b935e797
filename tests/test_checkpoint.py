"""Checkpoints: only complete ones are ever resumed from, the pointer's loss is survived, keep-K."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from colearn_dist.checkpoint import COMPLETE, LATEST, Checkpointer


class FakeEngine:
    """What Checkpointer needs of a DeepSpeed engine: save/load a tag directory with client state."""

    def __init__(self) -> None:
        self.loaded: str | None = None

    def save_checkpoint(self, root: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        assert save_latest is False  # our pointer, written after the `complete` marker, is the only one
        (Path(root) / tag).mkdir(parents=True)
        torch.save(client_state, Path(root) / tag / "client.pt")

    def load_checkpoint(self, root: str, tag: str, **_: Any) -> tuple[str, dict[str, Any]]:
        self.loaded = tag
        return str(Path(root) / tag), torch.load(Path(root) / tag / "client.pt", weights_only=False)


def steps(ck: Checkpointer) -> list[str]:
    return sorted(p.name for p in ck.root.iterdir() if p.is_dir())


def test_save_load_keep_and_prune(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    engine = FakeEngine()
    assert ck.latest() is None
    for step in (5, 10, 15):
        ck.save(engine, step, {"step": step})
    assert steps(ck) == ["step000000010", "step000000015"]
    assert ck.latest() == ck.root / "step000000015"
    assert (ck.root / LATEST).read_text() == "step000000015"
    assert ck.load(engine, ck.latest()) == {"step": 15} and engine.loaded == "step000000015"


def test_half_written_checkpoint_is_never_used_and_is_cleaned_up(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    engine = FakeEngine()
    ck.save(engine, 4, {"step": 4})
    # a job killed while writing step 8: the directory exists, its `complete` marker does not
    (ck.root / "step000000008").mkdir()
    assert ck.latest() == ck.root / "step000000004"
    (ck.root / LATEST).write_text("step000000008")  # even a pointer to it is not trusted
    assert ck.latest() == ck.root / "step000000004"
    ck.save(engine, 12, {"step": 12})
    assert steps(ck) == ["step000000004", "step000000012"]


def test_lost_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    engine = FakeEngine()
    for step in (1, 2, 3):
        ck.save(engine, step, {"step": step})
    (ck.root / LATEST).unlink()
    assert ck.latest() == ck.root / "step000000003"
    (ck.root / "step000000003" / COMPLETE).unlink()
    assert ck.latest() == ck.root / "step000000002"


def test_keep_zero_keeps_all_and_universal_copies_go_with_their_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path, keep=0)
    engine = FakeEngine()
    for step in (1, 2, 3):
        ck.save(engine, step, {"step": step})
    assert len(steps(ck)) == 3
    universal = ck.root / "step000000001_universal"
    universal.mkdir()
    (universal / COMPLETE).write_text("")
    assert ck.latest() == ck.root / "step000000003"  # a conversion is never a resume point of its own
    ck.keep = 1
    ck.save(engine, 4, {"step": 4})
    assert steps(ck) == ["step000000004"]


def test_changed_config_refuses_to_resume_unless_allowed(run_shards, tmp_path):
    from colearn_dist.config import load_config
    from colearn_dist.engine import ResumeError, Trainer, train

    from helpers import write_config

    cfg_path = write_config(tmp_path / "c.yaml", run_shards, tmp_path / "run", train={"epochs": 1})
    assert train(load_config(cfg_path))["status"] == "finished"
    changed = load_config(cfg_path, ["train.lr=0.01"])
    with pytest.raises(ResumeError, match="config differs.*--allow-config-change"):
        Trainer(changed)
    # what only changes how a run executes may change between allocations
    assert Trainer(load_config(cfg_path, ["data.workers=1", "train.threads=2"])).step > 0
    assert Trainer(changed, allow_config_change=True).step > 0


# ---------------------------------------------------------------- nothing in a run directory runs code
class Planted:
    """A pickle that creates `marker` when unpickled: what an attacker would plant in a run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path) -> None:
    torch.save({"model": Planted(marker), "module": Planted(marker)}, path)


@pytest.fixture(scope="module")
def two_checkpoints(run_shards, tmp_path_factory):
    """A finished 2-epoch ZeRO-1 run (optimizer state in its own file) with two checkpoints."""
    from colearn_dist.config import load_config
    from colearn_dist.engine import train

    from helpers import write_config

    root = tmp_path_factory.mktemp("ckpt-run")
    cfg = write_config(root / "c.yaml", run_shards, root / "run", train={"epochs": 2, "keep_checkpoints": 2}, engine={"zero_stage": 1})
    train(load_config(cfg))
    return root / "run"


def copy_run(run: Path, tmp_path: Path):
    """A copy of the run with its own config (run_dir pointing at the copy)."""
    import shutil

    import yaml

    from colearn_dist.config import load_config

    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    data = yaml.safe_load((dst / "config.yaml").read_text())
    data["run_dir"] = str(dst)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(data))
    ck = Checkpointer(dst)
    return dst, load_config(tmp_path / "c.yaml"), ck.candidates()


def test_planted_best_weights_never_run(two_checkpoints, tmp_path, capsys):
    from colearn_dist.checkpoint import CheckpointError
    from colearn_dist.cli import main
    from colearn_dist.runs import init_from_pretrained, load_trained

    run, _, _ = copy_run(two_checkpoints, tmp_path)
    marker = tmp_path / "pwned"
    plant(run / "best" / "all.pt", marker)
    plant(run / "best" / "s1.pt", marker)
    with pytest.raises(CheckpointError, match=r"all\.pt: refused, it holds more than weights"):
        load_trained(run, "all")  # evaluate, and a distillation student's model.teacher
    with pytest.raises(CheckpointError, match=r"all\.pt: refused"):
        init_from_pretrained(torch.nn.Linear(1, 1), run)  # model.init_from
    assert main(["export", str(run), "--modality", "s1", "--out", str(tmp_path / "s1.pt2")]) == 2
    assert "s1.pt: refused, it holds more than weights" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "rng_rank00000.pt"])
def test_planted_checkpoint_files_never_run(two_checkpoints, tmp_path, victim):
    from colearn_dist.checkpoint import CheckpointError
    from colearn_dist.engine import Trainer

    run, cfg, (newest, older) = copy_run(two_checkpoints, tmp_path)
    marker = tmp_path / "pwned"
    plant(newest / victim, marker)
    trainer = Trainer(cfg)  # falls back to the older checkpoint, says which file it refused
    assert trainer.step == int(older.name.removeprefix("step")) and not marker.exists()
    log = (run / "train.log").read_text()
    assert f"checkpoint {newest.name} does not load: {newest / victim}: refused" in log
    assert f"falling back to {older.name}" in log
    plant(older / victim, marker)
    with pytest.raises(CheckpointError, match="no checkpoint loads"):
        Trainer(cfg)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated model", "truncated rng", "bad state.json"])
def test_damaged_checkpoint_is_named_and_the_previous_one_used(two_checkpoints, tmp_path, damage):
    from colearn_dist.engine import Trainer

    run, cfg, (newest, older) = copy_run(two_checkpoints, tmp_path)
    name = {"truncated model": "mp_rank_00_model_states.pt", "truncated rng": "rng_rank00000.pt", "bad state.json": "state.json"}[damage]
    file = newest / name
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    trainer = Trainer(cfg)
    assert trainer.step == int(older.name.removeprefix("step"))
    assert f"checkpoint {newest.name} does not load: {file}" in (run / "train.log").read_text()
    assert newest.exists()  # kept for inspection, not deleted


def test_latest_never_leads_out_of_the_run(tmp_path):
    other = Checkpointer(tmp_path / "other")
    other.save(FakeEngine(), 9, {"step": 9})
    notes: list[str] = []
    ck = Checkpointer(tmp_path / "run", log=notes.append)
    ck.save(FakeEngine(), 3, {"step": 3})
    for target in ("/etc", "../../other/checkpoints/step000000009", str(other.root / "step000000009")):
        (ck.root / LATEST).write_text(target)
        assert ck.latest() == ck.root / "step000000003"
        assert f"{target!r} is not a checkpoint of this run; ignored" in notes[-1]
    # a linked tag directory is not one of the run's checkpoints either
    (ck.root / "step000000010").symlink_to(other.root / "step000000009")
    (ck.root / LATEST).write_text("step000000010")
    assert ck.latest() == ck.root / "step000000003"
    # `latest` as a directory: named, not an IsADirectoryError
    (ck.root / LATEST).unlink()
    (ck.root / LATEST).mkdir()
    assert ck.latest() == ck.root / "step000000003" and "not a pointer file" in notes[-1]


def test_removing_an_incomplete_checkpoint_is_said(tmp_path):
    notes: list[str] = []
    ck = Checkpointer(tmp_path, keep=2, log=notes.append)
    ck.save(FakeEngine(), 1, {"step": 1})
    (ck.root / "step000000002").mkdir()
    ck.save(FakeEngine(), 3, {"step": 3})
    assert any("removed" in n and "step000000002" in n and "incomplete" in n for n in notes)


class FullDiskEngine(FakeEngine):
    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def save_checkpoint(self, root: str, tag: str, client_state: dict[str, Any], save_latest: bool) -> None:
        (Path(root) / tag).mkdir(parents=True)
        (Path(root) / tag / "partial.pt").write_bytes(b"half")
        raise self.error


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")]
)
def test_disk_full_is_said_and_the_previous_checkpoint_kept(tmp_path, monkeypatch, error):
    import shutil
    from collections import namedtuple

    from colearn_dist import checkpoint
    from colearn_dist.checkpoint import CheckpointError

    ck = Checkpointer(tmp_path, keep=1)
    ck.save(FakeEngine(), 1, {"step": 1})
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: usage(100, 100, 0))
    with pytest.raises(
        CheckpointError,
        match=f"no space left on {ck.root} while writing checkpoint step000000002; the previous checkpoint step000000001 is kept",
    ):
        ck.save(FullDiskEngine(error), 2, {"step": 2})
    assert ck.latest() == ck.root / "step000000001" and not (ck.root / "step000000002").exists()
    assert shutil.disk_usage is not None
