"""Training logs: TensorBoard scalars and one concise console line, both from rank 0 only."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLogger:
    def __init__(self, log_file: Path, tb_dir: Path, rank: int) -> None:
        self.rank = rank
        self.writer = SummaryWriter(str(tb_dir)) if rank == 0 else None
        # Appended, not overwritten: a resumed run continues the same log.
        self.file = open(log_file, "a") if rank == 0 else None  # noqa: SIM115 (open for the run's lifetime)
        self.start = time.time()

    def resumed_at(self, step: int) -> None:
        """A resumed run replays the steps after its checkpoint: TensorBoard drops what an earlier
        attempt logged past `step`, so each step's scalars appear once."""
        if self.writer is not None:
            log_dir = self.writer.log_dir
            self.writer.close()
            self.writer = SummaryWriter(log_dir, purge_step=step + 1)

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(f"{prefix}{key}", float(value), step)

    def line(self, text: str) -> None:
        if self.rank == 0:
            elapsed = time.time() - self.start
            stamped = f"[{elapsed:7.1f}s] {text}"
            print(stamped, file=sys.stderr, flush=True)
            assert self.file is not None  # rank 0 has one
            self.file.write(time.strftime("%Y-%m-%d %H:%M:%S ") + stamped + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            assert self.file is not None  # rank 0 has both
            self.file.close()
