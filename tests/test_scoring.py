"""scoring.py: predictions are made by the model in evaluation mode, whatever mode it was in."""

from __future__ import annotations

import torch

from colearn_dist.objective import TaskSpec
from colearn_dist.scoring import predict_loader


class Noisy(torch.nn.Module):
    """A one-sensor model whose training mode shows: dropout and batch statistics."""

    modalities = ["s1"]

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 1))

    def predict(self, inputs, month=None, modalities=None, latlon=None):
        return self.net(inputs["s1"])


def test_validation_and_test_predictions_are_made_in_eval_mode():
    model = Noisy()
    for _ in range(3):  # running statistics away from their initial values
        model.net(torch.randn(32, 3) * 4 + 2)
    x = torch.randn(10, 3)
    batch = {"inputs": {"s1": x}, "target": torch.zeros(10), "index": torch.arange(10)}
    spec = TaskSpec("regression", 1)
    model.train()
    got = predict_loader(model, [batch], spec, [["s1"]], gather=False)["s1"]["pred"]
    assert model.training  # the caller's mode is restored
    model.eval()
    with torch.no_grad():
        expected = model.net(x)[:, 0].numpy()
    assert got.shape == (10,) and abs(got - expected).max() < 1e-6
