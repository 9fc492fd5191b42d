"""What a user sees: the one line --quiet prints, compare's progress, predict's messages, the privacy
summary and the round line's epsilon, client-level DP's warning, and one log line per event."""

from __future__ import annotations

import io
import json
import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import FedAvg
from rich.console import Console

import fedse.simulation
import simulations.compare
from fedse.analysis.report import RunLog
from fedse.cli import main
from fedse.config import config_from_dict, config_to_dict
from fedse.federation.server import (
    RunRecorder,
    _Stderr,
    client_dp_warning,
    final_tables,
    format_privacy,
    privacy_report,
    setup_logging,
)
from fedse.federation.strategy import GuardedStrategy
from fedse.personal import client_model_path
from fedse.privacy import make_client_dp, sample_noise_multiplier
from fedse.records import CONFIG, CONFIG_JSON, evaluate_schema, train_schema
from fedse.simulation import SharedProgress, SimulationResult, _Progress, progress_bar

# --------------------------------------------------------------------------- --quiet: the one line a script needs


def test_simulate_quiet_prints_only_the_run_folder(capsys, tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "r"
    seen = {}

    def simulate(cfg, **kwargs):
        seen.update(kwargs)
        return SimulationResult(run_dir, None, 0.0)

    monkeypatch.setattr(fedse.simulation, "simulate", simulate)
    assert main(["simulate", "--set", f"output.dir={tmp_path / 'runs'}", "--quiet"]) == 0
    assert seen["quiet"] is True
    assert capsys.readouterr().out == f"{run_dir}\n"


def test_simulate_quiet_on_a_finished_run_prints_its_folder(capsys, tmp_path, monkeypatch):
    import simulations.simulate

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config_from_dict({}))))
    finished = SimpleNamespace(finished=True, round=20)
    monkeypatch.setattr(simulations.simulate, "check_resume", lambda *a, **k: finished)
    assert main(["simulate", "--resume", str(run), "--quiet"]) == 0
    assert capsys.readouterr().out == f"{run}\n"
    assert main(["simulate", "--resume", str(run)]) == 0  # without --quiet: what happened, in words
    assert "finished all its 20 rounds; nothing to add" in capsys.readouterr().out


def test_compare_quiet_prints_only_its_folder_and_shows_no_progress(capsys, tmp_path, monkeypatch):
    seen = {}

    def compare(cfg, methods, seeds, out, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(simulations.compare, "compare", compare)
    out = tmp_path / "cmp"
    assert main(["compare", "--methods", "fedavg", "--out", str(out), "--quiet"]) == 0
    assert seen["quiet"] is True
    assert capsys.readouterr().out == f"{out}\n"


# --------------------------------------------------------------------------- compare's progress display


def _bar() -> tuple[object, io.StringIO]:
    text = io.StringIO()
    return progress_bar(Console(file=text, width=300, force_terminal=False)), text


def _round_log(epsilon: float | None = None, dp_epsilon: float | None = None) -> RunLog:
    log = RunLog()
    train = {"num-examples": 10, "train-loss": 0.5}
    if dp_epsilon is not None:
        train = {"num-examples": 10, "dp-epsilon": dp_epsilon}
    log.train[1] = {0: train}
    log.evaluate[1] = {0: {"num-examples": 5, "local-acc": 0.8}}
    log.round_seconds[1] = 1.5
    if epsilon is not None:
        log.epsilon[1] = epsilon
    return log


def test_a_run_in_compares_display_adds_its_bar_and_labels_its_round_lines():
    bar, text = _bar()
    with _Progress(2, quiet=True, shared=SharedProgress(bar, "fedse seed 1")) as rounds:
        [task] = [t for t in bar.tasks if t.description == "fedse seed 1"]
        rounds(1, _round_log())
        assert task.completed == 1 and task.total == 2
    assert bar.tasks == []  # its bar of rounds goes when the run ends; compare's bar of runs stays
    [line] = text.getvalue().splitlines()
    assert line.startswith("fedse seed 1  round 1/2  clients 1")


def test_quiet_rounds_print_nothing(capsys):
    progress = _Progress(2, quiet=True)
    with progress:
        progress(1, _round_log())
    assert capsys.readouterr() == ("", "")


def test_compare_shows_a_bar_of_runs_and_each_run_in_it(tmp_path, monkeypatch):
    shown = []

    def run(cfg, method, seed, out, holdout, progress=None):
        shown.append((method, seed, progress))
        return SimpleNamespace(method=method, seed=seed)

    monkeypatch.setattr(simulations.compare, "_run", run)
    monkeypatch.setattr(simulations.compare, "write_comparison", lambda *a, **k: {})
    simulations.compare.compare(tiny_config(), ["fedavg", "fedse"], [0, 1], tmp_path / "c", quiet=False)
    assert [(m, s, p.label) for m, s, p in shown] == [
        ("fedavg", 0, "fedavg seed 0"),
        ("fedse", 0, "fedse seed 0"),
        ("fedavg", 1, "fedavg seed 1"),
        ("fedse", 1, "fedse seed 1"),
    ]
    bar = shown[0][2].bar
    [runs] = bar.tasks
    assert runs.description == "runs (method x seed)" and runs.completed == runs.total == 4
    shown.clear()
    simulations.compare.compare(tiny_config(), ["fedavg"], [0], tmp_path / "d", quiet=True)
    assert shown == [("fedavg", 0, None)]


# --------------------------------------------------------------------------- the round line's epsilon


@pytest.mark.parametrize(
    ("mode", "log", "label"),
    [
        ("client", _round_log(epsilon=1.25), "eps(client-level) 1.250"),
        ("sample", _round_log(dp_epsilon=2.5), "eps(sample-level, max over clients) 2.500"),
    ],
)
def test_the_round_lines_epsilon_says_what_it_is(mode, log, label):
    bar, text = _bar()
    with _Progress(1, quiet=True, privacy=mode, shared=SharedProgress(bar, "r")) as rounds:
        rounds(1, log)
    [line] = text.getvalue().splitlines()
    assert line.endswith(label) and " eps " not in line


# --------------------------------------------------------------------------- fedse predict


def _run_folder(tmp_path, clients):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config_from_dict({}))))
    for cid in clients:
        path = client_model_path(run, cid)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    images = tmp_path / "images"
    images.mkdir()
    return run, images


def test_predict_on_a_run_folder_without_client_says_what_is_allowed(capsys, tmp_path):
    run, images = _run_folder(tmp_path, range(3))
    assert main(["predict", str(run), "--images", str(images), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedse: error: ") and len(err.splitlines()) == 1
    assert "is a simulation run folder, which holds one model per client: pass --client N (N in 0..2" in err
    assert main(["predict", str(run), "--client", "7", "--images", str(images), "--out", str(tmp_path / "s")]) == 2
    assert "no personalized model for client 7" in (err := capsys.readouterr().err) and "N in 0..2" in err


def test_predict_on_a_run_folder_without_client_models_says_so(capsys, tmp_path):
    run, images = _run_folder(tmp_path, [])
    assert main(["predict", str(run), "--images", str(images), "--out", str(tmp_path / "s.csv")]) == 2
    assert "this one holds none" in (err := capsys.readouterr().err) and "output.client_models=false" in err


@pytest.mark.parametrize(("client", "whose"), [(None, "a new client's model"), (4, "client 4's model")])
def test_predict_names_whose_model_scored_the_images(capsys, tmp_path, monkeypatch, client, whose):
    import fedse.data.readers
    import fedse.personal

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"")
    loaded = SimpleNamespace(header={"client": client}, classes=["0", "1"])
    monkeypatch.setattr(fedse.personal, "load_personalized", lambda path, client: loaded)
    monkeypatch.setattr(fedse.personal, "predict_csv", lambda *a: None)
    monkeypatch.setattr(fedse.data.readers, "read_images", lambda files: torch.zeros(len(files), 1, 8, 8))
    out = tmp_path / "s.csv"
    assert main(["predict", str(tmp_path / "m.fedse"), "--images", str(images), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"1 images scored with {whose}" in printed and "None" not in printed


# --------------------------------------------------------------------------- the privacy summary


def _sample_cfg(**privacy):
    return tiny_config(model={"norm": "groupnorm"}, privacy={"mode": "sample", **privacy})


def _sample_log(sizes: dict[int, int]) -> RunLog:
    log = RunLog()
    log.train[1] = {cid: {"num-examples": n, "dp-epsilon": 0.5 + cid} for cid, n in sizes.items()}
    return log


def test_sample_level_calibrated_sigma_is_recorded_per_client():
    cfg = _sample_cfg(target_epsilon=8.0)
    sizes = {0: 40, 1: 200, 2: 41}  # 40 and 41: the same steps per epoch (batch 64), so the same sigma
    report = privacy_report(cfg, _sample_log(sizes), None)
    assert cfg.privacy.noise_multiplier is None  # config.yaml records null: summary.json has the sigmas
    per_client = report["noise_multiplier_per_client"]
    assert set(per_client) == {"0", "1", "2"}
    for cid, n in sizes.items():
        assert per_client[str(cid)] == pytest.approx(sample_noise_multiplier(cfg, n, private_first=False))
    assert per_client["0"] == per_client["2"] != per_client["1"]
    assert report["noise_multiplier"] == max(per_client.values())
    assert report["noise_multiplier_min"] == min(per_client.values())
    assert "calibrated on each client to target_epsilon 8.0" in report["noise_multiplier_source"]
    assert json.loads(json.dumps(report)) == report  # summary.json holds it as it is
    text = format_privacy(report)
    assert "{" not in text and "': " not in text  # labelled lines, not a Python dict
    lines = text.splitlines()
    assert lines[0] == "privacy:"
    labels = [line.split("  ")[1].strip() for line in lines[1:]]
    assert labels == ["mode", "level", "epsilon", "delta", "noise multiplier", "clipping", "accountant"]
    assert "level             sample: one training example of one client" in text
    assert "2.5000 (sample-level, max over clients)" in text
    low, high = min(per_client.values()), max(per_client.values())
    assert f"{low:.3f} to {high:.3f} over 3 clients" in text


def test_sample_level_configured_sigma_is_one_number():
    report = privacy_report(_sample_cfg(noise_multiplier=1.1), _sample_log({0: 40}), None)
    assert report["noise_multiplier"] == 1.1 and report["noise_multiplier_source"] == "configured"
    assert "noise_multiplier_per_client" not in report
    assert "noise multiplier  1.100 (configured)" in format_privacy(report)


def test_client_level_summary_is_labelled():
    cfg = tiny_config(privacy={"mode": "client", "target_epsilon": 5.0, "clipping_norm": 0.5})
    dp = make_client_dp(cfg, 3, 3)
    dp.release()
    report = privacy_report(cfg, RunLog(), dp)
    assert report["noise_multiplier_source"] == "calibrated to target_epsilon 5.0 over 2 rounds"
    text = format_privacy(report)
    assert f"{dp.epsilon():.4f} (client-level, 1 releases of 3 clients each)" in text
    assert f"noise multiplier  {dp.noise_multiplier:.3f} (calibrated to target_epsilon 5.0" in text
    assert "level             client: all data of one client" in text
    assert "clipping          fixed, norm 0.5" in text
    assert format_privacy({"mode": "none"}) == ""


def test_the_final_tables_name_their_columns_in_the_readmes_words():
    from fedse.records import LOCAL_ACC, NUM_EXAMPLES, NUM_TRAIN, POOLED_ACC

    ev = {c: {NUM_TRAIN: 40 + c, NUM_EXAMPLES: 10, LOCAL_ACC: 0.5 + c / 10, POOLED_ACC: 0.4} for c in (0, 1)}
    text = final_tables(RunLog(evaluate={2: ev}))
    clients, summary = (t.splitlines() for t in text.split("\n\n")[:2])
    words = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    readable = ["personalized accuracy (own test part)", "pooled accuracy"]
    assert words(clients[0]) == ["client", "train samples", *readable]
    assert words(summary[0]) == ["over clients", *readable]
    assert words(clients[3]) == ["1", "41", "0.6000", "0.4000"] and words(summary[2]) == ["mean", "0.5500", "0.4000"]
    assert "local_acc" not in text and "pooled_acc" not in text and "train_samples" not in text


# --------------------------------------------------------------------------- client-level DP's warning


def test_client_level_dp_warns_when_the_noise_outweighs_the_mean_update():
    cfg = tiny_config(privacy={"mode": "client", "noise_multiplier": 1.0})
    dp = make_client_dp(cfg, 10, 10)
    warning = client_dp_warning(dp, 77_754)  # the quickstart model's shared values
    assert warning == (
        "client-level DP: the noise on the mean update is sigma/m = 0.1 of the clipping norm per shared value "
        "(noise multiplier 1, 10 clients a round), 27.9 times the clipping norm over its 77,754 shared values, "
        "more than the mean of clipped updates can be; with fewer than 279 clients a round expect little learning"
    )
    assert math.ceil(math.sqrt(77_754)) == 279
    assert client_dp_warning(make_client_dp(cfg, 300, 300), 77_754) is None  # sqrt(d)/m < 1: no warning


# --------------------------------------------------------------------------- one line per event


def test_setup_logging_twice_leaves_one_handler_and_one_line(capsys):
    root_text = io.StringIO()
    root_handler = logging.StreamHandler(root_text)
    logging.getLogger().addHandler(root_handler)  # a root handler, as Opacus's basicConfig would add
    try:
        setup_logging()
        setup_logging()
        fedse_log = logging.getLogger("fedse")
        assert len([h for h in fedse_log.handlers if isinstance(h, _Stderr)]) == 1 and fedse_log.propagate is False
        assert logging.getLogger("flwr").propagate is False
        fedse_log.warning("one event")
        logging.getLogger("flwr").warning("a Flower event")
        assert capsys.readouterr().err.count("WARNING fedse: one event\n") == 1
        assert root_text.getvalue() == ""  # neither line reached the root handler a second time
    finally:
        logging.getLogger().removeHandler(root_handler)


def test_importing_opacus_through_fedse_leaves_no_root_handler_of_its_own():
    import fedse.privacy

    opacus = fedse.privacy._OPACUS_FORMAT
    assert not [
        h
        for h in logging.getLogger().handlers
        if h.formatter is not None and (h.formatter._fmt, h.formatter.datefmt) == opacus
    ]


class _Grid:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):
        self.sent += list(messages)
        return []


def test_the_config_goes_with_every_message_but_not_into_flowers_log(task_identity):
    shared = {"w": torch.zeros(2)}
    guard = GuardedStrategy(
        FedAvg(),
        train_schema(shared, dp_sample=False, digests=False, max_examples=10),
        lambda pooled: evaluate_schema(pooled=pooled, max_examples=10, max_train=10),
    )
    recorder = RunRecorder(guard, RunLog(), num_rounds=1, message_config={CONFIG_JSON: '{"the-config": 1}'})
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logging.getLogger("flwr").addHandler(handler)
    try:
        grid = _Grid()
        recorder.start(grid=grid, initial_arrays=ArrayRecord({"w": Array(np.zeros(2, np.float32))}), num_rounds=1)
    finally:
        logging.getLogger("flwr").removeHandler(handler)
    assert len(grid.sent) == 4  # train and evaluate, two nodes
    assert all(m.content[CONFIG][CONFIG_JSON] == '{"the-config": 1}' for m in grid.sent)
    assert "Starting" in text.getvalue() and "the-config" not in text.getvalue()
