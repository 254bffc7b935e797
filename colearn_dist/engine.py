"""The one training loop, for one process or many, built on DeepSpeed.

A `Trainer` is assembled from small parts — loader, model, objective, checkpointer, logger — and
runs: train an epoch, validate on the validation split (never the test split), keep the best
weights, stop early, checkpoint, and finally score the best weights on the test split.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .averaging import WeightAverage, decay_for
from .batch import to_device
from .checkpoint import CheckpointError
from .config import RunConfig, dump_config
from .context import describe_context
from .distributed import agree_with_rank0, all_reduce_sum, configure_threads, keep_freed_memory, threads_per_rank
from .launch import ProcessInfo, init_distributed
from .loader import ShardLoader
from .logs import RunLogger
from .manifest import load_manifest
from .methods import build_objective, method, sensor_sets, set_name
from .metrics import PRIMARY
from .model import param_groups
from .norm import set_batch_stats
from .runlock import RunLockedError, describe
from .runs import RunDir, build
from .scoring import evaluate_run, score_loader
from .signals import StopRequested


class ResumeError(RuntimeError):
    pass


def _deepspeed_config(cfg: RunConfig, precision: str) -> dict[str, Any]:
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum,
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    # Explicit even when 0: DeepSpeed's default clips (a full extra pass over the gradients each step).
    ds["gradient_clipping"] = cfg.train.grad_clip
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return ds


def _lr_lambda(cfg: RunConfig, progress: Callable[[int], float]):
    """Linear warm-up over `warmup_steps` optimizer steps, times a cosine over training progress in
    [0, 1]. Progress counts data, not steps (see Trainer._progress): a run resumed with another
    number of processes, whose steps carry another number of samples, stays on the same curve."""
    warm = cfg.train.warmup_steps

    def fn(step: int) -> float:
        factor = (step + 1) / warm if warm and step < warm else 1.0
        if cfg.train.schedule == "cosine":
            factor *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress(step)))))
        return factor

    return fn


def _all_ok(ok: bool, world: int) -> bool:
    """True on every rank iff `ok` on every rank (collective when world > 1)."""
    if world == 1:
        return ok
    return bool(all_reduce_sum(torch.tensor([0.0 if ok else 1.0])).item() == 0)


def _check_targets(manifest: Any, method_name: str, label_free: bool) -> str:
    """Regression samples without a target (NaN) are masked out of every task loss and metric and
    still train the label-free terms; a train split with none at all cannot train a supervised
    method. Returns the note for train.log ('' when every sample has a target)."""
    target = (manifest.train_sums or {}).get("target") or {}
    if manifest.task != "regression" or label_free or "count" not in target:
        return ""
    labelled, total = int(target["count"]), manifest.split_size("train")
    if labelled == 0:
        raise ValueError(
            f"{manifest.path}: no train sample has a target (all NaN); method {method_name!r} needs targets "
            "(method 'pretrain' trains without them)"
        )
    if labelled == total:
        return ""
    return f"train split: {total - labelled} of {total} samples have no target (NaN): left out of the task losses and metrics"


class Trainer:
    def __init__(self, cfg: RunConfig, *, allow_config_change: bool = False, allow_shards_change: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.run = RunDir(cfg.run_dir)
        self.info: ProcessInfo = init_distributed()
        self.rank = self.info.rank
        self.world = self.info.world_size
        # One writer per run: a second `train` on it would resume from checkpoints the first prunes.
        self.lock = self.run.lock()
        locked: RunLockedError | None = None
        if self.rank == 0:
            try:
                self.lock.acquire()
            except RunLockedError as exc:
                locked = exc
        if not _all_ok(locked is None, self.world):
            raise locked or RunLockedError(f"{self.run_dir}: rank 0 could not lock the run (see its error)")
        weakref.finalize(self, self.lock.release)
        try:
            self._setup(cfg, allow_config_change, allow_shards_change)
        except BaseException:
            self.lock.release()
            raise

    def _setup(self, cfg: RunConfig, allow_config_change: bool, allow_shards_change: bool) -> None:
        threads = cfg.train.threads or threads_per_rank(self.info.local_world_size, cfg.data.workers)
        configure_threads(threads)
        keep_freed_memory()
        self.device = torch.device("cuda", self.info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        precision = cfg.engine.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        elif precision != "fp32" and self.device.type != "cuda":
            raise ValueError(f"engine.precision {precision} needs a GPU; this process has none (use fp32 or auto)")
        self.precision = precision
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

        set_batch_stats(cfg.engine.batch_stats)
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank and world size
        np.random.seed(cfg.train.seed)
        self.manifest = load_manifest(cfg.data.shards)
        self.built = build(cfg, self.manifest)
        self.objective = build_objective(
            cfg.model.method,
            cfg.objective,
            self.built.spec,
            self.built.model_modalities,
            distill_weight=cfg.model.distill_weight,
            distill_temperature=cfg.model.distill_temperature,
        )
        # Pretraining resamples the train split endlessly (a fresh shard and buffer order each pass)
        # and counts steps, not epochs; it never reads val or test.
        self.pretrain = method(cfg.model.method).endless
        self._target_note = _check_targets(self.manifest, cfg.model.method, self.pretrain)
        self.train_loader = ShardLoader(
            cfg.data.shards,
            "train",
            endless=self.pretrain,
            batch_size=cfg.data.batch_size,
            modalities=self.built.modalities,
            rank=self.rank,
            world_size=self.world,
            workers=cfg.data.workers,
            shuffle=True,
            shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.train.seed,
            on_corrupt=cfg.data.on_corrupt,
            cache_bytes=cfg.data.cache_mb << 20,
            prefetch=cfg.data.prefetch,
        )
        self._val_loader: ShardLoader | None = None  # made at the first validation, kept (its cache too)
        self.has_val = self.manifest.splits.get("val", {}).get("num_samples", 0) > 0
        # the epoch's last optimizer step may accumulate fewer micro-batches (see _train_epoch)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.train.grad_accum)
        total_steps = self.steps_per_epoch * cfg.train.epochs
        if self.pretrain and cfg.train.max_steps:
            total_steps = cfg.train.max_steps
        self.total_steps = total_steps
        # Dropout / sensor-dropout randomness differs per rank, as it would with different samples.
        torch.manual_seed(cfg.train.seed * 1000 + self.rank + 1)

        import deepspeed

        # fused: one kernel for all parameters instead of one update per tensor (3 ms a step on CPU
        # for MDiCo with 5 sensors); bf16/fp16 runs keep DeepSpeed's own wrapping on top of it.
        optimizer = torch.optim.Adam(
            param_groups(self.built.model, cfg.train.lr),
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            fused=True,
        )
        self._data_progress = 0.0  # epochs done / epochs, updated as batches arrive
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, self._progress))
        ds_config = _deepspeed_config(cfg, precision)
        self._universal = self._needs_universal()
        if self._universal:
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.built.model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=ds_config,
            dist_init_required=False,
        )
        # Alone, without ZeRO or a loss scaler, DeepSpeed's backward has nothing to reduce, partition or
        # scale: autograd's own backward of loss / grad_accum (what it computes) skips its wrapper
        # (locks, timers, a graph hook: 0.7 ms of a 30 ms batch-32 MDiCo step on one CPU thread).
        self._own_backward = self.world == 1 and cfg.engine.zero_stage == 0 and precision == "fp32"
        if self.world == 1 and cfg.engine.zero_stage == 0:
            # Alone, there is nothing to average; DeepSpeed would still flatten, all-reduce and
            # unflatten every gradient each step (2 ms of a 14 ms MDiCo step on CPU).
            self.engine.enable_backward_allreduce = False
        if self.built.teacher is not None:
            self.built.teacher.to(self.device)
        # Validation scores, selects and deploys the weight average where one is asked for.
        self.average: WeightAverage | None = None
        if cfg.train.ema_epochs > 0 and not self.pretrain:
            self.average = WeightAverage(self.engine.module, decay_for(cfg.train.ema_epochs, self.steps_per_epoch))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._forward_loss = self._forward_objective
        self.compile_seconds: float | None = None  # the first compiled step's time, once measured
        if cfg.train.compile:
            self._forward_loss = self._compiled_forward_objective()
        self.logger = RunLogger(self.run.log, self.run.tb, self.rank)
        if self._target_note:
            self.logger.line(self._target_note)
        if self.lock.stale:
            self.logger.line(f"stale lock of a process that is gone ({describe(self.lock.stale)}): taken over")
        self.checkpointer = self.run.checkpointer(keep=cfg.train.keep_checkpoints, log=self.logger.line)
        self.stop = StopRequested()
        # Diagnostics: COLEARN_SAMPLE_TRACE=path makes each rank log the samples of every step
        # (used by the tests that check each sample is seen once per epoch across interruptions).
        trace = os.environ.get("COLEARN_SAMPLE_TRACE")
        self._trace = open(f"{trace}.rank{self.rank}", "a", buffering=1) if trace else None
        # COLEARN_STOP_AFTER_STEPS=n behaves as if Slurm's warning signal arrived after n steps of
        # this process: a deterministic stand-in for a time limit, for tests and drills.
        self._stop_after = int(os.environ.get("COLEARN_STOP_AFTER_STEPS", "0"))
        self._steps_here = 0
        # COLEARN_STEP_DELAY_S=s sleeps s seconds at every step boundary: a run lasts long enough to
        # be interrupted mid-way on any machine (the tests that preempt or cancel a Slurm job; on a
        # fast machine their whole run had ended before Slurm's signal arrived).
        self._step_delay = float(os.environ.get("COLEARN_STEP_DELAY_S", "0"))
        # Gradient norm for the logs where DeepSpeed computes none (a plain fp32 optimizer without
        # ZeRO): measured between backward and step, on logging steps only.
        self._grad_norm_due = False
        self._grad_norm: float | None = None
        self._corrupt_logged: set[str] = set()
        self._skipped_total = 0
        self._skipped_pending = 0
        # Progress state, saved in every checkpoint.
        self.step = 0
        self.epoch = 0
        # Each inference sensor set keeps its own best weights: a sensor's deployed model is the
        # checkpoint that sensor did best with on the validation split.
        self.best_scores: dict[str, float] = {}
        self.bad_epochs = 0
        self.history: list[dict[str, Any]] = []
        self._resume(allow_config_change, allow_shards_change)
        self.logger.line(f"context: {describe_context(self.built.context, self.built.has_month)}")
        if self.built.init_report is not None and self.step == 0:
            rep = self.built.init_report
            self.logger.line(
                f"initialised from {rep['from']}: loaded {', '.join(rep['loaded'])}"
                + (f"; skipped {'; '.join(rep['skipped'])}" if rep["skipped"] else "")
                + ("; encoders frozen (probe)" if cfg.model.freeze_encoders else "")
            )

    # ----------------------------------------------------------------- resume
    def _resume(self, allow_config_change: bool, allow_shards_change: bool) -> None:
        """Continue from the newest checkpoint that loads; one that does not is named and skipped."""
        candidates = self.checkpointer.candidates()
        if not candidates:
            if self.rank == 0:
                self.run.config_file.write_text(dump_config(self.cfg))
            return
        for i, tag_dir in enumerate(candidates):
            problem = None
            try:
                saved = self.checkpointer.state(tag_dir)
                if saved["config_hash"] != self.cfg.hash() and not allow_config_change:
                    raise ResumeError(
                        f"{self.run_dir}: the config differs from the one this run was started with "
                        f"(hash {saved['config_hash']} vs {self.cfg.hash()}); pass --allow-config-change to resume anyway"
                    )
                # ZeRO partitions the optimizer state by rank: another world size loads it through
                # DeepSpeed's universal checkpoint format, converted on the fly.
                source = self.checkpointer.to_universal(tag_dir) if self._universal else tag_dir
                state = self.checkpointer.load(self.engine, source)
                if self.average is not None:
                    average = self.checkpointer.load_tensors(source, "weight_average")
                    if average is None:
                        raise ResumeError(f"{tag_dir}: no weight average (extra_weight_average.pt) although train.ema_epochs is set")
                    self.average.load_state_dict(average)
            except CheckpointError as exc:
                problem = str(exc)
            if _all_ok(problem is None, self.world):
                break
            following = f"; falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else ""
            self.logger.line(f"checkpoint {tag_dir.name} does not load: {problem or 'another rank failed'}{following}")
        else:
            raise CheckpointError(
                f"{self.run_dir}: no checkpoint loads ({', '.join(p.name for p in candidates)}; see train.log); "
                "move checkpoints/ away to start the run afresh"
            )
        self.step = state["step"]
        self.epoch = state["epoch"]
        self.best_scores = state["best_scores"]
        self.bad_epochs = state["bad_epochs"]
        self.history = state["history"]
        self.train_loader.set_position(self._loader_position(state, allow_shards_change))
        self.logger.resumed_at(self.step)
        self.logger.line(f"resumed {tag_dir.name}: step {self.step}, epoch {self.epoch}, world size {state['world_size']} → {self.world}")

    def _loader_position(self, state: dict[str, Any], allow_shards_change: bool) -> dict[str, Any]:
        """The saved loader position, if the shards are those it was saved with (manifest identity:
        shard names and sha256 per split). Other shards are an error, or with `allow_shards_change`
        the interrupted epoch starts afresh on them (positions in it would name other samples)."""
        saved = state.get("shards")  # absent in checkpoints written before identities were recorded
        now = self.manifest.identity()
        changed = [split for split in now if saved is not None and saved.get(split) != now[split]]
        if not changed:
            return state["loader"]
        what = f"the {', '.join(changed)} shards in {self.cfg.data.shards} are not those this run was trained on"
        if not allow_shards_change:
            raise ResumeError(
                f"{self.run_dir}: {what} (regenerated or replaced since its checkpoint); "
                "pass --allow-shards-change to resume on them (the interrupted epoch then starts afresh)"
            )
        epoch = int(state["loader"]["epoch"])
        self.logger.line(f"{what}: resuming on them as asked (--allow-shards-change); epoch {epoch} starts afresh")
        return {"epoch": epoch, "batch": 0}

    def _progress(self, step: int) -> float:
        """Training progress for the schedule: pretraining counts steps (max_steps is a step
        budget); epoch training counts the data consumed (the loader's global position), which does
        not depend on how many processes share it."""
        return step / max(1, self.total_steps) if self.pretrain else self._data_progress

    def _needs_universal(self) -> bool:
        if self.cfg.engine.zero_stage == 0:
            return False
        quiet = self.run.checkpointer(log=lambda _: None)  # _resume logs what it finds
        for tag_dir in quiet.candidates():
            try:
                return bool(quiet.state(tag_dir)["world_size"] != self.world)
            except CheckpointError:
                continue  # _resume names it and falls back
        return False

    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "best_scores": self.best_scores,
            "bad_epochs": self.bad_epochs,
            "history": self.history,
            "loader": self.train_loader.position(),
            "world_size": self.world,
            "shards": self.manifest.identity(),
            "config_hash": self.cfg.hash(),
            "config": self.cfg.to_dict(),
        }

    def save_checkpoint(self) -> Path:
        latest = self.checkpointer.latest()
        if latest is not None and latest.name == self.checkpointer.tag(self.step):
            return latest  # nothing new since (a finished run started again)
        tensors = {"weight_average": self.average.state_dict()} if self.average is not None else None
        return self.checkpointer.save(self.engine, self.step, self._state(), tensors)

    # ----------------------------------------------------------------- steps
    def _forward_objective(
        self,
        inputs: dict[str, torch.Tensor],
        month: torch.Tensor | None,
        labels: dict[str, torch.Tensor],
        latlon: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Model forward + objective: what `train.compile` compiles. It calls the model's forward, not
        DeepSpeed's forward wrapper nor the pre/post-forward hooks DeepSpeed puts on the module (timers,
        memory reports: per-step Python state a trace cannot hold, and per-step cost in eager mode).
        With ZeRO ≤ 2 and no DeepSpeed autocast they add nothing that `engine.backward` does not do."""
        return self.objective(self.engine.module.forward(inputs, month, latlon), labels)

    def _compiled_forward_objective(self) -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
        """torch.compile of forward + objective (never DeepSpeed's backward or step).

        Inductor's caches go to the run directory unless TORCHINDUCTOR_CACHE_DIR is set, so a requeued
        job (any node) reuses the compiled code. The batch axis is marked dynamic at the first call, so the
        epoch's uneven batches (sizes b and b+1) share one graph. On a GPU, mode "reduce-overhead" adds
        CUDA graphs (one per batch size seen)."""
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        # Importing DeepSpeed already made inductor write its /tmp default into the variable: only
        # another value is the user's choice.
        user = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if not user or os.path.abspath(user) == os.path.abspath(default_cache_dir()):
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.run_dir / "compile_cache")
        backend = os.environ.get("COLEARN_COMPILE_BACKEND", "inductor")  # tests: "aot_eager" (no code generation)
        mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
        compiled = torch.compile(self._forward_objective, backend=backend, mode=mode, dynamic=None)

        def call(
            inputs: dict[str, torch.Tensor], month: torch.Tensor | None, labels: dict[str, torch.Tensor], latlon: torch.Tensor | None = None
        ):
            if self.compile_seconds is not None:
                return compiled(inputs, month, labels, latlon)
            # Marked once: the graph traced with a symbolic batch axis takes every later size (a mark
            # is a Python call per tensor, 90 µs a step for 23 tensors here).
            for t in [*inputs.values(), *labels.values(), *(t for t in (month, latlon) if t is not None)]:
                torch._dynamo.maybe_mark_dynamic(t, 0)
            t0 = time.perf_counter()
            result = compiled(inputs, month, labels, latlon)
            self.compile_seconds = time.perf_counter() - t0
            self.logger.line(f"compiled forward + objective ({backend}{', ' + mode if mode else ''}) in {self.compile_seconds:.1f} s; "
                             f"cache {os.environ['TORCHINDUCTOR_CACHE_DIR']}")  # fmt: skip
            return result

        return call

    def _train_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = {"target": batch["target"]}
        if self.built.teacher is not None:
            with torch.no_grad():
                labels["teacher_pred"] = self.built.teacher.predict(batch["inputs"], batch.get("month"), latlon=batch.get("latlon"))  # type: ignore[operator]
        clear = getattr(self.engine.optimizer, "clear_backward_seen_flag", None)
        if callable(clear):
            clear()  # what DeepSpeed's forward does first for ZeRO optimizers
        loss, terms = self._forward_loss(batch["inputs"], batch.get("month"), labels, batch.get("latlon"))
        if self._own_backward:
            (loss / self.cfg.train.grad_accum).backward()  # DeepSpeed's scaling, its gradients bit for bit
        else:
            self.engine.backward(loss)
        if self._grad_norm_due:
            self._grad_norm = _grad_norm(self.engine.module)
        self.engine.step()
        return loss, terms

    def _stop_agreed(self) -> bool:
        """Any rank signalled → every rank stops at the same step boundary."""
        self._steps_here += 1
        if self._stop_after and self._steps_here >= self._stop_after:
            self.stop.flag = True
        if self._step_delay:
            time.sleep(self._step_delay)
        if self.world == 1:
            return self.stop.flag
        return self.stop.agree(all_reduce_sum(torch.tensor(self.stop.votes())).tolist())

    def fit(self) -> dict[str, Any]:
        """Train to the end (or until stopped by a signal: then checkpoint and return status 'stopped')."""
        self.stop.install()
        cfg = self.cfg
        self.logger.line(
            f"{cfg.name}: method {cfg.model.method}, modalities {self.built.modalities}, world size {self.world}, "
            f"{self.precision} on {self.device.type}, {torch.get_num_threads()} thread(s)/rank, "
            f"{len(self.train_loader)} batches/epoch/rank"
        )
        status = "finished"
        if self.pretrain:
            # One endless pass that ends at total_steps; no validation, nothing to select.
            if self.step < self.total_steps and not self._train_epoch():
                status = "stopped"
        while not self.pretrain and self.epoch < cfg.train.epochs and not self._early_stopped():
            if not self._train_epoch():
                status = "stopped"
                break
            self._end_of_epoch()
            if self._stop_agreed():
                status = "stopped"
                break
            every = cfg.train.checkpoint_every_epochs
            if every and self.epoch % every == 0 and self.epoch < cfg.train.epochs:
                self.save_checkpoint()
        if status == "stopped":
            path = self.save_checkpoint()
            self.logger.line(f"stop requested (signal {self.stop.signal}): checkpoint {path.name} written")
            self.logger.close()
            self.lock.release()
            return {"status": status, "step": self.step, "signal": self.stop.signal}
        self.save_checkpoint()
        result = {"status": status, "step": self.step, "epoch": self.epoch}
        if self.pretrain:
            # Final weights where load_trained and model.init_from look; the test split is not touched.
            if self.rank == 0:
                self._save_best("all", {"score": None, "pretrain_steps": self.step})
                self.logger.line(f"pretraining done: {self.step} steps, weights in {self.run.best('all')}")
        elif cfg.train.evaluate_test:
            # Every rank scores its part of the test split; rank 0 computes the metrics.
            records = evaluate_run(self.run_dir, split="test")
            result["test"] = records
            for rec in records:
                self.logger.line(f"test {rec['sensors']:<14} " + _fmt_metrics(rec["metrics"], self.built.spec.task))
        self.logger.close()
        self.lock.release()
        if dist.is_initialized():
            dist.barrier()
        return result

    def _early_stopped(self) -> bool:
        t = self.cfg.train
        return t.patience > 0 and self.has_val and self.epoch >= t.min_epochs and self.bad_epochs >= t.patience

    def _train_epoch(self) -> bool:
        cfg = self.cfg
        self.engine.train()
        acc: torch.Tensor | None = None  # summed loss terms since the last log line
        keys: list[str] = []
        n_acc = 0
        samples = 0
        wait = 0.0
        skipped = self._skipped_pending  # samples lost to damage since the last log line (on_corrupt: skip)
        self.epoch_stats = {"samples": 0, "wait_s": 0.0}  # this rank's, for benchmarks
        t_log = time.perf_counter()
        t0 = time.perf_counter()
        it = iter(self.train_loader)
        micro = 0  # micro-batches since this call began: always at an optimizer-step boundary
        while True:
            t_wait = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            waited = time.perf_counter() - t_wait
            wait += waited
            self.epoch_stats["wait_s"] += waited
            self.epoch_stats["samples"] += int(batch["target"].shape[0])
            batch = to_device(batch, self.device, self.dtype)
            if cfg.data.on_corrupt == "skip":
                skipped += int(batch.pop("skipped", 0))
                self._log_corrupt_shards()
                # A batch damage left with fewer than 2 samples cannot pass BatchNorm: every rank
                # skips it together (the loader has counted it; a resumed run skips it as well).
                if not _all_ok(int(batch["target"].shape[0]) >= 2, self.world):
                    skipped += int(batch["target"].shape[0])
                    continue
            # The engine, not DeepSpeed's global micro-step counter, decides where an optimizer step
            # falls: every grad_accum micro-batches and at the end of each epoch (a shorter last
            # group, scaled like a full one), so validation and checkpoints never cut an
            # accumulation in half and a resumed run keeps the uninterrupted run's boundaries.
            micro += 1
            position = self.train_loader.position()
            epoch_ends = not self.pretrain and position["epoch"] != self.epoch
            self._data_progress = (position["epoch"] + position["samples"] / max(1, position["num_samples"])) / cfg.train.epochs
            boundary = micro % cfg.train.grad_accum == 0 or epoch_ends
            if cfg.train.grad_accum > 1:
                self.engine.set_gradient_accumulation_boundary(boundary)
            self._grad_norm_due = (
                boundary
                and bool(cfg.train.log_every_steps)
                and ((self.engine.global_steps + 1) % cfg.train.log_every_steps == 0 or epoch_ends)
            )
            trace_id = self.engine.global_steps * cfg.train.grad_accum + (micro - 1) % cfg.train.grad_accum
            loss, terms = self._train_step(batch)
            samples += int(batch["target"].shape[0])
            # One stacked add per step, not one per term (there are 5·M + pairs of them); the terms are
            # detached logs already (one detach and cast of the stack, not one per term).
            step_terms = torch.stack(list(terms.values())).detach().float()
            acc = step_terms if acc is None else acc + step_terms
            keys = list(terms)
            n_acc += 1
            if self._trace is not None:
                self._trace.write(f"{self.epoch} {trace_id} {' '.join(map(str, batch['index'].tolist()))}\n")
            if not boundary:
                continue  # checkpoints and logs only between optimizer steps
            self.step = self.engine.global_steps
            if self.average is not None:
                self.average.update()
            if cfg.train.log_every_steps and self.step % cfg.train.log_every_steps == 0:
                self._log_train(keys, acc, n_acc, samples, wait, time.perf_counter() - t_log, skipped)
                acc, n_acc, samples, wait, skipped, t_log = None, 0, 0, 0.0, 0, time.perf_counter()
            if self.pretrain:
                self.epoch = position["epoch"]  # passes over the data, for the logs
                if self.step >= self.total_steps:
                    break  # fit() writes the final checkpoint
                if cfg.train.checkpoint_every_steps and self.step % cfg.train.checkpoint_every_steps == 0:
                    self.save_checkpoint()
                if self._stop_agreed():
                    return False
                continue
            if epoch_ends:
                continue  # the epoch's last step: validation comes first, then its checkpoint
            if cfg.train.checkpoint_every_steps and self.step % cfg.train.checkpoint_every_steps == 0:
                self.save_checkpoint()
            if self._stop_agreed():
                return False
        if acc is not None:
            self._log_train(keys, acc, n_acc, samples, wait, time.perf_counter() - t_log, skipped)
            skipped = 0
        self._skipped_pending = skipped  # lost after the epoch's last step: said at the next log line
        self.epoch_stats["seconds"] = time.perf_counter() - t0
        return True

    def _log_corrupt_shards(self) -> None:
        """Each damaged shard once in train.log (this rank's loader found it; rank 0 writes the log)."""
        for path, reason in self.train_loader.corrupt_shards.items():
            if path not in self._corrupt_logged:
                self._corrupt_logged.add(path)
                self.logger.line(f"corrupt shard {path}: its unreadable samples are skipped (data.on_corrupt: skip): {reason}")

    def _log_train(self, keys: list[str], acc: torch.Tensor, n: int, samples: int, wait: float, seconds: float, skipped: int = 0) -> None:
        # One all-reduce: the loss terms (summed contributions), then each rank's samples/s in its own
        # slot, then the data wait and the skipped samples; built on the terms' device (nccl reduces
        # CUDA tensors only).
        rates = torch.zeros(self.world, dtype=acc.dtype, device=acc.device)
        rates[self.rank] = samples / max(seconds, 1e-9)
        tail = torch.tensor([wait, float(skipped)], dtype=acc.dtype, device=acc.device)
        stacked = torch.cat([acc / n, rates, tail])
        reduced = (all_reduce_sum(stacked) if self.world > 1 else stacked).cpu()
        terms = {k: float(v) for k, v in zip(keys, reduced[: len(keys)])}
        per_rank = reduced[len(keys) : len(keys) + self.world].tolist()
        global_rate = float(sum(per_rank))
        scalars = {f"loss/{k}": v for k, v in terms.items()}
        scalars.update(
            {
                "lr": self.scheduler.get_last_lr()[0] if self.scheduler is not None else self.cfg.train.lr,
                "throughput/samples_per_s_global": global_rate,
                "throughput/data_wait_share": float(reduced[-2]) / self.world / max(seconds, 1e-9),
            }
        )
        scalars.update({f"throughput/samples_per_s_rank{r}": v for r, v in enumerate(per_rank)})
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = self._grad_norm
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        lost = int(round(float(reduced[-1])))
        if self.cfg.data.on_corrupt == "skip":
            self._skipped_total += lost
            scalars["data/skipped_samples"] = float(self._skipped_total)  # all ranks, since this process started
        self.logger.scalars(self.step, scalars, prefix="train/")
        self.logger.line(
            f"epoch {self.epoch:3d} step {self.step:6d}  loss {terms.get('loss', float('nan')):.4f}  "
            f"{global_rate:7.0f} samples/s  data wait {scalars['throughput/data_wait_share']:.0%}"
            + (f"  skipped {lost} corrupt sample(s) ({self._skipped_total} so far)" if lost else "")
        )

    def _end_of_epoch(self) -> None:
        self.epoch += 1
        with self.average.applied() if self.average is not None else contextlib.nullcontext():
            self._select()

    def _select(self) -> None:
        """Score every inference sensor set on validation; each keeps the weights it did best with."""
        names = self.built.model_modalities
        sets = [set_name(s, names) for s in sensor_sets(self.cfg.model.method, names)]
        if not self.has_val:
            if self.rank == 0:
                for name in sets:
                    self._save_best(name, {"score": None})
            return
        if self._val_loader is None:
            self._val_loader = ShardLoader(
                self.cfg.data.shards,
                "val",
                batch_size=max(256, self.cfg.data.batch_size),
                modalities=self.built.modalities,
                rank=self.rank,
                world_size=self.world,
                workers=0,
                shuffle=False,
                cache_bytes=self.cfg.data.cache_mb << 20,
                prefetch=self.cfg.data.prefetch,
            )
        self._agree_with_rank0()
        metrics = score_loader(
            self.engine.module,
            self._val_loader,
            self.built.spec,
            self.manifest,
            sensor_sets(self.cfg.model.method, names),
            self.device,
            self.dtype,
        )
        key, lower_better = PRIMARY[self.built.spec.task]
        scores = {name: (-1.0 if lower_better else 1.0) * float(metrics[name][key]) for name in sets}
        improved = [name for name in sets if scores[name] > self.best_scores.get(name, -math.inf)]
        for name in improved:
            self.best_scores[name] = scores[name]
            if self.rank == 0:
                self._save_best(name, {"score": scores[name], "val": metrics[name]})
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        if self.rank == 0:
            flat = {f"{s}/{k}": v for s, m in metrics.items() for k, v in m.items()}
            self.logger.scalars(self.step, flat, prefix="val/")
            self.history.append({"epoch": self.epoch, "step": self.step, "scores": scores})
            self.logger.line(
                f"epoch {self.epoch:3d} val "
                + "  ".join(f"{s}{'*' if s in improved else ''} {_fmt_metrics(m, self.built.spec.task)}" for s, m in metrics.items())
                + (f"  (no gain {self.bad_epochs}/{self.cfg.train.patience})" if not improved else "")
            )

    def _agree_with_rank0(self) -> None:
        """Every rank scores rank 0's model, the one `_save_best` writes (see `agree_with_rank0`)."""
        gaps = agree_with_rank0(self.engine.module)
        if self.cfg.engine.batch_stats == "global" and gaps["buffers"] > 0:
            self.logger.line(f"warning: ranks held different buffers (largest difference {gaps['buffers']:.3g}); rank 0's taken")
        if gaps["parameters"] > 0:
            self.logger.line(f"warning: ranks hold different parameters (fingerprint difference {gaps['parameters']:.3g})")

    def _save_best(self, sensors: str, info: dict[str, Any]) -> None:
        """Weights for inference with `sensors`, in fp32, written atomically."""
        module = self.engine.module
        state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in module.state_dict().items()}
        path = self.run.best(sensors)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": state, "config": self.cfg.to_dict(), "epoch": self.epoch, "step": self.step, "sensors": sensors, **info}, tmp)
        os.replace(tmp, path)


def _grad_norm(module: torch.nn.Module) -> float:
    """L2 norm of all gradients (after DeepSpeed's averaging over ranks, before clipping)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))


def _fmt_metrics(metrics: dict[str, float], task: str) -> str:
    keys = ("rmse", "mae", "r2") if task == "regression" else ("oa", "f1_macro") if task != "multilabel" else ("f1_micro", "map")
    return " ".join(f"{k} {metrics[k]:.3f}" for k in keys if k in metrics)


def train(cfg: RunConfig, *, allow_config_change: bool = False, allow_shards_change: bool = False) -> dict[str, Any]:
    return Trainer(cfg, allow_config_change=allow_config_change, allow_shards_change=allow_shards_change).fit()
