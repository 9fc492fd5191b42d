"""Command-line numbers are hostile until checked: fedse monitor's bounds."""

import re

import pytest
import yaml

from fedse.cli import main
from fedse.config import Config, config_to_record


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["--max-other", "-1"], r"--max-other -1: out of range; allowed: an integer in \[1, 1000000\]"),
        (["--max-other", "0"], r"--max-other 0: out of range"),
        (["--max-other", str(10**30)], r"--max-other 1000000000000000000000000000000: out of range"),
        (["--seed", "-1"], r"--seed -1: out of range; allowed: an integer in \[0, 4294967295\]"),
        (["--seed", str(2**80)], r"--seed 1208925819614629174706176: out of range"),
    ],
)
def test_fedse_monitor_refuses_numbers_out_of_range_before_any_work(tmp_path, capsys, argv, pattern):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_record(Config())))
    assert main(["monitor", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedse: error: ") and err.count("\n") == 1
    assert re.search(pattern, err), err
    assert not (run / "monitor").exists()
