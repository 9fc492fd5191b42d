"""A simulation on a multi-node Ray cluster that the test starts and stops (Ray's own
``ray.cluster_utils.Cluster``: a head and a second node on this machine): clients run on both
nodes, private state and the run folder come out right, and every Ray process is stopped."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")


def _node_recording_app(record_dir, export_dir=None, state_root=None):
    """fedse's ClientApp, with each call recording the Ray node it ran on (test only)."""
    from flwr.clientapp import ClientApp

    from fedse.federation.client import handle_evaluate, handle_train

    def on_node(handler):
        def wrapped(msg, context):
            node = ray.get_runtime_context().get_node_id()
            (record_dir / f"{context.node_id}-{node}").touch()
            return handler(msg, context)

        return wrapped

    app = ClientApp()
    app.train()(on_node(lambda msg, context: handle_train(msg, context, state_root)))
    app.evaluate()(on_node(lambda msg, context: handle_evaluate(msg, context, export_dir, state_root)))
    return app


def test_simulation_runs_on_two_ray_nodes(tmp_path):
    from ray.cluster_utils import Cluster

    import fedse.simulation

    seen = tmp_path / "seen"
    seen.mkdir()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        cfg = tiny_config(
            partition={"num_clients": 4, "alpha": 5.0},
            server={"rounds": 2, "min_train_clients": 4, "min_evaluate_clients": 4},
            simulation={"ray_address": cluster.address, "client_cpus": 1.0},
            output={"dir": str(tmp_path), "name": "cluster"},
        )
        result = fedse.simulation.simulate(
            cfg,
            quiet=True,
            client_app_factory=lambda export_dir=None, state_root=None: _node_recording_app(
                seen, export_dir, state_root
            ),
        )
    finally:
        ray.shutdown()
        cluster.shutdown()
    nodes = {name.name.split("-", 1)[1] for name in seen.iterdir()}
    assert len(nodes) == 2  # clients ran on both nodes
    # Private state stayed with each client across rounds (context.state lives with the node's
    # ClientApp state in the driver's simulation engine, wherever the actor ran).
    rows = result.outcome.log.train
    assert sorted(rows) == [1, 2] and all(len(r) == 4 for r in rows.values())
    for cid in range(4):
        assert rows[2][cid]["private-digest-in"] == rows[1][cid]["private-digest-out"]
    assert json.loads((result.run_dir / "rounds.json").read_text())[-1]["round"] == 2
    # Every client wrote its model file from whichever node evaluated it (one machine: one filesystem).
    assert sorted(p.name for p in (result.run_dir / "clients").iterdir()) == [f"client_{c:05d}.fedse" for c in range(4)]
    assert not ray.is_initialized()
