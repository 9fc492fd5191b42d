"""Overhead of the federated simulation against the same work in plain PyTorch.

Both sides do, for every client: build the model from the common init, restore
nothing (round 1), train ``local_epochs`` on the client's own train part, then
evaluate on its own test part and on the pooled test set (the last round's
evaluation). The simulation does it through Flower's simulation engine (Ray
actors, Messages, the guard, FedAvg); the baseline does it back to back in one
process with the same fedse training loop. Both are timed end to end in this
one run, side by side, and the ratio printed.

    python benchmarks/overhead.py                      # fmnist_dir01.yaml, 20 clients x 1 epoch, 3 rounds
    python benchmarks/overhead.py --rounds 1 --config configs/quickstart.yaml

Printed: both wall times and their ratio; the simulation's start-up (Ray, actors
importing torch and reading the dataset: total minus the rounds) and its
per-round times against the plain per-round time.
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

from fedse.config import load_config  # noqa: E402
from fedse.data.federated import build_federated_data  # noqa: E402
from fedse.data.readers import hflip  # noqa: E402
from fedse.models import build_model  # noqa: E402
from fedse.simulation import simulate  # noqa: E402
from fedse.train import TrainSpec, evaluate, train  # noqa: E402


def plain(cfg) -> tuple[float, list[float]]:
    """The same local work, back to back in this process (torch uses every core)."""
    started = time.perf_counter()
    rounds = []
    fed = build_federated_data(cfg)
    ds = fed.dataset
    pooled_x, pooled_y = fed.pooled_test(cfg.evaluate.pooled_max_samples, cfg.seed)
    t = cfg.train
    for rnd in range(1, cfg.server.rounds + 1):
        round_start = time.perf_counter()
        for cid in range(fed.num_clients):
            shard = fed.shard(cid)
            model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
            train(
                model,
                shard.train_images,
                shard.train_labels,
                TrainSpec(
                    mean=ds.mean,
                    std=ds.std,
                    epochs=t.local_epochs,
                    batch_size=t.batch_size,
                    lr=t.lr,
                    momentum=t.momentum,
                    weight_decay=t.weight_decay,
                    augment=cfg.data.augment,
                    hflip=hflip(cfg.data),
                    seed=cid + rnd,
                ),
            )
            evaluate(model, shard.test_images, shard.test_labels, mean=ds.mean, std=ds.std)
            if rnd == cfg.server.rounds:
                evaluate(model, pooled_x, pooled_y, mean=ds.mean, std=ds.std)
        rounds.append(time.perf_counter() - round_start)
    return time.perf_counter() - started, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "fmnist_dir01.yaml"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(
            args.config,
            [
                f"server.rounds={args.rounds}",
                "train.local_epochs=1",
                f"output.dir={out}",
                "output.name=bench",
                *args.overrides,
            ],
        )
        build_federated_data(cfg)  # dataset read and partitioned once, outside both timings
        plain_s, plain_rounds = plain(cfg)
        result = simulate(cfg, quiet=True)
        sim_s = result.wall_seconds
        sim_rounds = [result.outcome.log.round_seconds[r] for r in sorted(result.outcome.log.round_seconds)]
    figures = {
        "config": args.config,
        "clients": cfg.partition.num_clients,
        "rounds": cfg.server.rounds,
        "local_epochs": cfg.train.local_epochs,
        "torch_threads": torch.get_num_threads(),
        "plain_seconds": round(plain_s, 2),
        "simulation_seconds": round(sim_s, 2),
        "ratio": round(sim_s / plain_s, 3),
        "plain_round_seconds": [round(x, 2) for x in plain_rounds],
        "simulation_round_seconds": [round(x, 2) for x in sim_rounds],
        "simulation_startup_seconds": round(sim_s - sum(sim_rounds), 2),
        "ratio_excluding_startup": round(sum(sim_rounds) / plain_s, 3),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
