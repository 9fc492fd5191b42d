"""A real simulation on Flower's simulation engine (Ray): 3 clients, 2 rounds."""

import json

import pytest

from conftest import tiny_config
from fedse.simulation import simulate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(output={"dir": str(out), "name": "sim"})
    return cfg, simulate(cfg, quiet=True)


def test_private_state_persists_per_client_across_rounds(run):
    _, result = run
    train = result.outcome.log.train
    assert set(train) == {1, 2} and set(train[1]) == set(train[2]) == {0, 1, 2}
    for cid in range(3):
        # Each client starts round 2 from its own round-1 excitation weights.
        assert train[2][cid]["private-digest-in"] == train[1][cid]["private-digest-out"]
    # All start from the common initialisation, then diverge from each other.
    assert len({train[1][c]["private-digest-in"] for c in range(3)}) == 1
    assert len({train[1][c]["private-digest-out"] for c in range(3)}) == 3
    assert len({train[2][c]["private-digest-out"] for c in range(3)}) == 3
    assert not result.outcome.log.dropped and not result.outcome.log.failed


def test_run_folder_holds_every_report_file(run):
    cfg, result = run
    files = {p.name for p in result.run_dir.iterdir()}
    assert files >= {
        "config.yaml", "rounds.json", "rounds.csv", "clients.json", "clients.csv", "summary.json",
        "label_counts.json", "label_distribution.png", "accuracy.png", "shared_weights.pt",
    }
    clients = json.loads((result.run_dir / "clients.json").read_text())
    assert [c["client"] for c in clients] == [0, 1, 2]
    assert all(0 <= c["local_acc"] <= 1 and 0 <= c["pooled_acc"] <= 1 for c in clients)
    rounds = json.loads((result.run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["split"]["policy"] == "fedse-la" and summary["split"]["private_params"] > 0


def test_shared_weights_file_has_only_shared_keys(run):
    import torch

    from fedse.client import build_model
    from fedse.federated import build_federated_data
    from fedse.split import split_model

    cfg, result = run
    ds = build_federated_data(cfg).dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    saved = torch.load(result.run_dir / "shared_weights.pt")
    assert set(saved) == set(split_model(model, "fedse").shared)


def test_checkpoint_after_every_round_and_resume(run, tmp_path):
    import dataclasses
    import shutil

    import torch

    from fedse.server import load_checkpoint

    cfg, result = run
    done, shared, log, ledger = load_checkpoint(result.run_dir, cfg)
    assert ledger == ""  # no client-level DP, no accountant
    assert done == 2 and set(log.train) == {1, 2}
    assert all(torch.equal(shared[k], result.outcome.shared_state[k]) for k in shared)
    # Resume a copy for one more round: rounds 1-2 come from the checkpoint, round 3 is new.
    copy = tmp_path / "resumed"
    shutil.copytree(result.run_dir, copy)
    more = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, rounds=3))
    resumed = simulate(more, run_dir=copy, resume=True, quiet=True)
    assert sorted(resumed.outcome.log.train) == [1, 2, 3]
    assert [r["round"] for r in json.loads((copy / "rounds.json").read_text())] == [1, 2, 3]
    assert load_checkpoint(copy, more)[0] == 3
