import re
from pathlib import Path

import pytest

from colearn_dist.config import ConfigError, RunConfig, dump_config, from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "colearn_dist" / "configs"


RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "reference.yaml")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    # the paper's TempCNN, or (where validation chose it, README Results) the pretrained Presto
    want = "presto" if path.name == "algae_blooms.yaml" else "tempcnn"
    assert cfg.model.encoder_for("s1").type == want
    assert cfg.train.lr == pytest.approx(1e-3)


def test_overrides_apply_in_order_and_are_typed():
    cfg = load_config(CONFIGS / "fuel_moisture.yaml", ["train.seed=3", "model.method=single", "model.modality=s2"])
    assert cfg.train.seed == 3 and cfg.model.method == "single" and cfg.model.modality == "s2"


@pytest.mark.parametrize(
    "data, message",
    [
        ({"trian": {}}, "unknown key(s) ['trian']"),
        ({"train": {"lr": "fast"}}, "config.train.lr: expected a number"),
        ({"model": {"method": "mdco"}}, "config.model.method: 'mdco' is not one of"),
        ({"data": {"batch_size": 1.5}}, "config.data.batch_size: expected an integer"),
        ({"model": {"encoders": {"s1": {"type": "resnet"}}}}, "config.model.encoders.s1.type"),
    ],
)
def test_bad_values_are_named(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(RunConfig, data)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.method=single"], "model.modality must name the sensor"),
        (["model.method=distill", "model.modality=s1"], "model.teacher"),
        (["model.embedding_dim=127"], "must be even"),
        (["data.modalities=[s1]"], "needs at least 2 modalities"),
        (["data.batch_size=1"], "data.batch_size must be ≥ 2"),
    ],
)
def test_cross_field_validation(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "fuel_moisture.yaml", overrides)
    assert message in str(err.value) and "fuel_moisture.yaml" in str(err.value)


def test_hash_ignores_where_but_not_what(tmp_path):
    cfg = load_config(CONFIGS / "fuel_moisture.yaml")
    moved = load_config(CONFIGS / "fuel_moisture.yaml", ["run_dir=elsewhere", "name=other"])
    changed = load_config(CONFIGS / "fuel_moisture.yaml", ["train.lr=0.01"])
    assert cfg.hash() == moved.hash() != changed.hash()
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path).hash() == cfg.hash()


@pytest.mark.parametrize(
    "execution",
    [
        "data.workers=3",
        "data.cache_mb=0",
        "data.prefetch=0",
        "train.threads=5",
        "train.log_every_steps=1",
        "train.keep_checkpoints=0",
        "train.checkpoint_every_steps=7",
        "train.compile=true",
    ],
)
def test_hash_ignores_how_a_run_executes(execution):
    cfg = load_config(CONFIGS / "fuel_moisture.yaml")
    assert load_config(CONFIGS / "fuel_moisture.yaml", [execution]).hash() == cfg.hash()


@pytest.mark.parametrize("bad", ["data.cache_mb=-1", "data.prefetch=-2"])
def test_data_path_keys_must_not_be_negative(bad):
    with pytest.raises(ConfigError, match=bad.split("=")[0]):
        load_config(CONFIGS / "fuel_moisture.yaml", [bad])


@pytest.mark.parametrize("what", ["train.lr=0.01", "objective.con=0.5", "objective.main=2.0", "data.batch_size=64"])
def test_hash_follows_what_a_run_computes(what):
    cfg = load_config(CONFIGS / "fuel_moisture.yaml")
    assert load_config(CONFIGS / "fuel_moisture.yaml", [what]).hash() != cfg.hash()


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"encoders": {"default": {"hidden": 0}}}}, "model.encoders.default.hidden must be ≥ 1, got 0"),
        ({"model": {"encoders": {"s1": {"depth": -1}}}}, "model.encoders.s1.depth must be ≥ 0, got -1"),
        ({"model": {"encoders": {"s1": {"kernel_size": 0}}}}, "model.encoders.s1.kernel_size must be ≥ 1"),
        ({"model": {"encoders": {"s1": {"dropout": 1.5}}}}, "model.encoders.s1.dropout must be in [0, 1), got 1.5"),
        (
            {"model": {"encoders": {"s1": {"type": "attention", "hidden": 10, "heads": 4}}}},
            "hidden (10) must be divisible by model.encoders.s1.heads (4)",
        ),
        ({"train": {"weight_decay": -0.1}}, "train.weight_decay must be ≥ 0, got -0.1"),
        ({"data": {"shuffle_buffer": -1}}, "data.shuffle_buffer must be ≥ 0, got -1"),
        ({"train": {"patience": -2}}, "train.patience must be ≥ 0, got -2"),
        ({"train": {"grad_clip": -1.0}}, "train.grad_clip must be ≥ 0, got -1.0"),
        ({"train": {"threads": -1}}, "train.threads must be ≥ 0, got -1"),
        ({"train": {"lr": float("nan")}}, "train.lr must be a finite number > 0"),
        ({"objective": {"con": -1}}, "objective.con must be ≥ 0"),
    ],
)
def test_out_of_range_values_are_named(tmp_path, data, message):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)


def test_lr_in_e_notation_is_a_number(tmp_path):
    """PyYAML reads `1e-3` (no dot) as a string; it is a number all the same."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  weight_decay: 5E-4\n")
    cfg = load_config(path, ["objective.temperature=1e-1"])
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.objective.temperature) == (1e-3, 5e-4, 0.1)
    plain = tmp_path / "d.yaml"
    plain.write_text("train: {lr: 0.001, weight_decay: 0.0005}\nobjective: {temperature: 0.1}\n")
    assert cfg.hash() == load_config(plain).hash()
    path.write_text("train: {lr: fast}\n")
    with pytest.raises(ConfigError, match=r"train\.lr: expected a number \(e\.g\. 0\.001 or 1e-3\), got 'fast'"):
        load_config(path)


def test_an_encoder_override_for_an_unknown_modality_is_an_error(run_shards, tmp_path):
    from colearn_dist.manifest import load_manifest
    from colearn_dist.runs import build

    from helpers import write_config

    cfg = load_config(write_config(tmp_path / "c.yaml", run_shards, tmp_path / "run", model={"encoders": {"strm": {"type": "mlp"}}}))
    with pytest.raises(ConfigError, match=r"model.encoders has \['strm'\], which are not modalities of the shards .*'srtm'"):
        build(cfg, load_manifest(run_shards))


def test_keys_added_later_keep_the_hash_of_earlier_runs_at_their_default():
    """RunConfig()'s hash before engine.batch_stats existed (commit 0da2578): such runs still resume."""
    assert RunConfig().hash() == "ecbe68c7bf7f1416"
    changed = RunConfig()
    changed.engine.batch_stats = "rank"
    assert changed.hash() != RunConfig().hash()


@pytest.mark.parametrize(
    "value, minutes", [("90", 90), ("'90'", 90), ("'1:30:00'", 90), ("2:00:00", 120), ("'2:00'", 2), ("'1-12'", 2160), ("'1-0:30'", 1470)]
)
def test_slurm_time_limits_read_as_sbatch_reads_them(tmp_path, value, minutes):
    from colearn_dist.config import slurm_minutes

    path = tmp_path / "c.yaml"
    path.write_text(f"slurm: {{time_min: {value}, signal_delay_s: 30}}\n")
    assert slurm_minutes(load_config(path).slurm.time_min) == minutes


@pytest.mark.parametrize(
    "value, message",
    [
        ("1:30", "'1:30' is 1 min 30 s in Slurm's time format; the limit must be whole minutes, e.g. 90 or '1:30:00'"),
        ("-5", "slurm.time_min: the time limit must be at least 1 minute, got -5"),
        ("0", "at least 1 minute"),
        ("soon", "'soon' is not a Slurm time; expected minutes (90) or MM:SS, HH:MM:SS"),
    ],
)
def test_bad_slurm_time_limits_are_named(tmp_path, value, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"slurm: {{time_min: {value}}}\n")  # unquoted 1:30 is the YAML 1.1 number 90 elsewhere
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIGS / "fuel_moisture.yaml", [f"slurm.time_min={value}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("slurm.nodes=0", "slurm.nodes must be ≥ 1, got 0"),
        ("slurm.cpus_per_task=0", "slurm.cpus_per_task must be ≥ 1"),
        ("slurm.mem_gb=-1", "slurm.mem_gb must be > 0"),
        ("slurm.signal_delay_s=3600", "slurm.signal_delay_s (3600 s) must be shorter than the time limit (60 min)"),
    ],
)
def test_bad_slurm_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIGS / "fuel_moisture.yaml", [override])


def test_context_key_absent_is_the_old_behaviour_and_the_old_hash(tmp_path):
    """A run directory written before `model.context` existed resumes: same hash, old behaviour (None)."""
    path = tmp_path / "old.yaml"
    path.write_text("model: {method: mdico}\n")  # a config of before the key
    cfg = load_config(path)
    assert cfg.model.context is None and cfg.model.context_join == "input"
    assert cfg.hash() == "ecbe68c7bf7f1416"  # RunConfig().hash() before model.context existed
    unset = [load_config(path, ["model.context=null"]), load_config(path, ["model.context_join=input"])]
    assert all(c.hash() == cfg.hash() for c in unset)
    assert load_config(path, ["model.context=[calendar]"]).hash() != cfg.hash()
    assert load_config(path, ["model.context=[]"]).hash() != cfg.hash()
    assert load_config(path, ["model.context_join=output"]).hash() != cfg.hash()


def test_joint_head_none_keeps_the_old_hash(tmp_path):
    """Run directories of before `model.joint_head` resume (same hash); setting it is another run."""
    path = tmp_path / "old.yaml"
    path.write_text("model: {method: mdico}\n")
    cfg = load_config(path)
    assert cfg.model.joint_head == "none"
    assert load_config(path, ["model.joint_head=none"]).hash() == cfg.hash() == "ecbe68c7bf7f1416"
    hashes = {load_config(path, [f"model.joint_head={mode}"]).hash() for mode in ("detached", "trained")}
    assert len(hashes) == 2 and cfg.hash() not in hashes
    with pytest.raises(ConfigError, match="model.joint_head"):
        load_config(path, ["model.joint_head=sum"])


def test_context_values_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"model.context\[0\]: 'weather' is not one of \['calendar', 'location'\]"):
        load_config(CONFIGS / "fuel_moisture.yaml", ["model.context=[weather]"])
    with pytest.raises(ConfigError, match="model.context lists an entry twice"):
        load_config(CONFIGS / "fuel_moisture.yaml", ["model.context=[calendar, calendar]"])
