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
        "config.yaml",
        "rounds.json",
        "rounds.csv",
        "clients.json",
        "clients.csv",
        "summary.json",
        "label_counts.json",
        "label_distribution.png",
        "accuracy.png",
        "shared_weights.pt",
    }
    from fedse.data.federated import build_federated_data

    # Every figure of the report, recomputed by hand from the replies the server logged
    # (client_rounds.json: round -> client -> what the client reported).
    evaluated = json.loads((result.run_dir / "client_rounds.json").read_text())["evaluate"]
    assert sorted(evaluated) == ["1", "2"] and all(sorted(evaluated[r]) == ["0", "1", "2"] for r in evaluated)
    fed = build_federated_data(cfg)
    clients = json.loads((result.run_dir / "clients.json").read_text())
    assert [c["client"] for c in clients] == [0, 1, 2]
    for c in clients:  # from the last round, and on the client's own partition
        row, shard = evaluated["2"][str(c["client"])], fed.shard(c["client"])
        assert c["round"] == 2 and (c["local_acc"], c["pooled_acc"]) == (row["local-acc"], row["pooled-acc"])
        assert c["test_samples"] == row["num-examples"] == len(shard.test_labels)
        assert c["train_samples"] == len(shard.train_labels)
        correct = c["local_acc"] * c["test_samples"]  # an accuracy is a count of right answers over n
        assert correct == pytest.approx(round(correct), abs=1e-9)
    rounds = json.loads((result.run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        rows = evaluated[str(r["round"])].values()
        assert r["local_acc_mean"] == pytest.approx(sum(x["local-acc"] for x in rows) / 3)
        n = sum(x["num-examples"] for x in rows)
        assert r["local_acc_weighted"] == pytest.approx(sum(x["local-acc"] * x["num-examples"] for x in rows) / n)
    assert rounds[1]["pooled_acc_mean"] == pytest.approx(sum(c["pooled_acc"] for c in clients) / 3)  # last round
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["clients"]["mean"]["local_acc"] == pytest.approx(sum(c["local_acc"] for c in clients) / 3)
    assert summary["clients"]["best"]["local_acc"] == max(c["local_acc"] for c in clients)
    assert summary["last_round"] == rounds[-1]
    assert summary["split"]["policy"] == cfg.personalization.policy and summary["split"]["private_params"] > 0


def test_shared_weights_file_has_only_shared_keys(run):
    import torch

    from fedse.data.federated import build_federated_data
    from fedse.models import build_model
    from fedse.policies import create_policy

    cfg, result = run
    ds = build_federated_data(cfg).dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    saved = torch.load(result.run_dir / "shared_weights.pt")
    assert set(saved) == set(create_policy(cfg.personalization.policy).split(model).shared)


def test_checkpoint_after_every_round_and_resume(run, tmp_path):
    import dataclasses
    import shutil

    import torch

    from fedse.checkpoint import load_checkpoint

    cfg, result = run
    ckpt = load_checkpoint(result.run_dir, cfg)
    shared, log = ckpt.shared, ckpt.log
    assert ckpt.accountant == ""  # no client-level DP, no accountant
    assert ckpt.round == 2 and ckpt.finished and set(log.train) == {1, 2}
    assert all(torch.equal(shared[k], result.outcome.shared_state[k]) for k in shared)
    # Resume a copy for one more round: rounds 1-2 come from the checkpoint, round 3 is new.
    copy = tmp_path / "resumed"
    shutil.copytree(result.run_dir, copy)
    more = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, rounds=3))
    resumed = simulate(more, run_dir=copy, resume=True, quiet=True)
    assert sorted(resumed.outcome.log.train) == [1, 2, 3]
    assert [r["round"] for r in json.loads((copy / "rounds.json").read_text())] == [1, 2, 3]
    assert load_checkpoint(copy, more).round == 3
