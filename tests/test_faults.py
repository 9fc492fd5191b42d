"""Faults on Flower's simulation engine: a federation with fewer nodes than the config's clients
is refused before round 1, and a resumed client-level DP run reports the epsilon of one
accountant over all of its rounds."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from conftest import tiny_config

from fedse.federation.strategy import NodeCountError
from fedse.privacy import client_level_epsilon
from fedse.simulation import simulate

pytestmark = pytest.mark.slow


def test_two_supernodes_for_a_ten_client_config_is_an_error_and_leaves_no_folder(tmp_path):
    cfg = tiny_config(
        partition={"num_clients": 10, "alpha": 5.0},
        server={"join_timeout": 2.0},
        output={"dir": str(tmp_path), "name": "nodes"},
    )
    with pytest.raises(NodeCountError, match=r"the federation has 2 nodes .* but the run needs 10"):
        simulate(cfg, quiet=True, num_supernodes=2)
    assert not (tmp_path / "nodes").exists()


def test_resumed_client_level_dp_reports_one_accountant_over_all_rounds(tmp_path):
    sigma = 1.5
    cfg = tiny_config(
        server={"rounds": 2},
        output={"dir": str(tmp_path), "name": "cdp"},
        privacy={"mode": "client", "noise_multiplier": sigma, "clipping_norm": 1.0},
    )
    first = simulate(cfg, quiet=True)
    assert first.outcome.summary["privacy"]["releases"] == 2
    more = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, rounds=3))
    copy = tmp_path / "resumed"
    shutil.copytree(first.run_dir, copy)
    resumed = simulate(more, run_dir=copy, resume=True, quiet=True)
    report = resumed.outcome.summary["privacy"]
    assert report["releases"] == 3
    assert report["epsilon"] == pytest.approx(client_level_epsilon(sigma, 3, cfg.privacy.delta), rel=1e-12)
    rounds = json.loads((copy / "rounds.json").read_text())
    assert [r["epsilon"] for r in rounds] == pytest.approx(
        [client_level_epsilon(sigma, r, cfg.privacy.delta) for r in (1, 2, 3)], rel=1e-12
    )
