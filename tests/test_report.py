"""CSV output: a cell a spreadsheet would run as a formula is written as text."""

import csv

import numpy as np
import pytest
from conftest import tiny_config

from fedse.analysis.report import write_csv


@pytest.mark.parametrize(
    "value,written",
    [
        ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"),
        ("+1+cmd", "'+1+cmd"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
        ("\t=1", "'\t=1"),
        ("cat", "cat"),
        ("-0.5", "-0.5"),  # text that is a plain number stays a number
        ("-1e-3", "-1e-3"),
        (-0.25, -0.25),
        (-3, -3),
        (np.float64(-1.5), np.float64(-1.5)),
        (None, None),
        (True, True),
    ],
)
def test_csv_cell_escapes_formulas_and_keeps_numbers(value, written):
    from fedse.io import csv_cell

    assert csv_cell(value) == written


def test_write_csv_escapes_every_cell_a_spreadsheet_would_run(tmp_path):
    evil = "=cmd|' /C calc'!A0"
    path = tmp_path / "clients.csv"
    write_csv(path, [{"client": evil, "local_acc": -0.5, evil: "@x"}, {"client": "b", "local_acc": 0.75, evil: 3}])
    rows = list(csv.reader(path.open()))
    assert rows == [
        ["client", "local_acc", "'" + evil],
        ["'" + evil, "-0.5", "'@x"],
        ["b", "0.75", "3"],
    ]


def test_the_round_line_names_both_personalized_accuracies_and_pooled_only_when_measured(monkeypatch):
    # Two clients, 10 and 30 test images, accuracies 0.5 and 0.9: mean 0.7, weighted (5 + 27) / 40 = 0.8.
    from fedse.analysis.report import RunLog
    from fedse.simulation import _Progress

    log = RunLog()
    log.train[1] = {0: {"num-examples": 5, "train-loss": 1.0, "train-acc": 0.5}}
    log.evaluate[1] = {
        0: {"num-examples": 10, "local-acc": 0.5, "local-loss": 1.0},
        1: {"num-examples": 30, "local-acc": 0.9, "local-loss": 0.5},
    }
    log.round_seconds[1] = 2.0
    out = __import__("io").StringIO()
    with _Progress(rounds=2, quiet=False) as progress:
        monkeypatch.setattr(progress.bar.console, "_file", out)  # rich's shared console: its own stream restored
        progress(1, log)
    line = next(line for line in out.getvalue().splitlines() if line.startswith("round 1/2"))
    assert "personalized mean 0.7000 weighted 0.8000" in line
    assert "pooled" not in line  # not measured this round: not shown as "-"


# --------------------------------------------------------------------------- the round plot, as a reader sees it


def _rounds(pooled_in=(3,)):
    """Three rounds of round_rows, pooled accuracy measured in the rounds ``pooled_in`` only."""
    return [
        {
            "round": n,
            "train_acc": 0.4 + 0.1 * n,
            "local_acc_mean": 0.3 + 0.1 * n,
            "local_acc_weighted": 0.31 + 0.1 * n,
            "pooled_acc_mean": 0.7 if n in pooled_in else None,
        }
        for n in (1, 2, 3)
    ]


def _whole_ticks(ax):
    """Ticks matplotlib would draw inside the x range: whole numbers only, and the locator says so."""
    from matplotlib.ticker import MaxNLocator

    locator = ax.xaxis.get_major_locator()
    lo, hi = ax.get_xlim()
    ticks = [t for t in locator() if lo <= t <= hi]
    return isinstance(locator, MaxNLocator) and locator._integer and all(float(t).is_integer() for t in ticks)


def test_the_round_plot_has_whole_rounds_a_titled_setting_and_labelled_axes(tmp_path):
    import matplotlib.pyplot as plt

    from fedse.analysis.report import accuracy_figure, describe_split, plot_accuracy
    from fedse.config import config_to_record

    cfg = config_to_record(
        tiny_config(partition={"num_clients": 20, "alpha": 0.1}, personalization={"policy": "fedavg"})
    )
    title = f"{describe_split(cfg)}: fedavg"
    assert title == "digits, Dirichlet(0.1), 20 clients: fedavg"
    fig = accuracy_figure(_rounds(), title)
    ax = fig.axes[0]
    assert ax.get_title() == title
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("round", "accuracy")
    assert _whole_ticks(ax)
    assert not any("global" in t.get_text().lower() for t in ax.get_legend().get_texts())
    plt.close(fig)
    assert plot_accuracy(_rounds(), tmp_path / "a.png", title).axes[0].get_title() == title  # the figure it saved
    assert (tmp_path / "a.png").read_bytes().startswith(b"\x89PNG")


def test_pooled_accuracy_measured_in_the_last_round_only_is_a_labelled_marker_with_its_value():
    import matplotlib.pyplot as plt

    from fedse.analysis.report import accuracy_figure

    fig = accuracy_figure(_rounds(pooled_in=(3,)))
    ax = fig.axes[0]
    pooled = [line for line in ax.get_lines() if "pooled" in line.get_label()]
    assert len(pooled) == 1
    line = pooled[0]
    assert line.get_label() == "pooled test set, mean over clients (last round only)"
    assert list(line.get_xdata()) == [3] and line.get_markersize() >= 10 and line.get_linestyle() == "None"
    assert "pooled test set, mean over clients (last round only)" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "70.0%" in [t.get_text() for t in ax.texts]  # its value written beside it
    plt.close(fig)
    # measured in several rounds: a curve, named as such; never measured: nothing
    fig = accuracy_figure(_rounds(pooled_in=(2, 3)))
    assert [line.get_label() for line in fig.axes[0].get_lines() if "pooled" in line.get_label()] == [
        "pooled test set, mean over clients (rounds measured)"
    ]
    plt.close(fig)
    fig = accuracy_figure(_rounds(pooled_in=()))
    assert not [line for line in fig.axes[0].get_lines() if "pooled" in line.get_label()]
    plt.close(fig)


@pytest.mark.parametrize(
    "partition,expected",
    [
        ({"scheme": "iid"}, "digits, IID, 3 clients"),
        ({"scheme": "dirichlet", "alpha": 0.1, "num_clients": 20}, "digits, Dirichlet(0.1), 20 clients"),
        ({"scheme": "dirichlet-client", "alpha": 0.3}, "digits, per-client Dirichlet(0.3), 3 clients"),
        ({"scheme": "pathological", "classes_per_client": 2}, "digits, 2 classes per client, 3 clients"),
        ({"scheme": "quantity", "alpha": 0.5}, "digits, quantity skew Dirichlet(0.5), 3 clients"),
    ],
)
def test_describe_split_names_the_dataset_the_split_and_the_clients(partition, expected):
    from fedse.analysis.report import describe_split

    cfg = tiny_config(partition=partition)
    assert describe_split(cfg) == expected  # a Config
    from fedse.config import config_to_record

    assert describe_split(config_to_record(cfg)) == expected  # or its record, as a run folder holds it


def test_a_runs_rounds_config_and_tables_are_read_back_from_its_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedse.analysis.tracking import TENSORBOARD_DIR, TensorBoardLog

    board = TensorBoardLog(tmp_path)
    rows = [
        {"round": 1, "local_acc_mean": 0.5, "local_acc_weighted": 0.6, "pooled_acc_mean": None, "train_loss": 1.5,
         "seconds": 2.0, "dropped": 0, "refused": False},
        {"round": 2, "local_acc_mean": 0.7, "local_acc_weighted": 0.8, "pooled_acc_mean": 0.65, "train_loss": 1.0,
         "seconds": 1.5, "dropped": 1, "refused": True},
    ]  # fmt: skip
    for row in rows:
        board.round(row)
    board.run(tiny_config(), {"clients": "| client | local_acc |"})
    board.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = {tag: [(e.step, round(e.value, 6)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert scalars["accuracy/personalized_mean_over_clients"] == [(1, 0.5), (2, 0.7)]
    assert scalars["accuracy/personalized_weighted_by_test_samples"] == [(1, 0.6), (2, 0.8)]
    assert scalars["accuracy/pooled_test_mean_over_clients"] == [(2, 0.65)]  # measured in round 2 only
    assert scalars["replies/round_refused"] == [(1, 0.0), (2, 1.0)] and scalars["time/round_seconds"][0] == (1, 2.0)
    texts = set(events.Tags()["tensors"])
    assert {"config/text_summary", "clients/text_summary"} <= texts


@pytest.mark.parametrize(
    ("mode", "tag"),
    [
        ("client", "privacy/epsilon_client_level"),
        ("sample", "privacy/epsilon_sample_level_max_over_clients"),
        (None, "privacy/epsilon"),
    ],
)
def test_the_epsilon_on_the_board_is_tagged_with_its_level(tmp_path, mode, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedse.analysis.tracking import TENSORBOARD_DIR, TensorBoardLog

    board = TensorBoardLog(tmp_path, privacy=mode)
    board.round({"round": 1, "epsilon": 1.5, "seconds": 2.0})
    board.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR), size_guidance={"scalars": 0})
    events.Reload()
    assert [t for t in events.Tags()["scalars"] if t.startswith("privacy/")] == [tag]
    assert [(e.step, e.value) for e in events.Scalars(tag)] == [(1, 1.5)]


def test_tensorboard_without_its_package_is_refused_before_anything_starts(monkeypatch):
    import importlib.util

    from fedse.config import ConfigError
    from fedse.spec import resolve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'output\.tensorboard': true needs the package tensorboard"):
        resolve(tiny_config(output={"tensorboard": True}))
    resolve(tiny_config())  # off: nothing asked
