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
