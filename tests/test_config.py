from pathlib import Path

import pytest

from colearn_dist.config import ConfigError, RunConfig, dump_config, from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "colearn_dist" / "configs"


RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "reference.yaml")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.model.encoder_for("s1").type == "tempcnn"
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


@pytest.mark.parametrize("what", ["train.lr=0.01", "objective.con=0.5", "objective.main=2.0", "data.batch_size=64"])
def test_hash_follows_what_a_run_computes(what):
    cfg = load_config(CONFIGS / "fuel_moisture.yaml")
    assert load_config(CONFIGS / "fuel_moisture.yaml", [what]).hash() != cfg.hash()
