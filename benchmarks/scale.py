"""Scale: time and memory per round at 100, 300 and 1,000 clients with the same 30 sampled.

MNIST (``../shared/data/mnist``), ``dirichlet-client`` with alpha 0.3 and 60
samples per client (``partition.samples_per_client``: a client holds as much at
1,000 clients as at 100, so 30 sampled clients are the same work at every
count), se_resnet8 under the default policy (``fedse-la``), 3 rounds, 30 clients
sampled per round for training and for evaluation (no pooled evaluation, so
every round does the same work). Each client count runs in its own process (a
fresh driver), and in that same process:

1. the fedse simulation;
2. the same sampled clients' work (build the model, the client's own local
   update, evaluate on the own test part) redone back to back without Flower;
3. Flower's floor: a minimal Flower app on the same engine, node count and
   backend config (Flower's own ``FedAvg`` sampling 30 nodes, clients that
   send the received se_resnet8 shared arrays straight back and evaluate
   nothing), so its round time is what Flower alone costs for 30 train and 30
   evaluate messages of this model.

So round time = plain work + Flower's floor + fedse's own remainder.

    python benchmarks/scale.py                       # 100, 300, 1000 clients
    python benchmarks/scale.py --clients 100 1000 --json benchmarks/results/scale.json

Printed per client count: seconds per round (median of the rounds after the
first), the plain-PyTorch seconds for the same sampled work, their ratio, the
framework's seconds per client-round ((round - plain) / 30), the driver's peak
RSS, the largest RSS any Ray worker reached (sampled every 0.2 s), and the bytes
of private state one client keeps: its tensors, and what keeping them in
``context.state`` costs the driver beyond Flower's own per-node objects (measured
with tracemalloc; "beyond tensors" is that cost minus the tensors' bytes).
"""

from __future__ import annotations

import argparse
import json
import logging
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
PER_CLIENT = 60


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
    from fedse.data.federated import build_federated_data
    from fedse.models import build_model
    from fedse.policies import ClientRun, resolve
    from fedse.simulation import simulate
    from fedse.train import evaluate

    with tempfile.TemporaryDirectory() as out:
        cfg = config_from_dict(
            {
                "data": {"dataset": "mnist", "root": str(MNIST)},
                "partition": {
                    "num_clients": num_clients,
                    "scheme": "dirichlet-client",
                    "alpha": 0.3,
                    "samples_per_client": PER_CLIENT,
                },
                "server": {
                    "rounds": 3,
                    "fraction_train": SAMPLED / num_clients,
                    "fraction_evaluate": SAMPLED / num_clients,
                    "min_train_clients": SAMPLED,
                    "min_evaluate_clients": SAMPLED,
                },
                "evaluate": {"pooled": False},
                "output": {"dir": out, "name": "scale", "client_models": False},  # timed rounds only
            }
        )
        fed = build_federated_data(cfg)  # read and partitioned once, outside both timings
        stop, peak = threading.Event(), {}
        poller = threading.Thread(target=_worker_rss_peak, args=(stop, peak), daemon=True)
        poller.start()
        result = simulate(cfg, quiet=True)
        stop.set()
        poller.join()
        persisted = private_state_cost(result.run_dir, cfg, max(result.outcome.log.train))
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
            ClientRun(cfg, policy, shard, ds.mean, ds.std, cid).local_update(model, policy.split(model))
        for cid in sorted(log.evaluate[rnd]):
            shard = fed.shard(cid)
            model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
            evaluate(model, shard.test_images, shard.test_labels, mean=ds.mean, std=ds.std)
        plain.append(time.perf_counter() - started)
    sim = [log.round_seconds[r] for r in rounds]
    sim_steady, plain_steady = statistics.median(sim[1:]), statistics.median(plain[1:])
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    private = policy.split(model).private_state(model)
    tensor_bytes = sum(v.numel() * v.element_size() for v in private.values())
    node_bytes = context_state_cost(None, num_clients)
    state_bytes = context_state_cost(private, num_clients) - node_bytes
    floor = flower_floor(cfg, policy.split(model).shared_state(model))
    floor_steady = statistics.median(floor[1:])
    framework = (sim_steady - plain_steady) / SAMPLED
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
        "framework_seconds_per_client_round": round(framework, 3),
        "flower_floor_round_seconds": [round(x, 2) for x in floor],
        "flower_floor_seconds_per_client_round": round(floor_steady / SAMPLED, 3),
        "fedse_own_seconds_per_client_round": round(framework - floor_steady / SAMPLED, 3),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "worker_peak_rss_mb": round(peak.get("peak_kb", 0) / 1024, 1),
        "private_state_bytes_per_client": tensor_bytes,
        "flower_node_bytes_without_state": node_bytes,
        "context_state_bytes_per_client": state_bytes,
        "beyond_tensors_mb_per_1000_clients": round((state_bytes - tensor_bytes) * 1000 / 2**20, 2),
        "wall_seconds": round(result.wall_seconds, 1),
        **persisted,
    }


def _checkpoint_size(run_dir: Path, cfg, ckpt: dict, log, last_round: int, private: dict | None) -> int:
    from fedse.checkpoint import CHECKPOINT, save_checkpoint
    from fedse.records import to_arrays

    folder = run_dir / f"ckpt-{len(private or {})}"
    folder.mkdir(exist_ok=True)
    save_checkpoint(folder, cfg, last_round, to_arrays(ckpt["shared"]), log, private=private)
    return (folder / CHECKPOINT).stat().st_size


def private_state_cost(run_dir: Path, cfg, last_round: int) -> dict:
    """What keeping every client's private state resumable costs per round, measured on the run just
    made: the bytes of the state files one round's sampled clients wrote into ``private/``, the seconds
    one client takes to write its file (its share of the round, on its actor), and on the server, the
    seconds of the checkpoint's manifest (one scan of every client's folder) and the checkpoint's
    bytes with and without it."""
    import dataclasses

    import torch

    from fedse.analysis.report import RunLog
    from fedse.checkpoint import CHECKPOINT
    from fedse.state import PRIVATE_DIR, RoundStore, private_manifest

    root = run_dir / PRIVATE_DIR
    files = sorted(root.glob(f"client-*/r{last_round:06d}.bin"))
    client = int(files[0].parent.name.split("-")[1])  # a client sampled in that round
    tensors, meta = RoundStore(root, client, last_round, inclusive=True).load()
    bench = run_dir / "bench"
    started = time.perf_counter()
    for i in range(50):
        RoundStore(bench, i, 1, inclusive=False).save(tensors, meta)
    save_seconds = (time.perf_counter() - started) / 50
    started = time.perf_counter()
    manifest = private_manifest(root, last_round)
    manifest_seconds = time.perf_counter() - started
    # the manifest once every client has trained: one state file in each of num_clients folders
    everyone = run_dir / "everyone"
    for i in range(cfg.partition.num_clients):
        (everyone / f"client-{i}").mkdir(parents=True)
        os.link(files[0], everyone / f"client-{i}" / files[0].name)
    started = time.perf_counter()
    full = private_manifest(everyone, last_round)
    full_seconds = time.perf_counter() - started
    ckpt = torch.load(run_dir / CHECKPOINT, weights_only=True)
    log = RunLog(**{f.name: ckpt["log"][f.name] for f in dataclasses.fields(RunLog)})
    sizes = {
        name: _checkpoint_size(run_dir, cfg, ckpt, log, last_round, private)
        for name, private in (("without", None), ("with", manifest))
    }
    return {
        "private_state_files_per_round": len(files),
        "private_state_bytes_per_round": sum(f.stat().st_size for f in files),
        "private_state_seconds_per_client_save": round(save_seconds, 5),
        "manifest_clients": len(manifest),
        "manifest_seconds_per_round": round(manifest_seconds, 4),
        "manifest_clients_all_trained": len(full),
        "manifest_seconds_all_trained": round(full_seconds, 4),
        "checkpoint_bytes_without_manifest": sizes["without"],
        "checkpoint_bytes_with_manifest": sizes["with"],
        "checkpoint_bytes_with_manifest_all_trained": _checkpoint_size(run_dir, cfg, ckpt, log, last_round, full),
    }


def context_state_cost(private: dict | None, n: int) -> int:
    """Driver bytes per virtual node, measured with tracemalloc on the very objects Flower's simulation
    engine keeps per node (``DeprecatedRunInfoStore`` holding the run's ``Context``), each after
    ``save_private`` (skipped for ``private=None``: Flower's own cost) and a pickle round trip (the
    context comes back from the actor that ran the client)."""
    import pickle
    import tracemalloc

    from flwr.compat.client.run_info_store import DeprecatedRunInfoStore

    from fedse.state import save_private

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    stores = []
    for node in range(n):
        store = DeprecatedRunInfoStore(node_id=node, node_config={"partition-id": node, "num-partitions": n})
        store.register_context(run_id=1)
        context = store.retrieve_context(1)
        if private is not None:
            save_private(context, private)
        store.update_context(1, pickle.loads(pickle.dumps(context)))
        stores.append(store)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return round(used / n)


def flower_floor(cfg, shared: dict) -> list[float]:
    """Round times of a minimal Flower app on the same engine and backend config: Flower's FedAvg
    sampling the same number of nodes, clients that return the received arrays and a count."""
    from flwr.app import Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedse.records import to_arrays
    from fedse.simulation import backend_config

    n = cfg.partition.num_clients
    client = ClientApp()

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        arrays = msg.content["arrays"]
        return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    @client.evaluate()
    def _evaluate(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    ticks: list[float] = []
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=SAMPLED / n,
            fraction_evaluate=SAMPLED / n,
            min_train_nodes=SAMPLED,
            min_evaluate_nodes=SAMPLED,
            min_available_nodes=n,
        )
        ticks.append(time.perf_counter())
        # evaluate_fn runs once before round 1 and once after each round's train and evaluate
        strategy.start(
            grid=grid,
            initial_arrays=to_arrays(shared),
            num_rounds=cfg.server.rounds,
            evaluate_fn=lambda rnd, arrays: ticks.append(time.perf_counter()),
        )

    logging.getLogger("flwr").setLevel(logging.ERROR)
    run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=backend_config(cfg))
    ticks = ticks[1:]  # from the first evaluate_fn call (round 0), after the nodes came up
    return [b - a for a, b in zip(ticks, ticks[1:], strict=False)]


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
