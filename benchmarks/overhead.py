"""Overhead of the federated simulation against the same work in plain PyTorch.

Both sides do, for every client: build the model from the common init, restore
nothing (round 1), train ``local_epochs`` on the client's own train part, then
evaluate on its own test part and on the pooled test set (the last round's
evaluation). The simulation does it through Flower's simulation engine (Ray
actors, Messages, the guard, FedAvg); the baseline does it back to back in one
process with the same fedse training loop. Both are timed end to end in this
one run, side by side, and the ratio printed.

    python benchmarks/overhead.py                      # fmnist_dir01.yaml, 20 clients x 1 epoch, 1 round
    python benchmarks/overhead.py --config configs/quickstart.yaml --set server.rounds=1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedse.client import build_model  # noqa: E402
from fedse.config import load_config  # noqa: E402
from fedse.federated import build_federated_data  # noqa: E402
from fedse.simulation import simulate  # noqa: E402
from fedse.train import evaluate, train  # noqa: E402


def plain(cfg) -> float:
    """The same local work, back to back in this process (torch uses every core)."""
    started = time.perf_counter()
    fed = build_federated_data(cfg)
    ds = fed.dataset
    pooled_x, pooled_y = fed.pooled_test(cfg.evaluate.pooled_max_samples, cfg.seed)
    t = cfg.train
    for rnd in range(1, cfg.server.rounds + 1):
        for cid in range(fed.num_clients):
            shard = fed.shard(cid)
            model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
            train(model, shard.train_images, shard.train_labels, mean=ds.mean, std=ds.std,
                  epochs=t.local_epochs, batch_size=t.batch_size, lr=t.lr, momentum=t.momentum,
                  weight_decay=t.weight_decay, augment=cfg.data.augment, seed=cid + rnd)
            evaluate(model, shard.test_images, shard.test_labels, mean=ds.mean, std=ds.std)
            if rnd == cfg.server.rounds:
                evaluate(model, pooled_x, pooled_y, mean=ds.mean, std=ds.std)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "fmnist_dir01.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(args.config, ["server.rounds=1", "train.local_epochs=1", f"output.dir={out}",
                                        "output.name=bench", *args.overrides])
        build_federated_data(cfg)  # dataset read and partitioned once, outside both timings
        plain_s = plain(cfg)
        sim_s = simulate(cfg, quiet=True).wall_seconds
    figures = {
        "config": args.config, "clients": cfg.partition.num_clients, "rounds": cfg.server.rounds,
        "local_epochs": cfg.train.local_epochs, "torch_threads": torch.get_num_threads(),
        "plain_seconds": round(plain_s, 2), "simulation_seconds": round(sim_s, 2),
        "ratio": round(sim_s / plain_s, 3),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
