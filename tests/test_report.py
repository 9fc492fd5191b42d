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
