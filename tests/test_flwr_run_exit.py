"""A fedse run that fails under `flwr run`: one line of fedse's, no traceback, the run marked failed.

In-process: the ServerApp's main turns a fedse error into that line and a RunFailed, whose
traceback Flower's logger then drops (a bug keeps both its type and its traceback).
End to end (slow): the run asks for more nodes than the federation has: 3 against the 2 SuperNodes of
a simulation SuperLink, and 2 against a deployment SuperLink no SuperNode joined.
The test starts its own SuperLink on a free port of 127.0.0.1 (not Flower's shared
local one), with FLWR_HOME in tmp_path. Every process it starts, it stops.

Flower 1.42's `flwr run --stream` exits 0 whatever the run's status: it streams the
logs until the run finishes and never reads the status (flwr/cli/run/run.py,
flwr/cli/log.py). If the exit-code assertion starts failing, Flower began reporting
it: make the test expect non-zero and update the README.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import flower_env

import server.app as server_app
from fedse.config import ConfigError
from fedse.deployment.deploy import write_connection
from fedse.deployment.launch import LocalProcesses, free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flwr, flower-superlink, and the helpers the SuperLink starts by name
FLWR = str(BIN / "flwr")


def _cmdline(pid: int) -> bytes | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def _descendants(pid: int) -> dict[int, bytes]:
    """Every process below ``pid`` (children, grandchildren, ...) with its command line, from /proc."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent[int(entry.name)] = int((entry / "stat").read_text().split(")")[-1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, todo = [], [pid]
    while todo:
        above = todo.pop()
        kids = [p for p, pp in parent.items() if pp == above]
        found += kids
        todo += kids
    return {p: cmd for p in found if (cmd := _cmdline(p))}


def _alive(pid: int, cmdline: bytes) -> bool:
    """``pid`` is still the process recorded with ``cmdline`` (not a zombie, not a reused pid)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z" and _cmdline(pid) == cmdline


def _flower_logs(err: BaseException) -> logging.LogRecord:
    """The record Flower logs for a ServerApp's exception, after the "flwr" logger's filters."""
    record = logging.LogRecord(
        "flwr", logging.ERROR, __file__, 0, "ServerApp raised an exception", None, (type(err), err, err.__traceback__)
    )
    assert logging.getLogger("flwr").filter(record)
    return record


def test_a_fedse_error_is_one_line_and_flower_logs_no_traceback_for_it(monkeypatch, capsys):
    def config_error(grid, context):
        raise ConfigError("the federation has 2 nodes\n  but the run needs 3")

    monkeypatch.setattr(server_app, "_main", config_error)
    with pytest.raises(server_app.RunFailed) as failed:
        server_app.main(None, None)
    assert capsys.readouterr().err == "fedse: error: the federation has 2 nodes but the run needs 3\n"
    assert str(failed.value) == "the federation has 2 nodes but the run needs 3"  # flwr ls's status details
    assert _flower_logs(failed.value).exc_info is None

    def bug(grid, context):
        raise KeyError("a bug")

    monkeypatch.setattr(server_app, "_main", bug)
    with pytest.raises(KeyError) as raised:
        server_app.main(None, None)
    assert capsys.readouterr().err == ""
    assert _flower_logs(raised.value).exc_info[1] is raised.value  # its traceback stays


@pytest.mark.slow
@pytest.mark.parametrize(
    ("runtime", "nodes", "needed"),
    [("simulation", 2, 3), ("deployment", 0, 2)],
)
def test_a_failed_run_prints_one_line_and_is_marked_failed(tmp_path, runtime, nodes, needed):
    home = tmp_path / "flwr_home"
    env = flower_env(home, with_bin=True)
    procs = LocalProcesses(env, tmp_path / "logs", ROOT)
    port = free_port()
    write_connection(home, "test", f"127.0.0.1:{port}", None)
    superlink = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port)]
    superlink += ["--database", str(tmp_path / "state.db"), "--disable-runtime-dependency-installation"]
    if runtime == "simulation":
        superlink.append("--simulation")
    started: dict[int, bytes] = {}  # what the SuperLink started (ServerApp, simulation), seen while it ran
    try:
        link = procs.start("superlink", superlink)
        procs.wait_log("superlink", lambda log: "Uvicorn running" in log, 90, "the SuperLink")
        config = f"overrides='partition.num_clients={needed} server.join_timeout=1' output-dir='{tmp_path / 'runs'}'"
        cmd = [FLWR, "run", str(ROOT), "test", "--stream", "--run-config", config]
        if runtime == "simulation":
            cmd += ["--federation-config", f"num-supernodes={nodes}"]
        run = procs.start("run", cmd)

        def finished() -> bool:
            started.update(_descendants(link.pid))
            return run.poll() is not None

        wait_for(finished, 180, "flwr run")
        out = procs.log("run")

        errors = [line for line in out.splitlines() if line.startswith("fedse: error:")]
        assert len(errors) == 1, out[-3000:]
        assert f"has {nodes} nodes" in errors[0] and f"needs {needed}" in errors[0]
        assert "Traceback" not in out and "NodeCountError" not in out, out[-3000:]

        run_id = re.search(r"Successfully started run (\d+)", out).group(1)
        ls = subprocess.run(
            [FLWR, "ls", "test", "--run-id", run_id, "--format", "json"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        (row,) = json.loads(ls.stdout)["runs"]
        assert row["status"] == "finished:failed", row
        assert f"needs {needed}" in row["status-details"]
        assert run.returncode == 0  # Flower 1.42: `flwr run` does not report the run's status (see above)
    finally:
        if "superlink" in procs.procs:
            started.update(_descendants(procs.procs["superlink"].pid))
        procs.stop_all()
        for pid, cmdline in started.items():  # anything the SuperLink started that outlived it
            if _alive(pid, cmdline):
                os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not any(_alive(*item) for item in started.items()), 30, "the SuperLink's processes to stop")
    assert not procs.running()
