"""Round 11's throwaway A/B: the plain loop of benchmarks/bench_train.py (same model, objective and
batches, torch.optim.Adam), forward + objective under torch.compile (batch axis dynamic, as the
engine's `train.compile`), a warm-up epoch then R epochs; prints samples/s per epoch and the ms of
forward + objective, backward and optimizer step. The checkout under test is the one on PYTHONPATH:

    for r in 1 2 3; do for code in CHECKOUT_BEFORE CHECKOUT_AFTER; do
        PYTHONPATH=$code OMP_NUM_THREADS=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ind R=4 taskset -c 1 \
            python docs/results/round11/plain_compiled.py 32; done; done
"""

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
import bench_train as bt  # noqa: E402
from colearn_dist.batch import to_device  # noqa: E402
from colearn_dist.config import load_config  # noqa: E402
from colearn_dist.loader import ShardLoader  # noqa: E402
from colearn_dist.manifest import load_manifest  # noqa: E402
from colearn_dist.methods import build_objective  # noqa: E402
from colearn_dist.runs import build  # noqa: E402

torch.set_num_threads(1)
batch = int(sys.argv[1]) if len(sys.argv) > 1 else 32
shards = bt.prepare_shards(Path(tempfile.gettempdir()) / "colearn-bench")
cfg = load_config(bt.CONFIG, bt.overrides(shards, Path(tempfile.mkdtemp()), bt.FIVE, batch, False))
torch.manual_seed(0)
built = build(cfg, load_manifest(shards))
model = built.model.train()
objective = build_objective("mdico", cfg.objective, built.spec, built.model_modalities)
opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr, fused=True)
loader = ShardLoader(shards, "train", batch_size=batch, modalities=built.modalities)
batches = [to_device(b, torch.device("cpu"), torch.float32) for b in loader]
forward_loss = torch.compile(lambda inputs, month, labels: objective(model(inputs, month), labels)[0])
ms = {"forward+objective": 0.0, "backward": 0.0, "step": 0.0}


def step(b: dict) -> None:
    for t in [*b["inputs"].values(), b["target"], b["month"]]:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    t0 = time.perf_counter()
    loss = forward_loss(b["inputs"], b.get("month"), {"target": b["target"]})
    t1 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    for k, dt in zip(ms, (t1 - t0, t2 - t1, t3 - t2)):
        ms[k] += dt


for epoch in range(int(os.environ.get("R", 4)) + 1):
    ms = dict.fromkeys(ms, 0.0)
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    seconds = time.perf_counter() - t0
    if epoch:  # the first epoch compiles
        per_step = " ".join(f"{k} {1000 * v / len(batches):.2f}" for k, v in ms.items())
        print(f"samples/s {sum(len(b['target']) for b in batches) / seconds:.0f} ms/step: {per_step}", flush=True)
