"""Process start-up: a stale DeepSpeed op build lock is an error with a message, not a silent hang."""

from __future__ import annotations

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
