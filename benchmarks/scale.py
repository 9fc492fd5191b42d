"""Scale: time and memory per round at 100, 300 and 1,000 clients with the same 30 sampled.

MNIST (``../shared/data/mnist``), ``dirichlet-client`` with alpha 0.3, se_resnet8
under the default policy (``fedse-la``), 3 rounds, 30 clients sampled per round
for training and for evaluation (no pooled evaluation, so every round does the
same work). Each client count runs in its own process (a fresh driver), and in
that same process, after the simulation, the same sampled clients' work (build
the model, the client's own local update, evaluate on the own test part) is
redone back to back without Flower, so the two are measured side by side.

    python benchmarks/scale.py                       # 100, 300, 1000 clients
    python benchmarks/scale.py --clients 100 1000 --json benchmarks/results/scale.json

Printed per client count: seconds per round (median of the rounds after the
first), the plain-PyTorch seconds for the same sampled work, their ratio, the
framework's seconds per client-round ((round - plain) / 30), the driver's peak
RSS, the largest RSS any Ray worker reached (sampled every 0.2 s), and the bytes
of private state one client keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MNIST = ROOT.parent / "shared" / "data" / "mnist"
SAMPLED = 30


def _worker_rss_peak(stop: threading.Event, out: dict[str, int]) -> None:
    """Largest VmRSS of any Ray worker process (``ray::`` in its command line), polled."""
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"ray::" not in cmd and b"default_worker.py" not in cmd:
                    continue
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        out["peak_kb"] = max(out.get("peak_kb", 0), int(line.split()[1]))
            except OSError:
                continue
        stop.wait(0.2)


def one(num_clients: int) -> dict:
    from fedse.config import config_from_dict
    from fedse.federated import build_federated_data
    from fedse.local import local_update
    from fedse.models import build_model
    from fedse.policies import resolve
    from fedse.simulation import simulate
    from fedse.train import evaluate

    with tempfile.TemporaryDirectory() as out:
        cfg = config_from_dict(
            {
                "data": {"dataset": "mnist", "root": str(MNIST)},
                "partition": {"num_clients": num_clients, "scheme": "dirichlet-client", "alpha": 0.3},
                "server": {
                    "rounds": 3,
                    "fraction_train": SAMPLED / num_clients,
                    "fraction_evaluate": SAMPLED / num_clients,
                    "min_train_clients": SAMPLED,
                    "min_evaluate_clients": SAMPLED,
                },
                "evaluate": {"pooled": False},
                "output": {"dir": out, "name": "scale"},
            }
        )
        fed = build_federated_data(cfg)  # read and partitioned once, outside both timings
        stop, peak = threading.Event(), {}
        poller = threading.Thread(target=_worker_rss_peak, args=(stop, peak), daemon=True)
        poller.start()
        result = simulate(cfg, quiet=True)
        stop.set()
        poller.join()
    log = result.outcome.log
    rounds = sorted(log.round_seconds)
    ds = fed.dataset
    plain = []
    policy = resolve(cfg)
    for rnd in rounds:  # the same sampled clients' work through the client's own training path
        started = time.perf_counter()
        for cid in sorted(log.train[rnd]):
            shard = fed.shard(cid)
            model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
            local_update(model, policy.split(model), policy, shard, cfg, seed=cid, mean=ds.mean, std=ds.std)
        for cid in sorted(log.evaluate[rnd]):
            shard = fed.shard(cid)
            model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
            evaluate(model, shard.test_images, shard.test_labels, mean=ds.mean, std=ds.std)
        plain.append(time.perf_counter() - started)
    sim = [log.round_seconds[r] for r in rounds]
    sim_steady, plain_steady = statistics.median(sim[1:]), statistics.median(plain[1:])
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    private = policy.split(model).private_state(model)
    return {
        "clients": num_clients,
        "sampled_per_round": SAMPLED,
        "model": cfg.model.name,
        "policy": cfg.personalization.policy,
        "round_seconds": [round(x, 2) for x in sim],
        "plain_round_seconds": [round(x, 2) for x in plain],
        "round_seconds_steady": round(sim_steady, 2),
        "plain_seconds_steady": round(plain_steady, 2),
        "ratio": round(sim_steady / plain_steady, 2),
        "framework_seconds_per_client_round": round((sim_steady - plain_steady) / SAMPLED, 3),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mb": round(peak.get("peak_kb", 0) / 1024, 1),
        "private_state_bytes_per_client": sum(v.numel() * v.element_size() for v in private.values()),
        "wall_seconds": round(result.wall_seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: one client count, JSON to stdout
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.one:
        print("FIGURES " + json.dumps(one(args.one)))
        return
    if not MNIST.is_dir():
        sys.exit(f"needs MNIST in {MNIST}")
    rows = []
    for n in args.clients:
        proc = subprocess.run([sys.executable, __file__, "--one", str(n)], capture_output=True, text=True)
        line = [x for x in proc.stdout.splitlines() if x.startswith("FIGURES ")]
        if proc.returncode != 0 or not line:
            sys.exit(f"{n} clients failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[0].removeprefix("FIGURES ")))
        print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    summary = {
        "round_time_change_first_to_last_pct": round(
            100 * (last["round_seconds_steady"] / first["round_seconds_steady"] - 1), 1
        ),
        "driver_rss_per_1000_extra_clients_mb": round(
            (last["driver_peak_rss_mb"] - first["driver_peak_rss_mb"]) / (last["clients"] - first["clients"]) * 1000,
            1,
        )
        if last["clients"] != first["clients"]
        else None,
    }
    print(json.dumps(summary))
    if args.json:
        from fedse.io import atomic_write_json

        atomic_write_json(args.json, {"command": " ".join(sys.argv), "runs": rows, "summary": summary})


if __name__ == "__main__":
    main()
