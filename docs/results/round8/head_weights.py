"""Round 8: does a weighted mean of MDiCo's heads beat the plain mean for the "all" row? Validation only.

For each run, the heads of its "all" weights predict the validation split; each weighting is fitted
leave-one-site-out (fitted on the other validation sites, applied to the held-out one), so the
validation RMSE it gets is not fitted on the samples it scores.

    python docs/results/round8/head_weights.py ARCHIVE.zarr RUN [RUN ...]
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import zarr
from scipy.optimize import nnls

from colearn_dist.runs import load_trained
from colearn_dist.scoring import _split_loader, predict_loader


def rmse(p: np.ndarray, t: np.ndarray) -> float:
    return float(np.sqrt(np.mean((p - t) ** 2)))


def main(archive: str, runs: list[str]) -> None:
    torch.set_num_threads(1)
    groups = np.asarray(zarr.open_group(archive, mode="r")["group"][:])
    for run in runs:
        trained = load_trained(run, "all")
        mods = list(trained.model.modalities)
        p = predict_loader(trained.model, _split_loader(trained, "val"), trained.spec, [[m] for m in mods], gather=False)
        heads = np.stack([p[m]["pred"].reshape(-1) for m in mods], 1)
        target, site = p[mods[0]]["target"].reshape(-1), groups[p[mods[0]]["index"]]
        fitted = {k: np.zeros_like(target) for k in ("inverse_mse", "nnls_stack", "best_head")}
        for held in np.unique(site):
            fit, out = site != held, site == held
            mse = ((heads[fit] - target[fit, None]) ** 2).mean(0)
            fitted["inverse_mse"][out] = heads[out] @ ((1 / mse) / (1 / mse).sum())
            w, _ = nnls(heads[fit], target[fit])
            fitted["nnls_stack"][out] = heads[out] @ (w / w.sum())
            fitted["best_head"][out] = heads[out, int(np.argmin(mse))]
        scores = {"mean": rmse(heads.mean(1), target), **{k: rmse(v, target) for k, v in fitted.items()}}
        print(run, " ".join(f"{k} {v:.3f}" for k, v in scores.items()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
