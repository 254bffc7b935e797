"""The training engine: a real run end to end, and exact resume after SIGKILL and across world sizes."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import SMALL_MODEL, assert_same_weights, final_state, run_cli, write_config


@pytest.fixture(scope="module")
def shards(run_shards):
    return run_shards


def samples_per_epoch(trace_prefix: Path) -> dict[int, list[int]]:
    """Samples of each epoch, a replayed step (after a restart) replacing its earlier record."""
    steps: dict[tuple[int, int, str], list[int]] = {}
    for file in trace_prefix.parent.glob(trace_prefix.name + ".rank*"):
        for line in file.read_text().splitlines():
            epoch, step, *idx = line.split()
            steps[(int(epoch), int(step), file.name)] = [int(i) for i in idx]
    per_epoch: dict[int, list[int]] = defaultdict(list)
    for (epoch, _, _), idx in steps.items():
        per_epoch[epoch] += idx
    return per_epoch


def train_indices(shards: Path) -> list[int]:
    from colearn_dist.loader import ShardLoader

    return sorted(int(i) for b in ShardLoader(shards, "train", batch_size=64, shuffle=False) for i in b["index"])


def test_single_process_run_end_to_end(shards, tmp_path):
    from colearn_dist.config import load_config
    from colearn_dist.engine import train
    from colearn_dist.loader import ShardLoader

    cfg_path = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", train={"patience": 5})
    result = train(load_config(cfg_path))
    assert result["status"] == "finished" and result["epoch"] == 3
    run = tmp_path / "run"
    records = json.loads((run / "metrics_test.json").read_text())
    assert {r["sensors"] for r in records} == {"s1", "s2", "srtm", "dw", "all"}
    for rec in records:
        assert rec["split"] == "test" and rec["method"] == "mdico"
        assert rec["metrics"]["rmse"] > 0 and rec["metrics"]["rmse"] == rec["metrics"]["rmse"]
    # s1 carries the signal in the synthetic target: after 3 epochs its head beats predicting the mean.
    s1 = next(r for r in records if r["sensors"] == "s1")["metrics"]
    assert s1["r2"] > 0.0
    assert {p.stem for p in (run / "best").glob("*.pt")} == {"s1", "s2", "srtm", "dw", "all"}
    assert (run / "config.yaml").exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    # the test split's embeddings in TensorBoard's projector, one point per sample × sensor
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    projector = text_format.Parse((run / "tb" / "projector_config.pbtxt").read_text(), ProjectorConfig())
    embeddings = {e.tensor_name.split(":")[0]: e for e in projector.embeddings}
    assert set(embeddings) == {"test/shared", "test/specific"}
    n_test = sum(1 for b in ShardLoader(shards, "test", batch_size=64, shuffle=False) for _ in b["id"])
    for e in embeddings.values():
        lines = (run / "tb" / e.metadata_path).read_text().splitlines()
        assert lines[0] == "sensor\ttarget" and len(lines) == 1 + 4 * n_test
        assert {line.split("\t")[0] for line in lines[1:]} == {"s1", "s2", "srtm", "dw"}
        assert len((run / "tb" / e.tensor_path).read_text().splitlines()) == 4 * n_test
    log = (run / "train.log").read_text()
    assert "samples/s" in log and "val" in log


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_own_backward_is_deepspeeds_backward_bit_for_bit(shards, tmp_path, grad_accum):
    """One process, ZeRO 0, fp32: the engine's own backward of loss / grad_accum (skipping DeepSpeed's
    wrapper) trains the weights DeepSpeed's backward trains, bit for bit (accumulation and clipping on)."""
    from colearn_dist.config import load_config
    from colearn_dist.engine import Trainer

    def trained(name: str, own: bool) -> dict[str, torch.Tensor]:
        path = write_config(tmp_path / f"{name}.yaml", shards, tmp_path / name, data={"modalities": ["s1", "s2"]},
                            train={"grad_accum": grad_accum, "grad_clip": 0.5, "log_every_steps": 0})  # fmt: skip
        trainer = Trainer(load_config(path))
        assert trainer._own_backward
        trainer._own_backward = own
        before = {k: v.clone() for k, v in trainer.engine.module.state_dict().items()}
        trainer._train_epoch()
        trainer.lock.release()
        after = trainer.engine.module.state_dict()
        assert trainer.engine.global_steps == trainer.steps_per_epoch
        assert not all(torch.equal(before[k], v) for k, v in after.items())
        return after

    assert_same_weights(trained("own", True), trained("deepspeed", False))


def test_compiled_forward_objective_no_recompiles_same_training(shards, tmp_path, monkeypatch):
    """train.compile: forward + objective traced once (batch axis dynamic: the epoch's uneven batches
    share the graph), no graph break, no recompile in later epochs; training matches eager mode.
    aot_eager runs the traced graphs without generating code (what inductor adds is speed, benchmarked)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from colearn_dist.config import load_config
    from colearn_dist.engine import Trainer

    monkeypatch.setenv("COLEARN_COMPILE_BACKEND", "aot_eager")
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # as importing DeepSpeed leaves it; restored after
    model = {**SMALL_MODEL, "encoders": {"default": {"type": "tempcnn", "hidden": 8, "depth": 2, "dropout": 0.0}}}
    data = {"modalities": ["s1", "s2"], "batch_size": 24}

    def trainer(name: str, compile_: bool) -> Trainer:
        path = write_config(tmp_path / f"{name}.yaml", shards, tmp_path / name, data=data, model=model,
                            train={"compile": compile_, "log_every_steps": 0})  # fmt: skip
        return Trainer(load_config(path))

    torch._dynamo.reset()
    counters.clear()
    compiled = trainer("compiled", True)
    sizes = {len(b["id"]) for b in compiled.train_loader}
    assert len(sizes) == 2, sizes  # the plan's uneven batches: two sizes in one epoch
    compiled.train_loader.set_position({"epoch": 0, "batch": 0})
    compiled._train_epoch()
    graphs = counters["stats"]["unique_graphs"]
    assert graphs == 1 and compiled.compile_seconds is not None  # both batch sizes: one graph
    assert not counters["graph_break"], dict(counters["graph_break"])
    compiled.epoch += 1
    compiled._train_epoch()
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled after the first epoch"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compiled" / "compile_cache")
    # The eager reference runs the composed batch-norm ops the compiled step traces (eager training
    # otherwise fuses them: same maths, other rounding, and Adam turns the rounding noise in the
    # gradient of a bias before a BatchNorm, zero in exact arithmetic, into lr-sized steps).
    import colearn_dist.tempcnn_bank as tempcnn_bank

    monkeypatch.setattr(tempcnn_bank, "fused_norm_applies", lambda: False)
    eager = trainer("eager", False)
    for _ in range(2):
        eager._train_epoch()
        eager.epoch += 1
    assert_same_weights(eager.engine.module.state_dict(), compiled.engine.module.state_dict(), atol=1e-5)


@pytest.mark.slow
def test_sigkill_and_restart_ends_with_the_same_weights(shards, tmp_path):
    common = {"train": {"epochs": 3, "checkpoint_every_steps": 4, "keep_checkpoints": 2}}
    ref_cfg = write_config(tmp_path / "ref.yaml", shards, tmp_path / "ref", **common)
    assert run_cli(["train", str(ref_cfg)]).wait(timeout=300) == 0

    cfg = write_config(tmp_path / "kill.yaml", shards, tmp_path / "kill", **common)
    trace = tmp_path / "trace"
    proc = run_cli(["train", str(cfg)], {"COLEARN_SAMPLE_TRACE": str(trace)})
    target = random.Random(1).choice([8, 12, 16])
    latest = tmp_path / "kill" / "checkpoints" / "latest"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and int(latest.read_text().strip()[4:]) >= target:
            time.sleep(random.Random(2).uniform(0.0, 0.3))
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip()[4:])
    assert killed_at < 3 * 21  # it really was interrupted
    assert run_cli(["train", str(cfg)], {"COLEARN_SAMPLE_TRACE": str(trace)}).wait(timeout=300) == 0

    assert "resumed" in (tmp_path / "kill" / "train.log").read_text()
    assert_same_weights(final_state(tmp_path / "ref"), final_state(tmp_path / "kill"))
    # TensorBoard drops what the killed attempt logged past the checkpoint: each step appears once.
    logged = [step for step, _ in tb_scalars(tmp_path / "kill")["train/lr"]]
    assert logged == [step for step, _ in tb_scalars(tmp_path / "ref")["train/lr"]]
    expected = train_indices(shards)
    per_epoch = samples_per_epoch(trace)
    assert sorted(per_epoch) == [0, 1, 2]
    for epoch, seen in per_epoch.items():
        assert sorted(seen) == expected, f"epoch {epoch}: samples lost or repeated"


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [0, 2])
def test_resume_with_another_world_size(shards, tmp_path, zero_stage):
    """2 processes → stopped mid-epoch → 1 process → stopped → 2 processes: every sample once per
    epoch. With ZeRO 2 the partitioned optimizer state goes through DeepSpeed's universal checkpoint."""
    trace = tmp_path / "trace"
    cfg = write_config(
        tmp_path / "c.yaml",
        shards,
        tmp_path / "run",
        engine={"zero_stage": zero_stage},
        train={"epochs": 2, "checkpoint_every_steps": 3, "schedule": "cosine", "log_every_steps": 1},
        model={"encoders": {"default": {"type": "tempcnn", "hidden": 8, "depth": 2, "dropout": 0.0}}},
    )
    env = {"COLEARN_SAMPLE_TRACE": str(trace)}
    # Each leg stops itself after a given number of steps (as a time limit would), by signal.
    for nproc, stop_after in ((2, 5), (1, 7), (2, None)):
        extra = {**env, **({"COLEARN_STOP_AFTER_STEPS": str(stop_after)} if stop_after else {})}
        code = run_cli(["launch", "--nproc", str(nproc), str(cfg)], extra).wait(timeout=300)
        assert (code != 0) if stop_after else (code == 0)
    log = (tmp_path / "run" / "train.log").read_text()
    assert log.count("stop requested") == 2
    assert "world size 2 → 1" in log and "world size 1 → 2" in log
    assert (tmp_path / "run" / "metrics_test.json").exists()
    expected = train_indices(shards)
    per_epoch = samples_per_epoch(trace)
    assert sorted(per_epoch) == [0, 1]
    for epoch, seen in per_epoch.items():
        assert sorted(seen) == expected, f"epoch {epoch}: samples lost or repeated across world sizes"
    # The cosine schedule follows the data, not the step count: it reaches 0 at the last step, not
    # before, although steps of 1 process carry half the samples of steps of 2.
    lr = tb_scalars(tmp_path / "run")["train/lr"]
    progress = cosine_progress(lr)
    assert list(progress.values())[-1] == pytest.approx(1.0) and all(v > 0 for _, v in lr[:-1])


def cosine_progress(lr: list[tuple[int, float]], base: float = 1e-3, warmup: int = 0) -> dict[int, float]:
    """Training progress p per logged step, read back from lr = base · warm-up · ½(1 + cos πp);
    checks that it only moves forward."""
    out = {}
    for step, value in lr:
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        out[step] = math.acos(min(1.0, max(-1.0, 2 * value / (base * warm) - 1))) / math.pi
    values = list(out.values())
    assert all(a < b for a, b in zip(values, values[1:])), values
    return out


def tb_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
def test_grad_accumulation_schedule_and_clipping_resume_exactly(shards, tmp_path):
    """grad_accum 2 over an odd number of batches per epoch (the last optimizer step of each epoch
    takes one micro-batch), warm-up + cosine, clipping: a run stopped mid-epoch and resumed ends with
    the uninterrupted run's weights; the learning rate follows the schedule; grad_norm is logged."""
    from colearn_dist.loader import ShardLoader

    batch = next(b for b in range(12, 40) if len(ShardLoader(shards, "train", batch_size=b)) % 2 == 1)
    steps_per_epoch = (len(ShardLoader(shards, "train", batch_size=batch)) + 1) // 2
    common = {
        "data": {"batch_size": batch},
        "train": {"epochs": 2, "grad_accum": 2, "warmup_steps": 4, "schedule": "cosine", "grad_clip": 0.5, "log_every_steps": 1},
    }
    ref = write_config(tmp_path / "ref.yaml", shards, tmp_path / "ref", **common)
    assert run_cli(["train", str(ref)]).wait(timeout=300) == 0
    cfg = write_config(tmp_path / "stop.yaml", shards, tmp_path / "stop", **common)
    assert run_cli(["train", str(cfg)], {"COLEARN_STOP_AFTER_STEPS": str(steps_per_epoch + 3)}).wait(timeout=300) != 0
    latest = (tmp_path / "stop" / "checkpoints" / "latest").read_text().strip()
    state = json.loads((tmp_path / "stop" / "checkpoints" / latest / "state.json").read_text())
    assert state["step"] == steps_per_epoch + 3  # stopped inside the second epoch, at an optimizer step
    assert run_cli(["train", str(cfg)]).wait(timeout=300) == 0

    assert_same_weights(final_state(tmp_path / "ref"), final_state(tmp_path / "stop"))
    scalars = tb_scalars(tmp_path / "ref")
    assert [s for s, _ in scalars["train/lr"]] == list(range(1, 2 * steps_per_epoch + 1))
    lr = dict(scalars["train/lr"])
    # logged after step s: 1e-3 · warm-up min(1, (s+1)/4) · cosine of the data consumed so far
    assert lr[1] < lr[2] < lr[3]
    progress = cosine_progress(scalars["train/lr"], warmup=4)
    assert progress[steps_per_epoch] == pytest.approx(0.5, abs=1e-6)  # half the data at the first epoch's end
    assert progress[2 * steps_per_epoch] == pytest.approx(1.0) and lr[2 * steps_per_epoch] == pytest.approx(0.0, abs=1e-12)
    norms = [v for _, v in scalars["train/grad_norm"]]
    assert len(norms) == 2 * steps_per_epoch and all(n > 0 and n == n for n in norms)
    assert "train/throughput/samples_per_s_rank0" in scalars


def test_half_precision_on_cpu_is_refused(shards, tmp_path):
    from colearn_dist.config import load_config
    from colearn_dist.engine import Trainer

    if torch.cuda.is_available():
        pytest.skip("this process has a GPU: bf16 is allowed")
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", engine={"precision": "bf16"})
    with pytest.raises(ValueError, match="engine.precision bf16 needs a GPU"):
        Trainer(load_config(cfg))


def test_test_split_scoring_can_be_left_to_a_separate_evaluate(shards, tmp_path):
    from colearn_dist.cli import main
    from colearn_dist.config import load_config
    from colearn_dist.engine import train

    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", train={"epochs": 1, "evaluate_test": False})
    result = train(load_config(cfg))
    assert result["status"] == "finished" and "test" not in result
    assert not (tmp_path / "run" / "metrics_test.json").exists() and (tmp_path / "run" / "best" / "all.pt").exists()
    assert main(["evaluate", str(tmp_path / "run"), "--out", str(tmp_path / "tables")]) == 0
    assert {r["sensors"] for r in json.loads((tmp_path / "run" / "metrics_test.json").read_text())} == {"s1", "s2", "srtm", "dw", "all"}


def test_resume_on_other_shards_is_refused_unless_asked(tmp_path, monkeypatch):
    """Shards regenerated in place (another seed: other samples per shard) under a run stopped
    mid-epoch: its loader position would name other samples. Refused; asked for, the epoch restarts."""
    from colearn_dist.config import load_config
    from colearn_dist.engine import ResumeError, Trainer, train
    from colearn_dist.shards import write_shards

    from helpers import make_synthetic_archive

    archive = make_synthetic_archive(tmp_path / "a.zarr", n=200, t=4, groups=10)
    write_shards(archive, tmp_path / "shards", samples_per_shard=40, workers=1, progress=False)
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "shards", tmp_path / "run", train={"epochs": 1}))
    monkeypatch.setenv("COLEARN_STOP_AFTER_STEPS", "3")
    result = train(cfg)
    assert (result["status"], result["step"]) == ("stopped", 3)
    monkeypatch.delenv("COLEARN_STOP_AFTER_STEPS")
    write_shards(archive, tmp_path / "shards", samples_per_shard=40, seed=1, workers=1, progress=False, overwrite=True)
    with pytest.raises(
        ResumeError, match=r"the train, val, test shards in .* are not those this run was trained on.*--allow-shards-change"
    ):
        Trainer(cfg)
    trainer = Trainer(cfg, allow_shards_change=True)
    assert trainer.step == 3 and trainer.train_loader.position()["batch"] == 0
    assert "epoch 0 starts afresh" in (tmp_path / "run" / "train.log").read_text()


def test_samples_without_a_target_train_only_the_label_free_terms(tmp_path):
    from colearn_dist.archive import write_archive
    from colearn_dist.config import load_config
    from colearn_dist.engine import Trainer, train
    from colearn_dist.shards import write_shards

    from helpers import make_synthetic_arrays

    arrays = make_synthetic_arrays(n=160, t=4, groups=8)
    arrays["target"][::4] = np.nan
    mods = arrays.pop("modalities")
    write_shards(write_archive(tmp_path / "a.zarr", mods, **arrays), tmp_path / "shards", samples_per_shard=40, workers=1, progress=False)
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "shards", tmp_path / "run", train={"epochs": 1, "log_every_steps": 1}))
    assert train(cfg)["status"] == "finished"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "samples have no target (NaN): left out of the task losses and metrics" in log
    assert "loss nan" not in log and " rmse nan" not in log
    arrays["target"][:] = np.nan
    write_shards(write_archive(tmp_path / "b.zarr", mods, **arrays), tmp_path / "empty", samples_per_shard=40, workers=1, progress=False)
    with pytest.raises(ValueError, match="no train sample has a target"):
        Trainer(load_config(write_config(tmp_path / "d.yaml", tmp_path / "empty", tmp_path / "run2")))


def test_best_weights_are_chosen_and_stopping_decided_on_validation_only(run_shards, tmp_path, monkeypatch):
    """Scripted validation scores (val RMSE 3, 1, 2, 4 over the epochs, patience 2): the deployed
    weights are those of epoch 2, not the last; training stops after epoch 4; the test split is
    never read while training."""
    import copy

    from colearn_dist import engine
    from colearn_dist.config import load_config
    from colearn_dist.methods import set_name
    from colearn_dist.runs import load_trained

    script = iter([3.0, 1.0, 2.0, 4.0, 5.0])
    snapshots: list[dict[str, torch.Tensor]] = []
    opened: list[str] = []

    class Recording(engine.ShardLoader):
        def __init__(self, shards, split, **kw):
            opened.append(split)
            super().__init__(shards, split, **kw)

    def scripted(model, loader, spec, manifest, sets, *args, **kw):
        assert loader.split == "val"
        snapshots.append(copy.deepcopy(model.state_dict()))
        rmse = next(script)
        return {set_name(s, model.modalities): {"rmse": rmse, "mae": rmse, "r2": 0.0} for s in sets}

    monkeypatch.setattr(engine, "ShardLoader", Recording)
    monkeypatch.setattr(engine, "score_loader", scripted)
    cfg = write_config(tmp_path / "c.yaml", run_shards, tmp_path / "run", train={"epochs": 5, "patience": 2, "evaluate_test": False})
    result = engine.train(load_config(cfg))
    assert result["epoch"] == 4 and len(snapshots) == 4  # early stopping after two epochs without gain
    assert set(opened) == {"train", "val"}
    for sensors in ("all", "s1"):
        trained = load_trained(tmp_path / "run", sensors)
        assert trained.epoch == 2
        state = trained.model.state_dict()
        assert all(torch.equal(state[k], snapshots[1][k].float()) for k in state)


def test_skipped_corrupt_samples_are_counted_and_never_make_tiny_batches(run_shards, tmp_path):
    """A damaged train shard under on_corrupt: skip, unshuffled within readers so whole batches
    lose all their samples (and others all but one): training goes on without feeding BatchNorm
    an empty or one-sample batch, and the loss is counted in train.log and TensorBoard."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from colearn_dist.config import load_config
    from colearn_dist.engine import train
    from colearn_dist.manifest import load_manifest

    from helpers import shard_paths

    shards = tmp_path / "shards"
    shutil.copytree(run_shards, shards)
    manifest = load_manifest(shards)
    victim = shard_paths(manifest, "train")[1]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    lost = manifest.shard_sizes("train")[1]
    data_cfg = {"on_corrupt": "skip", "shuffle_buffer": 1, "batch_size": 6}
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", data=data_cfg, train={"epochs": 1, "log_every_steps": 1})
    assert train(load_config(cfg))["status"] == "finished"
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"corrupt shard {victim}: its unreadable samples are skipped" in log
    assert f"({lost} so far)" in log
    events = EventAccumulator(str(tmp_path / "run" / "tb"))
    events.Reload()
    assert events.Scalars("train/data/skipped_samples")[-1].value == lost


# ----------------------------------------------------------------------------- world 2 × b ≡ world 1 × 2b
#
# One training step of the real model of every method, through the Trainer (DeepSpeed engine,
# objective, BatchNorm): 2 gloo processes holding b_0 and b_1 samples against 1 process holding
# the b_0 + b_1 samples. Randomness that is not data (dropout) is off or fixed per sample, so any
# difference comes from how the ranks share the batch.

STEP_METHODS = ("mdico", "single", "fusion", "dropout", "distill", "pretrain")
STEP_SIZES = {"even": (8, 8), "uneven": (8, 13)}  # the loader's batches lie in [b, 2b − 1]


def _step_config(shards: Path, run_dir: Path, method: str, teacher: Path, batch_stats: str = "global"):
    from colearn_dist.config import RunConfig, from_dict, validate

    encoders = {
        "default": {"type": "tempcnn", "hidden": 8, "depth": 2, "dropout": 0.0},
        "srtm": {"type": "mlp", "hidden": 8, "depth": 1, "dropout": 0.0},
    }
    model = {**SMALL_MODEL, "method": method, "encoders": encoders}
    if method in ("single", "distill"):
        model["modality"] = "s1"
    if method == "distill":
        model["teacher"] = str(teacher)
    data = {"shards": str(shards), "batch_size": 8, "workers": 0}
    cfg = {"run_dir": str(run_dir), "data": data, "model": model, "train": {"epochs": 1, "threads": 1, "log_every_steps": 0}}
    cfg["engine"] = {"batch_stats": batch_stats}
    if method == "pretrain":
        cfg["objective"] = {"masked": 0.5}
    return validate(from_dict(RunConfig, cfg))


def _slice_batch(batch: dict, lo: int, hi: int) -> dict:
    def cut(v):
        if isinstance(v, dict):
            return {k: cut(x) for k, x in v.items()}
        return v[lo:hi]

    return {k: cut(v) for k, v in batch.items()}


def _step_worker(rank: int, world: int, port: int, shards: str, out_dir: str, scenarios: list) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world)})
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    from colearn_dist.batch import to_device
    from colearn_dist.engine import Trainer
    from colearn_dist.loader import ShardLoader

    root = Path(out_dir)
    teacher = root / "teacher"
    batch = next(iter(ShardLoader(shards, "train", batch_size=32, shuffle=False)))  # ≥ 21 samples
    results = {}
    for name, method, sizes, stats in scenarios:
        lo = sum(sizes[:rank]) if world > 1 else 0
        hi = lo + (sizes[rank] if world > 1 else sum(sizes))
        cfg = _step_config(Path(shards), root / f"{name}-w{world}-r{rank}", method, teacher, stats)
        trainer = Trainer(cfg)
        model = trainer.built.model
        if method == "dropout":  # one fixed sensor mask per sample, whichever rank holds it
            mask = torch.Generator().manual_seed(3)
            keep = torch.rand(sum(sizes), len(model.modalities), generator=mask) >= 0.5
            keep[:, 0] |= ~keep.any(dim=1)
            model.sensor_mask = lambda b, count, device=None, keep=keep[lo:hi]: keep
        local = to_device(_slice_batch(batch, lo, hi), trainer.device, trainer.dtype)
        trainer.engine.train()
        out = trainer.engine(local["inputs"], local.get("month"))
        if trainer.built.teacher is not None:
            with torch.no_grad():
                local["teacher_pred"] = trainer.built.teacher.predict(local["inputs"], local.get("month"))
        loss, terms = trainer.objective(out, local)
        trainer.engine.backward(loss)  # DeepSpeed averages the gradients over ranks here
        results[name] = {
            "loss": loss.detach(),
            "terms": {k: v.detach() for k, v in terms.items()},
            "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None},
            "params": {k for k, p in model.named_parameters() if p.requires_grad},
            "buffers": {k: b.detach().clone() for k, b in model.named_buffers()},
        }
        trainer.logger.close()
    torch.save(results, root / f"step-w{world}-r{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _make_teacher(shards: Path, root: Path) -> None:
    """A fusion run's best/all.pt (untrained weights are as good a teacher as any for this test)."""
    from colearn_dist.manifest import load_manifest
    from colearn_dist.runs import RunDir, build

    cfg = _step_config(shards, root / "teacher", "fusion", root / "teacher")
    model = build(cfg, load_manifest(shards)).model
    path = RunDir(root / "teacher").best("all")
    path.parent.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(), "epoch": 0}, path)
    (root / "teacher" / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖, with ‖b‖ floored at 0.1: a bias in front of a BatchNorm has gradient 0 up to
    rounding (~1e-7), whose relative error means nothing; 1e-5 of 0.1 is 1e-6 absolute there."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=0.1))


def test_training_step_world2_equals_world1_every_method(shards, tmp_path):
    """Loss, every parameter's gradient and the BatchNorm running statistics after one step of the
    real model: 2 ranks × (8, 8) and (8, 13) samples equal 1 rank × 16 and 21, for every method;
    with `engine.batch_stats: rank` they do not (the statistics are each rank's own)."""
    import torch.multiprocessing as mp

    from colearn_dist.launch import free_port

    _make_teacher(shards, tmp_path)
    scenarios = [(f"{m}-{k}", m, sizes, "global") for m in STEP_METHODS for k, sizes in STEP_SIZES.items()]
    scenarios.append(("mdico-uneven-rank", "mdico", STEP_SIZES["uneven"], "rank"))
    for world in (1, 2):
        mp.spawn(_step_worker, args=(world, free_port(), str(shards), str(tmp_path), scenarios), nprocs=world, join=True)
    ref = torch.load(tmp_path / "step-w1-r0.pt")
    ranks = [torch.load(tmp_path / f"step-w2-r{r}.pt") for r in range(2)]
    worst = {}
    for name, method, _, stats in scenarios:
        one, two = ref[name], [r[name] for r in ranks]
        loss_err = abs(float(sum(t["loss"] for t in two) / 2 - one["loss"])) / abs(float(one["loss"]))
        term_err = max(abs(float(sum(t["terms"][k] for t in two) - v)) / max(abs(float(v)), 1e-6) for k, v in one["terms"].items())
        # every trainable parameter has a gradient (pretraining leaves the heads alone), the same
        # on both ranks (DeepSpeed averaged them)
        assert set(one["grads"]) == one["params"] or method == "pretrain", name
        for k in set(two[0]["grads"]) - set(one["grads"]):  # DeepSpeed all-reduces zeros for those
            assert not two[0]["grads"][k].any(), f"{name}: {k} has a gradient on 2 ranks, none on 1"
        grad_err = max(_rel(two[0]["grads"][k], g) for k, g in one["grads"].items())
        stats_keys = [k for k in one["buffers"] if "running" in k]
        assert stats_keys, f"{name}: the model has no BatchNorm statistics to compare"
        stat_err = max(_rel(two[r]["buffers"][k], one["buffers"][k]) for k in stats_keys for r in range(2))
        worst[name] = (loss_err, term_err, grad_err, stat_err)
        for k in one["grads"]:
            assert torch.equal(two[0]["grads"][k], two[1]["grads"][k]), f"{name}: ranks hold different gradients for {k}"
        if stats == "rank":
            continue
        for k in stats_keys:
            assert torch.equal(two[0]["buffers"][k], two[1]["buffers"][k]), f"{name}: ranks hold different {k}"
        assert loss_err < 1e-6 and term_err < 1e-5, (name, worst[name])
        assert grad_err < 1e-5 and stat_err < 1e-5, (name, worst[name])
    print({k: tuple(f"{v:.1e}" for v in errs) for k, errs in worst.items()})
    # per-rank statistics: a different model of the data, and running statistics that part ways
    rank_only = worst["mdico-uneven-rank"]
    assert rank_only[0] > 1e-4 and rank_only[2] > 1e-3 and rank_only[3] > 1e-3, rank_only
    per_rank = [r["mdico-uneven-rank"]["buffers"] for r in ranks]
    assert any(not torch.equal(per_rank[0][k], per_rank[1][k]) for k in per_rank[0] if "running" in k)


@pytest.mark.slow
@pytest.mark.parametrize("batch_stats", ["global", "rank"])
def test_recorded_best_score_is_the_score_of_the_saved_weights(shards, tmp_path, batch_stats):
    """2 processes validate and rank 0 saves: every best/<sensors>.pt re-scored alone on the
    validation split gives the score recorded for it — with global batch statistics because the
    ranks' models are identical, with per-rank ones because every rank scores rank 0's buffers."""
    from colearn_dist.loader import ShardLoader
    from colearn_dist.methods import sensor_sets, set_name
    from colearn_dist.runs import load_trained
    from colearn_dist.scoring import score_loader

    train = {"epochs": 2, "log_every_steps": 0}
    cfg = write_config(tmp_path / "c.yaml", shards, tmp_path / "run", train=train, engine={"batch_stats": batch_stats})
    assert run_cli(["launch", "--nproc", "2", str(cfg)]).wait(timeout=300) == 0
    run = tmp_path / "run"
    log = (run / "train.log").read_text()
    assert "world size 2" in log and "warning" not in log
    best = sorted((run / "best").glob("*.pt"))
    assert {p.stem for p in best} == {"s1", "s2", "srtm", "dw", "all"}
    for path in best:
        saved = torch.load(path, weights_only=False)
        trained = load_trained(run, path.stem)
        names = trained.modalities
        sets = [s for s in sensor_sets("mdico", names) if set_name(s, names) == path.stem]
        loader = ShardLoader(trained.cfg.data.shards, "val", batch_size=64, shuffle=False)
        metrics = score_loader(trained.model, loader, trained.spec, trained.manifest, sets, gather=False)[path.stem]
        assert saved["score"] == pytest.approx(-metrics["rmse"], rel=1e-6), path.stem
        assert saved["val"] == pytest.approx(metrics, rel=1e-5, nan_ok=True), path.stem
    # test scoring was shared by both ranks and covers the whole test split
    records = json.loads((run / "metrics_test.json").read_text())
    assert {r["sensors"] for r in records} == {"s1", "s2", "srtm", "dw", "all"}
