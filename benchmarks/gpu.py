"""GPU: clients trained per second and GPU memory per client at 1, 2, 4 and 8 concurrent clients.

Three modes, the same work per client:

* ``plain``: fedse's own ``train()`` and ``evaluate()`` (``fedse.train``, the model from
  ``fedse.models``) in K concurrent worker processes and no Flower: each process is one client
  slot, as a Ray actor is, and trains ``--clients-per-slot`` clients in turn (build the model,
  train ``--epochs`` on the client's ``--samples`` images, evaluate its test part). Needs
  torch alone (no flwr, Ray, Opacus or PyYAML), so it is the check on a bare GPU machine.
* ``flower``: ``fedse simulate`` with K x clients-per-slot clients, every one sampled every
  round, ``simulation.client_gpu_fraction = 1/K`` (Ray runs K actors on the GPU side by side),
  2 rounds; the second round's time gives clients per second, and its ratio to ``plain``.
  Needs flwr and Ray.
* ``deployment``: Flower's Deployment Engine on 127.0.0.1, no Ray: one SuperLink and K
  SuperNodes (insecure), each its own process and one client with its own partition (no
  ``state-dir``: ``fedavg`` keeps nothing private, and no client writes a model file, as in plain
  mode), and one ``flwr run`` of 2 rounds with every client sampled. The clients train where
  ``fedse.train.default_device`` puts them (CUDA when visible: the K SuperNodes share the GPU;
  ``--device cpu`` hides it from them). Clients per second: K / the second round's seconds, from
  the run folder's ``rounds.json``. Flower 1.42's SuperNode starts a fresh ``flwr-clientapp``
  process for every message (SuperExec, subprocess isolation), so each train and each evaluate
  pays a process start, the torch and fedse imports, a CUDA context and the client's data load,
  and waits on Flower's polling (SuperNode 3 s, SuperExec 1 s, ServerApp 3 s; docs/deployment.md,
  "Round time"), where a ``plain`` slot pays these once: the ratio to ``plain`` measures that
  per-message cost, not the GPU. Needs flwr and its Deployment Engine (uvicorn, FastAPI), no Ray.

Both Flower modes need ``--data cifar10`` (the dataset in ``--data-root``, else on fedse's search
path: ``$FEDSE_DATA``, ``../shared/data``); their ``ratio_to_plain`` is the seconds per client
against ``plain``'s at the same K (above 1: slower), where plain ran too (``--mode all``, or a
list such as ``--mode plain deployment``).

Data: ``synthetic`` (seeded random CIFAR-shaped uint8 images, no files: the default, and what
the plain mode uses on a machine with no dataset) or ``cifar10`` (real shards of
``dirichlet-client`` with ``--samples`` per client, the same in every mode).

Per concurrency K and mode, printed as one JSON line: clients trained per second and, in plain
mode, the device memory in use at the peak beyond the idle baseline (all K processes, CUDA
contexts included) and per client slot, each slot's own ``max_memory_allocated``, and whether
any slot ran out of memory.
The ladder stops at the first K that runs out of memory; the summary names the largest K
that fitted and the ``simulation.client_gpu_fraction`` that keeps Ray at or under it
(1 / that K: Ray then never places more actors on one GPU).

    python benchmarks/gpu.py --json benchmarks/results/gpu.json            # plain, 1 2 4 8
    python benchmarks/gpu.py --concurrency 1 2 4 8 16 32 --bf16            # mixed precision
    python benchmarks/gpu.py --mode plain flower --data cifar10 --json FILE    # needs flwr, Ray
    python benchmarks/gpu.py --mode all --data cifar10 --concurrency 1 4       # flwr, Ray, uvicorn
    python benchmarks/gpu.py --mode deployment --data cifar10 --concurrency 1 4  # flwr, uvicorn
    python benchmarks/gpu.py --device cpu --concurrency 1 2 --samples 64   # the code path on a CPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _client_data(args: argparse.Namespace, client: int):
    """(train images, train labels, test images, test labels) of one client."""
    import torch

    if args.data == "synthetic":
        g = torch.Generator().manual_seed(client)
        n, test = args.samples, max(1, args.samples // 4)
        x = torch.randint(0, 256, (n + test, 3, 32, 32), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (n + test,), generator=g)
        return x[:n], y[:n], x[n:], y[n:]
    shard = _federation(args, args.slots_total).shard(client)
    return shard.train_images, shard.train_labels, shard.test_images, shard.test_labels


def _federation(args: argparse.Namespace, num_clients: int):
    from fedse.data.federated import build_federated_data

    return build_federated_data(_config(args, num_clients, 1))


def _config(args: argparse.Namespace, num_clients: int, k: int, out: str | None = None):
    """The Flower modes' run (and the plain mode's CIFAR-10 shards): policy ``fedavg``, whose local
    update is one ``train()`` over every parameter, as the plain mode's. ``data.root`` is absolute:
    a deployment's clients read it in processes of their own."""
    from fedse.config import config_from_dict

    data = {"dataset": "cifar10"}
    if args.data_root:
        data["root"] = str(Path(args.data_root).resolve())
    return config_from_dict(
        {
            "data": data,
            "partition": {
                "num_clients": num_clients,
                "scheme": "dirichlet-client",
                "alpha": 0.3,
                "samples_per_client": args.samples + max(1, args.samples // 4),
                "min_size": 2,
                "test_fraction": 0.2,
            },
            "model": {"name": args.model},
            "personalization": {"policy": "fedavg"},
            # plain mode's TrainSpec: SGD at lr 0.05, momentum 0.9, no weight decay
            "train": {
                "local_epochs": args.epochs,
                "batch_size": args.batch_size,
                "bf16": args.bf16,
                "lr": 0.05,
                "momentum": 0.9,
                "weight_decay": 0.0,
            },
            "server": {
                "rounds": 2,
                "fraction_train": 1.0,
                "fraction_evaluate": 1.0,
                "min_train_clients": num_clients,
                "min_evaluate_clients": num_clients,
            },
            "evaluate": {"pooled": False},
            "simulation": {"client_gpu_fraction": 1.0 / k, "client_cpus": 1},
            "output": {"dir": out or tempfile.gettempdir(), "name": "gpu"},
        }
    )


def _slot(rank: int, args: argparse.Namespace, ready: mp.Queue, start: mp.Event, out: mp.Queue) -> None:
    """One client slot: wait for the others, train its clients in turn, report."""
    import torch

    from fedse.models import create_model
    from fedse.train import TrainSpec, evaluate, train

    torch.set_num_threads(1)
    device = torch.device(args.device)
    clients = [rank * args.clients_per_slot + i for i in range(args.clients_per_slot)]
    data = {c: _client_data(args, c) for c in clients}  # loaded before the clock starts
    create_model(args.model, num_classes=10, in_channels=3, image_size=32).to(device)  # CUDA context up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    ready.put(rank)
    start.wait()
    began, oom = time.perf_counter(), False
    try:
        for c in clients:
            torch.manual_seed(c)
            model = create_model(args.model, num_classes=10, in_channels=3, image_size=32)
            x, y, tx, ty = data[c]
            spec = TrainSpec(
                mean=MEAN, std=STD, epochs=args.epochs, batch_size=args.batch_size, lr=0.05, bf16=args.bf16
            )
            train(model, x, y, spec, device=device)
            evaluate(model, tx, ty, mean=MEAN, std=STD, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        oom = True
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    out.put({"rank": rank, "seconds": time.perf_counter() - began, "oom": oom, "max_allocated": peak})


def _device_used(device: str) -> int:
    import torch

    if not device.startswith("cuda"):
        return 0
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return total - free


def plain(args: argparse.Namespace, k: int) -> dict:
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
    args.slots_total = k * args.clients_per_slot
    baseline = _device_used(args.device)
    procs = [ctx.Process(target=_slot, args=(r, args, ready, start, out)) for r in range(k)]
    for p in procs:
        p.start()
    for _ in procs:  # every slot has its data and its CUDA context before the clock starts
        ready.get(timeout=600)
    peak, stop = {"used": 0}, threading.Event()

    def poll() -> None:
        while not stop.is_set():
            peak["used"] = max(peak["used"], _device_used(args.device))
            stop.wait(0.05)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    began = time.perf_counter()
    start.set()
    reports = [out.get() for _ in procs]
    wall = time.perf_counter() - began
    stop.set()
    poller.join()
    for p in procs:
        p.join()
    clients = k * args.clients_per_slot
    used = max(0, peak["used"] - baseline)
    mb = (lambda b: round(b / 2**20, 1)) if args.device.startswith("cuda") else (lambda b: None)  # noqa: E731
    return {
        "mode": "plain",
        "concurrent": k,
        "clients": clients,
        "seconds": round(wall, 3),
        "clients_per_second": _rate(clients, wall),
        "device_memory_mb": mb(used),
        "device_memory_per_client_mb": mb(used / k),
        "slot_max_allocated_mb": mb(max(r["max_allocated"] for r in reports)),
        "oom": any(r["oom"] for r in reports),
    }


def flower(args: argparse.Namespace, k: int) -> dict:
    from fedse.simulation import simulate

    n = k * args.clients_per_slot
    with tempfile.TemporaryDirectory() as out:
        result = simulate(_config(args, n, k, out), quiet=True)
    seconds = result.outcome.log.round_seconds[2]
    return {
        "mode": "flower",
        "concurrent": k,
        "clients": n,
        "seconds": round(seconds, 3),
        "clients_per_second": _rate(n, seconds),
    }


def _client_env(env: dict[str, str], device: str) -> dict[str, str]:
    """The SuperNodes' environment for ``device``: the ClientApp trains on CUDA whenever it sees a
    GPU (``fedse.train.default_device``), so ``cpu`` hides the GPUs and ``cuda:N`` shows GPU N alone."""
    if device == "cpu":
        return {**env, "CUDA_VISIBLE_DEVICES": ""}
    if device.startswith("cuda:"):
        return {**env, "CUDA_VISIBLE_DEVICES": device.removeprefix("cuda:")}
    return env


def deployment(args: argparse.Namespace, k: int) -> dict:
    """One SuperLink, K SuperNodes (one client each, partition i of K), one ``flwr run`` of 2 rounds;
    every process it started is stopped when it returns or raises."""
    from fedse.analysis.report import COL_CLIENTS, COL_FAILED, COL_ROUND, COL_SECONDS, write_record
    from fedse.deployment.deploy import superlink_command, supernode_command, write_connection
    from fedse.deployment.launch import (
        LocalProcesses,
        flower_env,
        free_port,
        run_rounds,
        start_run,
        start_superlink,
        start_supernodes,
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = _config(args, k, k, str(tmp / "runs"))
        _federation(args, k)  # finds the data, and caches a decoded CIFAR-10 that every client process reads
        write_record(tmp, cfg)  # tmp/config.yaml: the run's whole configuration, the run's config-file
        port = free_port()
        write_connection(tmp / "flwr_home", "gpu", f"127.0.0.1:{port}", None)
        procs = LocalProcesses(_client_env(flower_env(tmp / "flwr_home"), args.device), tmp / "logs", ROOT)
        try:
            start_superlink(procs, superlink_command(certs=None, port=port))
            nodes = [
                supernode_command(
                    superlink=f"127.0.0.1:{port}",
                    ca=None,
                    key=None,
                    port=free_port(),
                    node_config={"partition-id": i, "num-partitions": k},
                )
                for i in range(k)
            ]
            start_supernodes(procs, nodes)
            run = start_run(
                procs, "run", "gpu", {"config-file": str(tmp / "config.yaml"), "output-dir": cfg.output.dir}
            )
            code = run.wait(timeout=1200)
            try:
                rounds = run_rounds(cfg.output.dir)
            except (OSError, ValueError, RuntimeError) as err:
                raise RuntimeError(f"flwr run (exit {code}) left no rounds record: {err}\n{procs.tails()}") from None
            if [r[COL_ROUND] for r in rounds] != [1, 2]:
                raise RuntimeError(f"the run completed rounds {[r[COL_ROUND] for r in rounds]}\n{procs.tails()}")
        finally:
            procs.stop_all()
    seconds = rounds[1][COL_SECONDS]
    return {
        "mode": "deployment",
        "concurrent": k,
        "clients": k,
        "seconds": round(seconds, 3),
        "clients_per_second": _rate(k, seconds),
        "clients_per_round": [r[COL_CLIENTS] for r in rounds],
        "failed_replies_per_round": [r.get(COL_FAILED, 0) for r in rounds],
        "processes_left_running": procs.running(),
    }


def _rate(clients: int, seconds: float) -> float:
    """Clients per second to 4 significant figures (a slow run's rate is a small number)."""
    return float(f"{clients / seconds:.4g}")


def _ratio_to_plain(row: dict, base: dict) -> float:
    """Seconds per client against plain mode's at the same K (above 1: slower)."""
    return round((row["seconds"] / row["clients"]) / (base["seconds"] / base["clients"]), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=["plain", "flower", "deployment", "all"],
        default=["plain"],
        help="one or more; all: plain, flower and deployment",
    )
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--clients-per-slot", type=int, default=4)
    parser.add_argument("--samples", type=int, default=500, help="train images per client")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="se_resnet8")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--data", choices=["synthetic", "cifar10"], default="synthetic")
    parser.add_argument("--data-root", help="CIFAR-10 location (default: fedse's search path)")
    parser.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    modes = {"plain", "flower", "deployment"} if "all" in args.mode else set(args.mode)
    if modes - {"plain"} and args.data != "cifar10":
        sys.exit(f"--mode {' '.join(sorted(modes - {'plain'}))} trains real fedse clients: use --data cifar10")
    # `kill` (SIGTERM) ends the benchmark through its cleanup, which stops every process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None
    header = {"device": args.device, "gpu": gpu, "torch": torch.__version__, "command": " ".join(sys.argv)}
    print(json.dumps(header), flush=True)
    rows, fitted = [], 0
    for k in args.concurrency:
        row = plain(args, k) if "plain" in modes else None
        if row is not None:
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row["oom"]:
                break
            fitted = k
        for name, run in (("flower", flower), ("deployment", deployment)):
            if name in modes:
                f = run(args, k)
                if row is not None:
                    f["ratio_to_plain"] = _ratio_to_plain(f, row)
                rows.append(f)
                print(json.dumps(f), flush=True)
    summary = {
        "largest_concurrent_without_oom": fitted,
        "out_of_memory_at": next((r["concurrent"] for r in rows if r.get("oom")), None),
        "client_gpu_fraction_that_avoids_it": round(1 / fitted, 4) if fitted and gpu else None,
    }
    print(json.dumps(summary), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_suffix(".tmp")
        tmp.write_text(json.dumps({**header, "runs": rows, "summary": summary}, indent=1))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
