"""Pretraining on unlabeled inputs (method 'pretrain') and fine-tuning from it (model.init_from)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from colearn_dist.config import ConfigError, ModelConfig, ObjectiveConfig, load_config
from colearn_dist.manifest import Modality
from colearn_dist.model import ROLES, MDiCo, load_pretrained
from colearn_dist.objective import MDiCoObjective, PretrainObjective, TaskSpec

from helpers import write_config

INPUTS = {
    "s1": Modality("s1", "series", 4, 2),
    "s2": Modality("s2", "series", 4, 3),
    "srtm": Modality("srtm", "static", None, 2),
    "dw": Modality("dw", "categorical", 4, 1, num_classes=5, missing_value=4),
}


def _model_cfg(**kw) -> ModelConfig:
    from colearn_dist.config import RunConfig, from_dict

    base = {
        "embedding_dim": 8,
        "encoders": {
            "default": {"type": "tempcnn", "hidden": 4, "depth": 1, "dropout": 0.0},
            "srtm": {"type": "mlp", "hidden": 4, "depth": 1},
        },
    }
    return from_dict(RunConfig, {"model": {**base, **kw}}).model


def _batch(n: int = 6, target: float = float("nan")) -> dict:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "s1": torch.randn(n, 4, 2, generator=g),
        "s2": torch.randn(n, 4, 3, generator=g),
        "srtm": torch.randn(n, 2, generator=g),
        "dw": torch.randint(0, 5, (n, 4), generator=g),
    }
    return {"inputs": inputs, "target": torch.full((n,), target)}


def test_pretrain_objective_is_the_label_free_part_of_mdico():
    torch.manual_seed(0)
    model = MDiCo(INPUTS, _model_cfg(), 1, predictor=True)
    batch = _batch()
    out = model(batch["inputs"])
    assert set(out["z_sha_pred"]) == set(INPUTS)
    cfg = ObjectiveConfig(masked=0.5)
    loss, terms = PretrainObjective(cfg, list(INPUTS))(out, batch)  # NaN targets: never read
    assert torch.isfinite(loss) and "masked/s1" in terms and "main" not in terms
    _, mdico = MDiCoObjective(ObjectiveConfig(), TaskSpec("regression", 1), list(INPUTS))(out, {**batch, "target": torch.zeros(6)})
    for key in ("con", "mod", "con/s1-s2", "mod_second/dw"):
        torch.testing.assert_close(terms[key], mdico[key], rtol=0, atol=0)
    torch.testing.assert_close(terms["loss"], terms["con"] + terms["mod"] + 0.5 * terms["masked"])
    loss.backward()
    assert model.predictor[0].weight.grad is not None and model.predictor[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.heads.parameters())  # heads are left to fine-tuning
    with pytest.raises(KeyError, match="predictor"):
        PretrainObjective(cfg, list(INPUTS))(MDiCo(INPUTS, _model_cfg(), 1)(batch["inputs"]), batch)


def test_config_rules(tmp_path, run_shards):
    def cfg(**sections):
        return load_config(write_config(tmp_path / "c.yaml", run_shards, tmp_path / "r", **sections))

    with pytest.raises(ConfigError, match="max_steps applies to method 'pretrain'"):
        cfg(train={"max_steps": 10})
    with pytest.raises(ConfigError, match="masked applies"):
        cfg(objective={"masked": 1.0})
    with pytest.raises(ConfigError, match="freeze_encoders needs model.init_from"):
        cfg(model={"freeze_encoders": True})
    with pytest.raises(ConfigError, match="init_from initialises"):
        cfg(model={"method": "fusion", "init_from": "x"})
    assert cfg(model={"method": "pretrain"}, train={"max_steps": 5}).train.max_steps == 5
    # fields added later count in the hash only when set (runs started before them still resume)
    plain, pre = cfg(), cfg(model={"method": "pretrain"}, train={"max_steps": 5})
    pre0 = cfg(model={"method": "pretrain"})
    assert pre.hash() != pre0.hash() and plain.hash() != pre0.hash()


def test_load_pretrained_matches_sensors_not_bank_layout():
    torch.manual_seed(0)
    source = MDiCo(INPUTS, _model_cfg(), 1, predictor=True)
    for p in source.parameters():  # make every weight distinguishable from a fresh init
        p.data.normal_()
    sub = {m: INPUTS[m] for m in ("s2", "dw")}  # another bank layout: 4 members instead of 6
    target = MDiCo(sub, _model_cfg(), 3)
    report = load_pretrained(target, source)
    assert sorted(report["loaded"]) == sorted([f"{r}/{m}" for r in ROLES for m in sub] + ["project/dw", "project/s2"])
    assert report["skipped"] == []  # modality classifiers need the same sensor list: not attempted
    for role in ROLES:
        for m in sub:
            a, b = target.encoder(role, m).state_dict(), source.encoder(role, m).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = MDiCo(sub, _model_cfg(encoders={"default": {"type": "tempcnn", "hidden": 6, "depth": 1}}), 3)
    report = load_pretrained(other, source)
    assert any("unique/s2" in s for s in report["skipped"]) and "project/s2" in report["loaded"]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "best" / "all.pt", weights_only=False)["model"]


def test_pretrain_resumes_exactly_then_fine_tunes(run_shards, tmp_path, monkeypatch):
    from colearn_dist.engine import Trainer, train

    # 20 steps cross an epoch boundary of the endless loader (17 batches per pass here).
    common = {"model": {"method": "pretrain"}, "objective": {"masked": 0.5}, "train": {"max_steps": 20, "checkpoint_every_steps": 6}}
    ref = train(load_config(write_config(tmp_path / "ref.yaml", run_shards, tmp_path / "ref", **common)))
    assert ref["status"] == "finished" and ref["step"] == 20 and ref["epoch"] == 1
    assert not (tmp_path / "ref" / "metrics_test.json").exists()  # pretraining never reads the test split

    cfg = load_config(write_config(tmp_path / "cut.yaml", run_shards, tmp_path / "cut", **common))
    monkeypatch.setenv("COLEARN_STOP_AFTER_STEPS", "7")
    assert train(cfg) == {"status": "stopped", "step": 7, "signal": None}
    monkeypatch.delenv("COLEARN_STOP_AFTER_STEPS")
    assert train(cfg)["step"] == 20
    a, b = _weights(tmp_path / "ref"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed pretraining differs"
    assert "resumed" in (tmp_path / "cut" / "train.log").read_text()

    # Fine-tuning: full, and a frozen-encoder probe, both from the pretrain run.
    pre = tmp_path / "ref"
    full = load_config(write_config(tmp_path / "ft.yaml", run_shards, tmp_path / "ft", model={"init_from": str(pre)}, train={"epochs": 1}))
    trainer = Trainer(full)
    model, source = trainer.engine.module, _weights(pre)
    for key, value in model.state_dict().items():
        if key.startswith(("banks.", "encoders.", "project.", "embeddings.", "mod_")):
            assert torch.equal(value, source[key]), key
    assert "initialised from" in (tmp_path / "ft" / "train.log").read_text()
    assert trainer.fit()["status"] == "finished"

    probe_cfg = write_config(
        tmp_path / "probe.yaml", run_shards, tmp_path / "probe", model={"init_from": str(pre), "freeze_encoders": True}, train={"epochs": 1}
    )
    result = train(load_config(probe_cfg))
    assert {r["sensors"] for r in result["test"]} == {"s1", "s2", "srtm", "dw", "all"}
    after = torch.load(tmp_path / "probe" / "best" / "all.pt", weights_only=False)["model"]
    frozen = [k for k in after if k.startswith(("banks.", "encoders.", "project.", "embeddings."))]
    assert frozen and all(torch.equal(after[k], source[k]) for k in frozen)  # weights and BatchNorm statistics
    assert not all(torch.equal(after[k], source[k]) for k in after if k.startswith("heads."))

    single = write_config(
        tmp_path / "single.yaml",
        run_shards,
        tmp_path / "single",
        model={"method": "single", "modality": "s1", "init_from": str(pre)},
        train={"epochs": 1},
    )
    train(load_config(single))
    assert "loaded common/s1" in (tmp_path / "single" / "train.log").read_text()
