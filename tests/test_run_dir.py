"""The run folder: claimed atomically under output.dir; the ServerApp's output-dir resolution."""

import threading
from pathlib import Path

import pytest
from conftest import tiny_config

from fedse.rundir import make_run_dir


def test_a_second_claim_of_the_same_name_fails_clearly(tmp_path):
    cfg = tiny_config(output={"dir": str(tmp_path / "runs"), "name": "r"})
    run_dir = make_run_dir(cfg, "c")
    assert run_dir == tmp_path / "runs" / "r" and run_dir.is_dir()
    with pytest.raises(
        FileExistsError,
        match=r"run folder '.*/runs/r' already exists and is not empty; choose "
        r"another output\.name",
    ):
        make_run_dir(cfg, "c")


def test_an_existing_empty_named_folder_is_claimed_once(tmp_path):
    (tmp_path / "r").mkdir()
    cfg = tiny_config(output={"dir": str(tmp_path), "name": "r"})
    assert make_run_dir(cfg, "c") == tmp_path / "r"
    assert (tmp_path / "r" / ".fedse-run").is_file()  # the claim: the folder is no longer empty
    with pytest.raises(FileExistsError, match="not empty"):
        make_run_dir(cfg, "c")


def test_a_file_in_place_of_the_folder_is_refused(tmp_path):
    (tmp_path / "r").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not a folder"):
        make_run_dir(tiny_config(output={"dir": str(tmp_path), "name": "r"}), "c")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        make_run_dir(tiny_config(output={"dir": str(tmp_path / "f"), "name": "r"}), "c")
    with pytest.raises(NotADirectoryError):
        make_run_dir(tiny_config(output={"dir": str(tmp_path / "f" / "sub"), "name": "r"}), "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f", "r"]


def test_timestamped_names_never_share_a_folder(tmp_path):
    cfg = tiny_config(output={"dir": str(tmp_path)})
    dirs = [make_run_dir(cfg, "cfg") for _ in range(3)]  # same second: suffixes -2, -3
    assert len(set(dirs)) == 3 and all(d.parent == tmp_path for d in dirs)
    assert all(d.name.startswith("cfg-") for d in dirs)


@pytest.mark.parametrize("precreate", [False, True])
def test_concurrent_claims_have_exactly_one_winner(tmp_path, precreate):
    if precreate:
        (tmp_path / "r").mkdir()
    cfg = tiny_config(output={"dir": str(tmp_path), "name": "r"})
    barrier, won, lost = threading.Barrier(8), [], []

    def claim():
        barrier.wait()
        try:
            won.append(make_run_dir(cfg, "c"))
        except FileExistsError as err:
            lost.append(str(err))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(lost) == 7
    assert all("choose another output.name" in m for m in lost)


def test_resolve_output_dir(tmp_path, monkeypatch):
    from server.app import resolve_output_dir

    root = tmp_path / "app"
    assert resolve_output_dir(str(tmp_path / "runs"), root) == tmp_path / "runs"  # absolute: kept
    assert resolve_output_dir("runs", root) == root / "runs"  # relative: the app's root, never the cwd
    assert resolve_output_dir("a/../runs", root) == root / "runs"  # normalised
    assert resolve_output_dir(f"{tmp_path}/x/../runs", root) == tmp_path / "runs"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_output_dir("~/runs", root) == tmp_path / "home" / "runs"
    monkeypatch.chdir(tmp_path)
    assert resolve_output_dir("runs", root) == root / "runs"
    assert resolve_output_dir("runs", root).is_absolute() and isinstance(resolve_output_dir("r", root), Path)
