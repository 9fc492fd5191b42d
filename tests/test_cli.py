"""The command line: bad input is a clear error and exit code 2, nothing is run."""

from fedse.cli import main


def test_unknown_key_exits_2_naming_it(capsys):
    assert main(["simulate", "--set", "partition.alhpa=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'partition.alhpa'" in err and "'alpha'" in err


def test_missing_dataset_exits_2_naming_the_file(capsys, tmp_path):
    code = main(["simulate", "--set", "data.dataset=mnist", "--set", f"data.root={tmp_path}",
                 "--set", f"output.dir={tmp_path / 'runs'}", "--quiet"])
    assert code == 2
    assert "train-images-idx3-ubyte.gz" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_missing_config_file(capsys, tmp_path):
    assert main(["simulate", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_merge_needs_an_out_folder_and_real_comparisons(capsys, tmp_path):
    assert main(["compare", "--merge", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "--merge needs --out" in capsys.readouterr().err
    assert main(["compare", "--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c")]) == 2
    assert "is not a comparison folder" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
