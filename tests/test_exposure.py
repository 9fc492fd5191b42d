"""What a real SuperLink and SuperNode (Flower 1.42) serve without a credential, as the warning says.

One SuperLink (``superlink_command``, in-process isolation so that no executor of its own takes
the run's task) with an SQLite ``--database`` under umask 022, one SuperNode, one submitted run,
all on 127.0.0.1. Probed with urllib, no credentials:

- the SuperLink serves only the APIs ``superlink_exposure`` names (Control, Fleet, Runtime,
  ``/health``), with ``/docs`` and ``/openapi.json``;
- its ``/v1/runtime/acquire-task`` hands a submitted run's ServerApp task and token to the caller,
  and that token pulls the run's app and config; other Runtime routes refuse a caller without one;
- the SuperNode's ``--port`` serves its Runtime API the same way;
- the database and its ``-wal``/``-shm`` siblings are 0600.

If Flower starts authenticating any of these, a test here fails: update the warning and the README.
Every process the test starts, it stops.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import flower_env
from flwr.proto.runtime_pb2 import (
    AcquireTaskRequest,
    AcquireTaskResponse,
    GetNodesRequest,
    PullTaskInputRequest,
    PullTaskInputResponse,
)
from flwr.supercore.constant import TASK_TOKEN_HEADER

from fedse.deployment.deploy import superlink_command, supernode_command, write_connection
from fedse.deployment.launch import LocalProcesses, free_port, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _call(base: str, path: str, body: object | None = None, token: str | None = None) -> tuple[int, bytes]:
    data = None if body is None else body.SerializeToString()
    request = urllib.request.Request(base + path, data=data, method="GET" if body is None else "POST")
    if body is not None:
        request.add_header("Content-Type", "application/protobuf")
    if token is not None:
        request.add_header(TASK_TOKEN_HEADER, token)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _up(base: str) -> bool:
    try:
        return _call(base, "/health")[0] == 200
    except OSError:
        return False


def _acquire(base: str, task_type: str) -> AcquireTaskResponse:
    status, body = _call(base, "/v1/runtime/acquire-task", AcquireTaskRequest(supported_task_types=[task_type]))
    assert status == 200, body
    return AcquireTaskResponse.FromString(body)


def test_what_the_superlink_and_a_supernode_serve_without_credentials(tmp_path):
    home = tmp_path / "flwr_home"
    env = flower_env(home, with_bin=True)
    procs = LocalProcesses(env, tmp_path / "logs", tmp_path)
    port, node_port = free_port(), free_port()
    link, node = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{node_port}"
    database = tmp_path / "state.db"
    write_connection(home, "test", f"127.0.0.1:{port}", None)
    old_umask = os.umask(0o022)  # the usual umask, which the SuperLink inherits
    try:
        procs.start(
            "superlink", [*superlink_command(certs=None, port=port, database=database), "--isolation", "process"]
        )
        wait_for(lambda: _up(link), 90, "the SuperLink")

        # Every route is under an API the warning names; the docs are served.
        status, body = _call(link, "/openapi.json")
        assert status == 200
        paths = json.loads(body)["paths"]
        groups = {p.split("/")[2] if p.startswith("/v1/") else p for p in paths}
        assert groups == {"control", "fleet", "runtime", "/health"}, sorted(paths)
        assert {"/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/acquire-task"} <= set(paths)
        assert _call(link, "/docs")[0] == 200

        # Runtime: a task token is needed, except to acquire one.
        assert _call(link, "/v1/runtime/get-nodes", GetNodesRequest())[0] == 401
        assert not _acquire(link, "flwr-serverapp").token  # nothing pending yet

        # A run is submitted; whoever asks first gets its ServerApp task, and with it the app and config.
        submitted = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT), "test", "--run-config", f"output-dir='{tmp_path / 'runs'}'"],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        acquired = _acquire(link, "flwr-serverapp")
        assert acquired.token and acquired.task.type == "flwr-serverapp"
        status, body = _call(link, "/v1/runtime/pull-task-input", PullTaskInputRequest(), token=acquired.token)
        assert status == 200, body
        task_input = PullTaskInputResponse.FromString(body)
        assert task_input.fab.content and task_input.run.run_id == acquired.task.run_id
        assert "output-dir" in task_input.run.override_config

        # A SuperNode's --port: its own Runtime API, plain HTTP, the same acquire-task and docs.
        procs.start(
            "supernode",
            supernode_command(
                superlink=f"127.0.0.1:{port}",
                ca=None,
                key=None,
                node_config={"state-dir": str(tmp_path / "state")},
                port=node_port,
            ),
        )
        wait_for(lambda: _up(node), 90, "the SuperNode's Runtime API")
        assert (
            _call(node, "/v1/runtime/acquire-task", AcquireTaskRequest(supported_task_types=["flwr-clientapp"]))[0]
            == 200
        )
        assert _call(node, "/docs")[0] == 200
        node_paths = json.loads(_call(node, "/openapi.json")[1])["paths"]
        assert {p.split("/")[2] if p.startswith("/v1/") else p for p in node_paths} == {"runtime", "/health"}

        # The database Flower wrote, with its write-ahead log and shared memory: owner-only.
        wait_for(lambda: Path(f"{database}-wal").exists() and Path(f"{database}-shm").exists(), 30, "-wal, -shm")
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("state.db*")}
        assert modes == {"state.db": 0o600, "state.db-wal": 0o600, "state.db-shm": 0o600}
    finally:
        os.umask(old_umask)
        procs.stop_all()
    assert procs.running() == []
