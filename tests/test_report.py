"""CSV output: a cell a spreadsheet would run as a formula is written as text."""

import csv

import numpy as np
import pytest

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


def test_the_round_line_names_both_personalized_accuracies_and_pooled_only_when_measured(capsys):
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
    with _Progress(rounds=2, quiet=False) as progress:
        progress.bar.console.file = __import__("sys").stdout
        progress(1, log)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("round 1/2"))
    assert "personalized mean 0.7000 weighted 0.8000" in line
    assert "pooled" not in line  # not measured this round: not shown as "-"
