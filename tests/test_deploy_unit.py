"""Deployment helpers without starting Flower: node keys, the `fedse server` command and its warning.

`fedse.cli._exec` is replaced so that `fedse server` returns the Flower command it
would exec instead of becoming a SuperLink: no process is left running.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from fedse import cli
from fedse.deploy import control_api_exposure

needs_ssh_keygen = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")


@needs_ssh_keygen
def test_keygen_with_a_relative_path_as_the_readme_writes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["keygen", "keys/x"]) == 0
    assert (tmp_path / "keys" / "x").is_file()
    public = tmp_path / "keys" / "x.pub"
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert capsys.readouterr().out.strip() == str(public)


@needs_ssh_keygen
def test_keygen_refuses_to_overwrite_a_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["keygen", "keys/x"]) == 0
    before = (tmp_path / "keys" / "x").read_bytes()
    assert cli.main(["keygen", "keys/x"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "keys" / "x").read_bytes() == before


@pytest.fixture
def captured_exec(monkeypatch):
    """`fedse server` with `_exec` captured (and Flower's scripts on PATH, as in an activated venv)."""
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    calls: list[list[str]] = []
    monkeypatch.setattr(cli, "_exec", lambda cmd: calls.append(cmd) or 0)
    return calls


def _fake_certs(directory: Path) -> Path:
    directory.mkdir()
    for name in ("ca.crt", "server.pem", "server.key"):
        (directory / name).write_text("placeholder\n")
    return directory


def test_server_prints_the_control_api_exposure_and_keeps_node_auth_on(tmp_path, captured_exec, capsys):
    certs = _fake_certs(tmp_path / "certs")
    rc = cli.main(
        [
            "server",
            "--certs",
            str(certs),
            "--host",
            "0.0.0.0",
            "--port",
            "9443",
            "--database",
            str(tmp_path / "superlink.db"),
        ]
    )
    assert rc == 0
    [cmd] = captured_exec
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "9443"
    err = capsys.readouterr().err
    assert f"fedse: warning: {control_api_exposure('0.0.0.0', 9443)}" in err


def test_server_insecure_also_prints_the_exposure(tmp_path, captured_exec, capsys):
    assert cli.main(["server", "--insecure", "--port", "9444"]) == 0
    [cmd] = captured_exec
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd
    assert control_api_exposure("127.0.0.1", 9444) in capsys.readouterr().err


def test_server_names_missing_certificate_files(tmp_path, captured_exec, capsys):
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_text("placeholder\n")
    assert cli.main(["server", "--certs", str(certs)]) == 2
    err = capsys.readouterr().err
    assert str(certs / "server.pem") in err and str(certs / "server.key") in err
    assert str(certs / "ca.crt") not in err.split("missing")[1]
    assert captured_exec == []


def test_exposure_names_who_can_register_and_how_to_close_it():
    text = control_api_exposure("10.0.0.5", 9093)
    assert "anyone who can reach 10.0.0.5:9093 can register a SuperNode key" in text
    assert "start or stop runs" in text and "ca.crt is public" in text
    # The deployment that limits it: register on loopback first, then open the port to the clients only.
    assert "--host 127.0.0.1 --database FILE" in text and "same --database FILE" in text
    assert "tcp/9093 reachable only from the clients' hosts" in text


@pytest.mark.parametrize(
    "host, who",
    [
        ("127.0.0.1", "any process on this machine"),
        ("localhost", "any process on this machine"),
        ("::1", "any process on this machine"),
        ("0.0.0.0", "anyone who can reach port 9093 on any address of this machine"),
        ("::", "anyone who can reach port 9093 on any address of this machine"),
        ("server.example.org", "anyone who can reach server.example.org:9093"),
    ],
)
def test_exposure_says_who_can_reach_the_address(host, who):
    assert control_api_exposure(host, 9093).startswith(f"Control API exposure: {who}")


def test_exposure_rejects_a_port_out_of_range():
    with pytest.raises(ValueError, match="port must be 1..65535, got 0"):
        control_api_exposure("127.0.0.1", 0)


def test_wait_log_fails_at_once_when_the_process_exits_and_shows_its_log(tmp_path):
    # The CI failure this guards against: `flwr run` refused the FAB and exited at once, and the
    # test waited its full 300 s for a round that never came, saying only "timed out".
    import time

    from fedse.launch import LocalProcesses

    procs = LocalProcesses(dict(os.environ), tmp_path / "logs", tmp_path)
    procs.start("run", ["sh", "-c", "echo FAB size exceeds; exit 3"])
    started = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        procs.wait_log("run", lambda log: "[ROUND 2/3]" in log, 300, "round 2")
    assert time.monotonic() - started < 30
    assert "run exited while waiting for round 2" in str(err.value)
    assert "--- run.log (exit 3) ---\nFAB size exceeds" in str(err.value)


def test_wait_log_returns_when_the_text_appears_and_times_out_with_the_logs(tmp_path):
    from fedse.launch import LocalProcesses

    procs = LocalProcesses(dict(os.environ), tmp_path / "logs", tmp_path)
    try:
        procs.start("talker", ["sh", "-c", "echo ready; sleep 60"])
        procs.wait_log("talker", lambda log: "ready" in log, 30, "ready")
        with pytest.raises(
            TimeoutError, match=r"(?s)timed out after 1s waiting for never.*--- talker.log \(exit None\) ---\nready"
        ):
            procs.wait_log("talker", lambda log: "never" in log, 1, "never")
    finally:
        procs.stop_all()
    assert procs.running() == []
