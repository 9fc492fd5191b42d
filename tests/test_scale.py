"""1,000 virtual clients: partitioned, sampled and run for one round on Flower's simulation engine,
at the cost of the sampled clients (MNIST from ../shared/data; skipped where it is absent)."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA, tiny_config

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not (SHARED_DATA / "mnist").is_dir(), reason="../shared/data/mnist not present")
def test_one_round_of_1000_clients_with_10_sampled(tmp_path):
    from fedse.simulation import simulate

    cfg = tiny_config(
        data={"dataset": "mnist", "root": str(SHARED_DATA / "mnist")},
        partition={"num_clients": 1000, "scheme": "dirichlet-client", "alpha": 0.3, "min_size": 10},
        server={
            "rounds": 1,
            "fraction_train": 0.01,
            "fraction_evaluate": 0.01,
            "min_train_clients": 10,
            "min_evaluate_clients": 10,
        },
        output={"dir": str(tmp_path), "name": "k"},
    )
    result = simulate(cfg, quiet=True)
    log = result.outcome.log
    assert len(log.train[1]) == 10 and len(log.evaluate[1]) == 10  # 1% of 1,000, not 1,000
    assert not log.dropped and not log.failed
    from fedse.data.federated import build_federated_data

    fed = build_federated_data(cfg)
    assert {cid: r["num-examples"] for cid, r in log.train[1].items()} == {
        cid: len(fed.train_parts[cid]) for cid in log.train[1]
    }
    assert sum(len(p) + len(q) for p, q in zip(fed.train_parts, fed.test_parts, strict=True)) == 70_000
