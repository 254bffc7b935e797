"""Round 8: does another all-sensor prediction beat the plain mean of MDiCo's heads? Validation only.

For each run, the heads of its "all" weights predict the validation split. Weightings of the heads
are fitted leave-one-site-out (fitted on the other validation sites, applied to the held-out one),
so the validation RMSE they get is not fitted on the samples they score. Fitted nothing: every head
on the sensors' mean shared embedding (z_sha is meant to be sensor-invariant), and the shared
auxiliary head on it, alone or averaged with the heads.

    python docs/results/round8/head_weights.py ARCHIVE.zarr RUN [RUN ...]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import zarr
from scipy.optimize import nnls

from colearn_dist.batch import to_device
from colearn_dist.runs import Trained, load_trained
from colearn_dist.scoring import _split_loader


def rmse(p: np.ndarray, t: np.ndarray) -> float:
    return float(np.sqrt(np.mean((p - t) ** 2)))


@torch.no_grad()
def predictions(trained: Trained) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Validation predictions in target units: each head [N, M]; the shared-embedding variants; target; archive rows."""
    model, names = trained.model.eval(), list(trained.model.modalities)
    parts: dict[str, list[np.ndarray]] = {
        k: [] for k in ("heads", "heads_on_mean_sha", "aux_on_mean_sha", "heads_and_aux", "target", "index")
    }
    for batch in _split_loader(trained, "val"):
        batch = to_device(batch, torch.device("cpu"), torch.float32)
        spe, _, sha = model._embed(batch["inputs"], names, batch.get("month"), batch.get("latlon"))
        heads = model._heads(names, spe, sha)
        mean_sha = torch.stack([sha[m] for m in names]).mean(0)
        on_mean = model._heads(names, spe, {m: mean_sha for m in names})
        units = lambda x: trained.spec.to_target_units(x.float()).numpy().reshape(len(x), -1)  # noqa: E731
        parts["heads"].append(np.concatenate([units(heads[m]) for m in names], 1))
        parts["heads_on_mean_sha"].append(units(torch.stack([on_mean[m] for m in names]).mean(0))[:, 0])
        parts["aux_on_mean_sha"].append(units(model.aux_head(mean_sha))[:, 0])
        parts["heads_and_aux"].append(units((torch.stack([heads[m] for m in names]).mean(0) + model.aux_head(mean_sha)) / 2)[:, 0])
        parts["target"].append(batch["target"].numpy().reshape(-1))
        parts["index"].append(batch["index"].numpy())
    out = {k: np.concatenate(v) for k, v in parts.items()}
    shared = {k: out[k] for k in ("heads_on_mean_sha", "aux_on_mean_sha", "heads_and_aux")}
    return out["heads"], shared, out["target"], out["index"]


def main(archive: str, runs: list[str]) -> None:
    torch.set_num_threads(1)
    groups = np.asarray(zarr.open_group(archive, mode="r")["group"][:])
    for run in runs:
        trained = load_trained(run, "all")
        heads, shared, target, index = predictions(trained)
        site = groups[index]
        fitted = {k: np.zeros_like(target) for k in ("inverse_mse", "nnls_stack", "best_head")}
        for held in np.unique(site):
            fit, out = site != held, site == held
            mse = ((heads[fit] - target[fit, None]) ** 2).mean(0)
            fitted["inverse_mse"][out] = heads[out] @ ((1 / mse) / (1 / mse).sum())
            w, _ = nnls(heads[fit], target[fit])
            fitted["nnls_stack"][out] = heads[out] @ (w / w.sum())
            fitted["best_head"][out] = heads[out, int(np.argmin(mse))]
        scores = {"mean": rmse(heads.mean(1), target), **{k: rmse(v, target) for k, v in {**fitted, **shared}.items()}}
        print(run, " ".join(f"{k} {v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
