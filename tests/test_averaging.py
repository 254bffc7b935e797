"""averaging.py: the weight average's maths and swap, and an averaged run that resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch

from colearn_dist.averaging import WeightAverage, decay_for


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def test_average_follows_the_closed_form_and_copies_integer_buffers():
    net = _net()
    avg = WeightAverage(net, decay=0.9)
    w0 = net[0].weight.detach().clone()
    expected = w0.clone()
    for n in range(1, 6):
        with torch.no_grad():
            net[0].weight.add_(1.0)  # the optimizer moves the weights in place
        net[1].num_batches_tracked += 1
        avg.update()
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * net[0].weight.detach()
    shadow = avg.state_dict()["shadow"]
    torch.testing.assert_close(shadow["0.weight"], expected, rtol=0, atol=1e-6)
    assert int(shadow["1.num_batches_tracked"]) == 5  # integers are copied, not averaged
    assert not torch.allclose(shadow["0.weight"], net[0].weight)


def test_applied_swaps_the_average_in_and_restores_the_weights_exactly():
    net = _net()
    avg = WeightAverage(net, decay=0.5)
    with torch.no_grad():
        net[0].weight.mul_(3.0)
    avg.update()
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with avg.applied():
        for k, v in net.state_dict().items():
            torch.testing.assert_close(v, avg.state_dict()["shadow"][k].to(v.dtype), rtol=0, atol=0)
    for k, v in net.state_dict().items():
        assert torch.equal(v, raw[k]), k


def test_state_round_trip_and_a_missing_tensor_is_named():
    net = _net()
    avg = WeightAverage(net, decay=0.9)
    with torch.no_grad():
        net[0].bias.add_(2.0)
    avg.update()
    other = WeightAverage(_net(), decay=0.9)
    other.load_state_dict(avg.state_dict())
    assert other.updates == 1
    for a, b in zip(other.state_dict()["shadow"].values(), avg.state_dict()["shadow"].values()):
        assert torch.equal(a, b)
    broken = avg.state_dict()
    broken["shadow"] = {k: v for k, v in broken["shadow"].items() if k != "0.bias"}
    with pytest.raises(KeyError, match="0.bias"):
        other.load_state_dict(broken)


def test_decay_for_a_time_constant_in_epochs():
    assert decay_for(2.0, 50) == pytest.approx(1 - 1 / 100)
    assert 0 < decay_for(0.01, 1) < 1  # never 0 or negative for tiny constants
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(_net(), decay=1.0)


@pytest.mark.slow
def test_averaged_run_deploys_the_average_and_resumes_exactly(run_shards, tmp_path):
    """Stopped inside epoch 2 and resumed, an averaged run ends with the uninterrupted run's raw
    weights, average and deployed weights; the deployed weights are the average, not the raw weights."""
    from colearn_dist.loader import ShardLoader

    from helpers import assert_same_weights, final_state, run_cli, write_config

    steps_per_epoch = len(ShardLoader(run_shards, "train", batch_size=16))
    common = {"train": {"epochs": 2, "ema_epochs": 0.5, "log_every_steps": 1}}
    ref = write_config(tmp_path / "ref.yaml", run_shards, tmp_path / "ref", **common)
    assert run_cli(["train", str(ref)]).wait(timeout=300) == 0
    cfg = write_config(tmp_path / "stop.yaml", run_shards, tmp_path / "stop", **common)
    assert run_cli(["train", str(cfg)], {"COLEARN_STOP_AFTER_STEPS": str(steps_per_epoch + 3)}).wait(timeout=300) != 0
    assert run_cli(["train", str(cfg)]).wait(timeout=300) == 0

    assert_same_weights(final_state(tmp_path / "ref"), final_state(tmp_path / "stop"))
    averages = []
    for run in ("ref", "stop"):
        ckpt = tmp_path / run / "checkpoints"
        averages.append(torch.load(ckpt / (ckpt / "latest").read_text().strip() / "extra_weight_average.pt", weights_only=True))
    assert averages[0]["updates"] == averages[1]["updates"] == 2 * steps_per_epoch
    assert_same_weights(averages[0]["shadow"], averages[1]["shadow"])
    best = {r: torch.load(tmp_path / r / "best" / "all.pt", weights_only=False) for r in ("ref", "stop")}
    assert_same_weights(best["ref"]["model"], best["stop"]["model"])
    if best["ref"]["epoch"] == 2:  # chosen at the last epoch: the deployed weights are that epoch's average
        assert_same_weights(best["ref"]["model"], averages[0]["shadow"], atol=1e-6)
    raw = final_state(tmp_path / "ref")
    assert any(not torch.allclose(best["ref"]["model"][k].float(), raw[k].float()) for k in raw if raw[k].is_floating_point())
    history = json.loads(
        (tmp_path / "ref" / "checkpoints" / (tmp_path / "ref" / "checkpoints" / "latest").read_text().strip() / "state.json").read_text()
    )["history"]
    assert len(history) == 2
