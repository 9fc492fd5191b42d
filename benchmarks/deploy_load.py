"""Deployment load: 16 SuperNodes on 127.0.0.1, TLS and SuperNode authentication on, 3 rounds, 2 killed.

One SuperLink (TLS, ``--enable-supernode-auth``), 16 registered SuperNodes, each
its own process with its own ``state-dir`` and partition of the quickstart
config (digits, 16 clients); one ``flwr run`` of 3 rounds, every client sampled.
Once round 2 has started, 2 SuperNodes are killed (SIGKILL, with their ClientApp
processes). Reported: each round's time and client count (from the run's
``rounds.json``), the SuperLink's peak RSS (VmHWM) and the SuperNodes' largest,
and whether every round completed. Every process started is stopped.
The SuperLink keeps its state in memory (its default); ``--database`` puts it in
an SQLite file instead.

    python benchmarks/deploy_load.py --json benchmarks/results/deploy_load.json

Needs ``openssl`` and ``ssh-keygen``. About 3-5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NODES, KILLED, ROUNDS = 16, 2, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--database",
        action="store_true",
        help="the SuperLink keeps its state in an SQLite file (--database) instead of in memory",
    )
    args = parser.parse_args()
    # `kill` (SIGTERM) ends the benchmark through its cleanup, which stops every process it started
    # (a background job's SIGINT may be ignored).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))

    from fedse.deployment.deploy import (
        make_node_key,
        make_test_certs,
        superlink_command,
        supernode_command,
        write_connection,
    )
    from fedse.deployment.launch import (
        LocalProcesses,
        flower_env,
        free_port,
        register_supernode,
        run_rounds,
        start_run,
        start_superlink,
        start_supernodes,
    )

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env = flower_env(tmp / "flwr_home")
        procs = LocalProcesses(env, tmp / "logs", ROOT)
        certs = make_test_certs(tmp / "certs")
        keys = [make_node_key(tmp / "keys" / f"node{i}") for i in range(NODES)]
        port = free_port()
        address = f"127.0.0.1:{port}"
        write_connection(tmp / "flwr_home", "tls", address, certs.ca)
        overrides = (
            f"partition.num_clients={NODES} server.rounds={ROUNDS} server.min_train_clients={NODES - KILLED} "
            f"server.min_evaluate_clients={NODES - KILLED} server.round_timeout=900 server.join_timeout=120"
        )
        out = tmp / "runs"
        started = time.perf_counter()
        try:
            start_superlink(
                procs, superlink_command(certs=certs, port=port, database=tmp / "state.db" if args.database else None)
            )
            for i in range(NODES):
                reg = register_supernode(keys[i], f"node{i}", connection="tls", env=env, cwd=ROOT)
                if reg.returncode != 0:
                    sys.exit(f"registering node {i} failed:\n{reg.stdout}{reg.stderr}")
            start_supernodes(
                procs,
                [
                    supernode_command(
                        superlink=address,
                        ca=certs.ca,
                        key=keys[i].with_suffix(""),
                        port=free_port(),
                        node_config={"partition-id": i, "num-partitions": NODES, "state-dir": str(tmp / f"state{i}")},
                    )
                    for i in range(NODES)
                ],
            )
            run_started = time.perf_counter()
            run = start_run(procs, "run", "tls", {"overrides": overrides, "output-dir": str(out)})
            procs.wait_log("run", lambda log: "[ROUND 2/3]" in log, 900, "round 2", alive=("superlink",))
            for i in range(KILLED):
                procs.kill(f"node{NODES - 1 - i}")
            code = run.wait(timeout=1200)
            run_seconds = time.perf_counter() - run_started
            superlink_rss = procs.peak_rss_mb("superlink")
            node_rss = max(procs.peak_rss_mb(f"node{i}") for i in range(NODES - KILLED))
            if code != 0:
                sys.exit(f"flwr run failed ({code}):\n{procs.log('run')[-3000:]}")
        finally:
            procs.stop_all()
        left = procs.running()
        rounds = run_rounds(out)
    from fedse.analysis.report import COL_CLIENTS, COL_FAILED, COL_ROUND, COL_SECONDS

    figures = {
        "nodes": NODES,
        "killed_after_round_2_started": KILLED,
        "rounds_completed": [r[COL_ROUND] for r in rounds],
        "superlink_state": "sqlite file" if args.database else "in memory",
        "clients_per_round": [r[COL_CLIENTS] for r in rounds],
        "failed_replies_per_round": [r.get(COL_FAILED, 0) for r in rounds],
        "round_seconds": [round(r[COL_SECONDS], 2) for r in rounds],
        "run_seconds": round(run_seconds, 1),
        "superlink_peak_rss_mb": round(superlink_rss, 1),
        "largest_supernode_peak_rss_mb": round(node_rss, 1),
        "every_round_completed": [r[COL_ROUND] for r in rounds] == list(range(1, ROUNDS + 1)),
        "processes_left_running": left,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(figures), flush=True)
    if args.json:
        from fedse.io import atomic_write_json

        atomic_write_json(args.json, {"command": " ".join(sys.argv), **figures})


if __name__ == "__main__":
    main()
