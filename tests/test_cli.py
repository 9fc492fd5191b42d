"""The command line: bad input is a clear error and exit code 2, nothing is run."""

from fedse.cli import main


def test_unknown_key_exits_2_naming_it(capsys):
    assert main(["simulate", "--set", "partition.alhpa=0.1"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'partition.alhpa'" in err and "'alpha'" in err


def test_missing_dataset_exits_2_naming_the_file(capsys, tmp_path):
    code = main(
        [
            "simulate",
            "--set",
            "data.dataset=mnist",
            "--set",
            f"data.root={tmp_path}",
            "--set",
            f"output.dir={tmp_path / 'runs'}",
            "--quiet",
        ]
    )
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


def test_budget_table_refuses_a_bad_target_and_a_missing_folder(capsys, tmp_path):
    assert main(["compare", "--budget", str(tmp_path / "a"), "--target", "90"]) == 2
    assert "--target 90.0: allowed: an accuracy in (0, 1]" in capsys.readouterr().err
    assert main(["compare", "--budget", str(tmp_path / "a"), "--out", str(tmp_path / "c")]) == 2
    assert "is not a comparison folder" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


# --------------------------------------------------------------------------- hostile values (issue 13)

import os  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

import fedse.simulation  # noqa: E402
from fedse.config import config_from_dict, config_to_dict  # noqa: E402


def _tree(root):
    """Every path under root with its content (files) or None (folders): what a command wrote."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.fixture
def no_ray(monkeypatch):
    """These commands must fail before the simulation (and Ray) starts."""

    def run_simulation(*args, **kwargs):
        raise AssertionError("Flower's run_simulation was called: the error came after Ray started")

    monkeypatch.setattr(fedse.simulation, "run_simulation", run_simulation)


def _refused(capsys, argv, *needles):
    """Exit code 2, exactly one non-empty stderr line 'fedse: error: ...' holding every needle, no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fedse: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("name", ["../../x", "../escaped", "/ABS", "a/b", "..", "''", "'.'"])  # '': YAML empty
def test_output_name_outside_the_output_dir(capsys, tmp_path, monkeypatch, no_ray, name):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    name = str(tmp_path / "abs") if name == "/ABS" else name
    before = _tree(tmp_path)
    _refused(
        capsys,
        ["simulate", "--set", f"output.name={name}", "--set", "output.dir=runs", "--quiet"],
        "'output.name'",
        "not a plain folder name",
        "allowed",
    )
    assert _tree(tmp_path) == before  # nothing written anywhere, not even output.dir


def test_output_name_taken_by_another_run(capsys, tmp_path, no_ray):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "summary.json").write_text("{}")
    before = _tree(tmp_path)
    _refused(
        capsys,
        ["simulate", "--set", f"output.dir={tmp_path / 'runs'}", "--set", "output.name=r", "--quiet"],
        "already exists and is not empty",
        "output.name",
    )
    assert _tree(tmp_path) == before


@pytest.mark.parametrize(
    "item,key",
    [
        ("train.lr=.nan", "train.lr"),
        ("partition.alpha=.inf", "partition.alpha"),
        ("privacy.clipping_norm=.inf", "privacy.clipping_norm"),
    ],
)
def test_non_finite_numbers(capsys, tmp_path, no_ray, item, key):
    _refused(
        capsys, ["simulate", "--set", item, "--set", f"output.dir={tmp_path / 'runs'}", "--quiet"], f"'{key}'", "finite"
    )
    assert not (tmp_path / "runs").exists()


def test_output_dir_under_a_regular_file(capsys, tmp_path, no_ray):
    (tmp_path / "file").write_text("x")
    before = _tree(tmp_path)
    line = _refused(
        capsys,
        ["simulate", "--set", f"output.dir={tmp_path / 'file' / 'runs'}", "--quiet"],
        "'output.dir'",
        str(tmp_path / "file"),
        "allowed",
    )
    assert "directory" in line
    assert _tree(tmp_path) == before


def test_output_dir_that_is_a_regular_file(capsys, tmp_path, no_ray):
    (tmp_path / "file").write_text("x")
    before = _tree(tmp_path)
    line = _refused(
        capsys,
        ["simulate", "--set", f"output.dir={tmp_path / 'file'}", "--quiet"],
        "'output.dir'",
        str(tmp_path / "file"),
    )
    assert "not a directory" in line.lower()
    assert _tree(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_dir(capsys, tmp_path, no_ray):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _refused(capsys, ["simulate", "--set", f"output.dir={ro}", "--quiet"], "'output.dir'", str(ro))
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_config_path_is_a_directory(capsys, tmp_path, no_ray):
    _refused(capsys, ["simulate", "--config", str(tmp_path)], "is a directory", str(tmp_path))


@pytest.mark.parametrize(
    "items,needles",
    [
        (["privacy.secure_mode=true"], ["'privacy.secure_mode'", "pip install torchcsprng", "os.urandom"]),
        (
            ["privacy.mode=client", "privacy.noise_multiplier=1.0", "server.strategy=fedadam"],
            ["'server.strategy'", "fedadam", "allowed: fedavg, fedprox"],
        ),
        (
            ["privacy.mode=sample", "model.norm=groupnorm", "privacy.noise_multiplier=0"],
            ["'privacy.noise_multiplier'", "(0, inf]"],
        ),
        (["server.max_num_examples=0"], ["'server.max_num_examples'", "[1, inf]"]),
    ],
)
def test_new_keys_are_checked(capsys, tmp_path, no_ray, items, needles):
    import importlib.util

    if "privacy.secure_mode=true" in items and importlib.util.find_spec("torchcsprng") is not None:
        pytest.skip("torchcsprng is installed here")
    argv = ["simulate", "--set", f"output.dir={tmp_path / 'runs'}", "--quiet"]
    for item in items:
        argv += ["--set", item]
    _refused(capsys, argv, *needles)
    assert not (tmp_path / "runs").exists()


def test_truncated_checkpoint_fails_before_ray(capsys, tmp_path, no_ray):
    run = tmp_path / "run"
    run.mkdir()
    cfg = config_from_dict({"output": {"dir": str(tmp_path), "name": "run"}})
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    (run / "checkpoint.pt").write_bytes(b"\x80\x02garbag")  # 10 bytes: a truncated file
    before = _tree(tmp_path)
    line = _refused(capsys, ["simulate", "--resume", str(run), "--quiet"], "checkpoint")
    assert str(run) in line
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("damage,needle", [("nan", "NaN or inf"), ("keys", "do not fit this model")])
def test_loadable_but_malformed_checkpoint_fails_before_ray(capsys, tmp_path, no_ray, damage, needle):
    import torch
    from flwr.app import ArrayRecord

    from fedse.analysis.report import RunLog
    from fedse.checkpoint import save_checkpoint
    from fedse.data.federated import build_federated_data
    from fedse.models import build_model
    from fedse.policies import create_policy

    run = tmp_path / "run"
    run.mkdir()
    cfg = config_from_dict({"output": {"dir": str(tmp_path), "name": "run"}})
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    ds = build_federated_data(cfg).dataset
    model = build_model(cfg, ds.num_classes, ds.channels, ds.image_size)
    shared = create_policy(cfg.personalization.policy).split(model).shared_state(model)
    key = next(k for k, v in shared.items() if v.is_floating_point())
    if damage == "nan":
        shared[key][...] = float("nan")
    else:
        shared["not.a.key"] = torch.zeros(1)
    save_checkpoint(run, cfg, 1, ArrayRecord(shared), RunLog())
    before = _tree(tmp_path)
    _refused(capsys, ["simulate", "--resume", str(run), "--quiet"], needle)
    assert _tree(tmp_path) == before


def test_a_folder_stopped_before_its_first_round_resumes_from_round_one(capsys, tmp_path, monkeypatch):
    # The record is written when a run starts, so a run stopped before its first checkpoint is
    # resumable: it starts afresh in its own folder.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config_from_dict({}))))
    seen = {}

    def simulate(cfg, **kwargs):
        seen.update(kwargs)

    monkeypatch.setattr(fedse.simulation, "simulate", simulate)
    assert main(["simulate", "--resume", str(run), "--quiet"]) == 0
    assert seen["run_dir"] == run and seen["resume"] is True


def test_config_with_resume_shows_what_it_changes_and_the_resume_checks_it(capsys, tmp_path, no_ray):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config_from_dict({}))))
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"train": {"lr": 0.01}, "server": {"rounds": 30}}))
    (run / "checkpoint.pt").write_bytes(b"\x80\x02garbag")
    code = main(["simulate", "--resume", str(run), "--config", str(other), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    # both differences are shown, dotted, with the record's value and the new one
    assert "server.rounds: 20 -> 30" in err and "train.lr: 0.05 -> 0.01" in err


def test_reusing_the_name_of_a_stopped_run_says_how_to_continue_it(capsys, tmp_path, no_ray):
    from flwr.app import ArrayRecord

    from fedse.analysis.report import RunLog
    from fedse.checkpoint import save_checkpoint

    cfg = config_from_dict({"output": {"dir": str(tmp_path), "name": "run"}})
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    save_checkpoint(run, cfg, 6, ArrayRecord(), RunLog())
    line = _refused(
        capsys, ["simulate", "--set", f"output.dir={tmp_path}", "--set", "output.name=run", "--quiet"], "round 6"
    )
    assert f"fedse simulate --resume {run}" in line


def test_a_folder_holding_only_a_dead_runs_claim_is_free_again(tmp_path):
    # A run killed between claiming its folder and writing its record left nothing to resume.
    from fedse.rundir import make_run_dir

    cfg = config_from_dict({"output": {"dir": str(tmp_path), "name": "run"}})
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".fedse-run").write_text("claimed by pid 999999999 at 2026-01-01T00:00:00\n")
    assert make_run_dir(cfg, "x") == tmp_path / "run"
    (tmp_path / "run" / ".fedse-run").write_text(f"claimed by pid {os.getpid()} at 2026-01-01T00:00:00\n")
    with pytest.raises(FileExistsError):
        make_run_dir(cfg, "x")


@pytest.mark.parametrize("existed", [False, True])
def test_a_run_failing_before_its_first_checkpoint_leaves_no_folder(capsys, tmp_path, monkeypatch, existed):
    # simulate() claims the run folder, writes the partition, then starts Flower's engine; it cleans up
    # after a failure with no checkpoint (an empty folder named by output.name that existed before is
    # emptied, not removed).
    if existed:
        (tmp_path / "runs" / "r").mkdir(parents=True)

    def run_simulation(**kwargs):
        raise RuntimeError("Ray failed")

    monkeypatch.setattr(fedse.simulation, "run_simulation", run_simulation)
    with pytest.raises(RuntimeError, match="Ray failed"):
        main(["simulate", "--set", f"output.dir={tmp_path / 'runs'}", "--set", "output.name=r", "--quiet"])
    assert [p.name for p in (tmp_path / "runs").iterdir()] == (["r"] if existed else [])
    if existed:
        assert list((tmp_path / "runs" / "r").iterdir()) == []


@pytest.mark.parametrize("out", ["file/sub", "file"])
def test_monitor_refuses_an_out_no_folder_can_be_written_at_before_any_work(capsys, tmp_path, monkeypatch, out):
    import simulations.monitor

    def work(*args, **kwargs):
        raise AssertionError("the monitor started scoring before it checked --out")

    monkeypatch.setattr(simulations.monitor, "build_federated_data", work)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config_from_dict({}))))
    (tmp_path / "file").write_text("x")
    before = _tree(tmp_path)
    _refused(
        capsys, ["monitor", str(run), "--out", str(tmp_path / out)], f"--out '{tmp_path / out}'", "is a file", "allowed"
    )
    assert _tree(tmp_path) == before
