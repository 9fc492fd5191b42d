"""Deployment helpers without starting Flower: node keys, the `fedse server` command and its warning,
the owner-only database, and binding client numbers to registered keys.

`fedse.cli._exec` is replaced so that `fedse server` returns the Flower command it
would exec instead of becoming a SuperLink: no process is left running. The samples of
Flower's output below were recorded from Flower 1.42 (`flwr supernode register/list --format
json`, `NodeInfo.public_key` as a ServerApp's `Grid.get_nodes()` returns it).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from fedse import cli
from fedse.deployment.deploy import (
    owner_only_database,
    registered_node_id,
    superlink_command,
    superlink_exposure,
    supernode_exposure,
)
from fedse.identity import bind_node_keys, check_client_keys, key_fingerprint, node_key_fingerprints

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


def test_server_prints_the_exposure_keeps_node_auth_on_and_makes_the_database_owner_only(
    tmp_path, captured_exec, capsys, monkeypatch
):
    certs = _fake_certs(tmp_path / "certs")
    monkeypatch.chdir(tmp_path)
    old = os.umask(0o022)
    try:
        rc = cli.main(
            ["server", "--certs", str(certs), "--host", "0.0.0.0", "--port", "9443", "--database", "superlink.db"]
        )
    finally:
        os.umask(old)
    assert rc == 0
    [cmd] = captured_exec
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "9443"
    # Created owner-only before Flower opens it, and named absolutely (Flower may run elsewhere).
    database = tmp_path / "superlink.db"
    assert cmd[cmd.index("--database") + 1] == str(database)
    assert database.stat().st_mode & 0o777 == 0o600
    err = capsys.readouterr().err
    assert f"fedse: warning: {superlink_exposure('0.0.0.0', 9443)}" in err


def test_server_insecure_also_prints_the_exposure(tmp_path, captured_exec, capsys):
    assert cli.main(["server", "--insecure", "--port", "9444"]) == 0
    [cmd] = captured_exec
    assert "--insecure" in cmd and "--enable-supernode-auth" not in cmd and "--database" not in cmd
    assert superlink_exposure("127.0.0.1", 9444) in capsys.readouterr().err


def test_server_names_missing_certificate_files(tmp_path, captured_exec, capsys):
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "ca.crt").write_text("placeholder\n")
    assert cli.main(["server", "--certs", str(certs)]) == 2
    err = capsys.readouterr().err
    assert str(certs / "server.pem") in err and str(certs / "server.key") in err
    assert str(certs / "ca.crt") not in err.split("missing")[1]
    assert captured_exec == []


def test_superlink_exposure_names_every_api_on_the_port_and_how_to_close_it():
    text = superlink_exposure("10.0.0.5", 9093)
    assert text.startswith("SuperLink exposure: anyone who can reach 10.0.0.5:9093 can use, without any credential")
    assert "tcp/9093" in text and "ca.crt is public" in text
    # Each unauthenticated API, with what it allows.
    assert "Control API (/v1/control/*): register or unregister SuperNode keys" in text
    assert "start or stop runs" in text
    assert "Runtime (ServerAppIo) API (/v1/runtime/*): /v1/runtime/acquire-task gives the oldest pending" in text
    assert "acts as its ServerApp" in text
    assert "Fleet API (/v1/fleet/*): each request signed by a registered node key" in text
    assert "/docs and /openapi.json (all routes) and /health: always served" in text
    assert "no flag or environment variable to turn them off" in text
    # The deployment that limits it: register on loopback first, then open the port to the clients only.
    assert "--host 127.0.0.1 --database FILE" in text and "same --database FILE" in text
    assert "tcp/9093 reachable only from the clients' hosts" in text


def test_the_old_name_is_the_same_warning():
    from fedse.deployment.deploy import control_api_exposure

    assert control_api_exposure("127.0.0.1", 9093) == superlink_exposure("127.0.0.1", 9093)


def test_supernode_exposure_names_its_runtime_api_and_what_a_local_process_can_do():
    text = supernode_exposure("127.0.0.1", 9101)
    assert text.startswith("SuperNode exposure: any process on this machine (the SuperNode's Runtime API listens")
    assert "127.0.0.1:9101" in text and "plain HTTP, tcp/9101" in text
    assert "/v1/runtime/acquire-task" in text and "answers the server as this client" in text
    assert "/docs, /openapi.json and /health are always served" in text


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
    assert superlink_exposure(host, 9093).startswith(f"SuperLink exposure: {who}")
    assert supernode_exposure(host, 9093).startswith(f"SuperNode exposure: {who}")


@pytest.mark.parametrize("exposure", [superlink_exposure, supernode_exposure])
def test_exposure_rejects_a_port_out_of_range(exposure):
    with pytest.raises(ValueError, match="port must be 1..65535, got 0"):
        exposure("127.0.0.1", 0)


# The SuperLink's database: owner-only whatever the umask.


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_a_new_database_is_created_owner_only(tmp_path, umask_022):
    assert owner_only_database(tmp_path / "sl.db") == str(tmp_path / "sl.db")
    assert _mode(tmp_path / "sl.db") == 0o600 and (tmp_path / "sl.db").stat().st_size == 0


def test_an_existing_database_and_its_siblings_become_owner_only(tmp_path, umask_022):
    db = tmp_path / "sl.db"
    for path in (db, tmp_path / "sl.db-wal", tmp_path / "sl.db-shm"):
        path.write_bytes(b"x")
        path.chmod(0o644)
    owner_only_database(db)
    assert [_mode(p) for p in (db, tmp_path / "sl.db-wal", tmp_path / "sl.db-shm")] == [0o600] * 3
    assert db.read_bytes() == b"x"  # opened, never truncated


def test_database_paths_are_absolute_and_in_memory_names_pass_through(tmp_path, monkeypatch, umask_022):
    monkeypatch.chdir(tmp_path)
    assert owner_only_database("rel.db") == str(tmp_path / "rel.db")
    assert owner_only_database("sqlite:///url.db") == f"sqlite:///{tmp_path / 'url.db'}"
    assert _mode(tmp_path / "rel.db") == _mode(tmp_path / "url.db") == 0o600
    for name in (":flwr-in-memory:", ":memory:", "sqlite:///:memory:"):
        assert owner_only_database(name) == name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rel.db", "url.db"]


def test_server_names_a_database_it_cannot_create(tmp_path, captured_exec, capsys):
    missing = tmp_path / "no" / "such" / "dir" / "sl.db"
    assert cli.main(["server", "--insecure", "--database", str(missing)]) == 2
    assert f"fedse: error: --database {missing}: cannot make it owner-only (0600)" in capsys.readouterr().err
    assert captured_exec == []


def test_superlink_command_passes_the_owner_only_database(tmp_path, monkeypatch, umask_022):
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    cmd = superlink_command(certs=None, database=tmp_path / "state.db")
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "state.db")
    assert _mode(tmp_path / "state.db") == 0o600


def test_a_database_that_is_a_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere").write_text("")
    (tmp_path / "elsewhere").chmod(0o644)
    (tmp_path / "sl.db").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="is a symbolic link"):
        owner_only_database(tmp_path / "sl.db")
    assert _mode(tmp_path / "elsewhere") == 0o644  # the link's target is left alone


# Client numbers bound to registered keys.

# One P-384 key, as `fedse keygen` writes its .pub and as Flower stores it (NodeInfo.public_key),
# with the fingerprint `ssh-keygen -lf` printed for that .pub.
OPENSSH = (
    "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBMAO3jzW5lbBPK3mcSamr467XYGzJnktUXiV2cxE"
    "Ey3nfgqvd8ihNDVunqd4/xGRS5cHDhtuSiSgJXe91PX43KVLBNDTPvPOpx9IcOaxgzrJPubH22opsbJ4YjV1893p7A== fedse-supernode\n"
)
PEM = (
    b"-----BEGIN PUBLIC KEY-----\n"
    b"MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEwA7ePNbmVsE8reZxJqavjrtdgbMmeS1R\n"
    b"eJXZzEQTLed+Cq93yKE0NW6ep3j/EZFLlwcOG25KJKAld73U9fjcpUsE0NM+886n\n"
    b"H0hw5rGDOsk+5sfbaimxsnhiNXXz3ens\n"
    b"-----END PUBLIC KEY-----\n"
)
FINGERPRINT = "SHA256:gvRE43gmk/CJAzPN6l7KeOk43xYYcCUSCiapMXyIzZQ"


def test_a_key_has_one_fingerprint_in_either_form_and_it_is_ssh_keygens():
    assert key_fingerprint(OPENSSH) == key_fingerprint(PEM) == FINGERPRINT


@needs_ssh_keygen
def test_the_fingerprint_of_a_fresh_key_matches_ssh_keygen(tmp_path):
    import subprocess

    from fedse.deployment.deploy import make_node_key

    public = make_node_key(tmp_path / "k")
    listed = subprocess.run(["ssh-keygen", "-lf", str(public)], capture_output=True, text=True, check=True)
    assert key_fingerprint(public.read_text()) == listed.stdout.split()[1]


@pytest.mark.parametrize("junk", [b"", b"not a key", b"\x00" * 32, "ssh-ed25519 AAAA"])
def test_a_fingerprint_needs_an_ec_public_key(junk):
    with pytest.raises(ValueError):
        key_fingerprint(junk)


def test_an_ed25519_key_is_not_a_supernode_key():
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    pub = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ValueError, match="not an EC public key"):
        key_fingerprint(pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


def _node(node_id: int, public_key: bytes = b""):
    from flwr.proto.node_pb2 import NodeInfo

    return NodeInfo(node_id=node_id, public_key=public_key)


def test_node_fingerprints_skip_nodes_without_a_usable_key():
    nodes = [_node(17069830946637927675, PEM), _node(5), _node(6, os.urandom(32))]  # keyless; simulation's random
    assert node_key_fingerprints(nodes) == {17069830946637927675: FINGERPRINT}


def _other_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def test_nodes_are_bound_by_their_key_and_a_squatter_is_unlisted():
    other, squatter = _other_key(), _other_key()
    keys = check_client_keys({FINGERPRINT: 0, key_fingerprint(other): 1, "SHA256:" + "A" * 43: 2})
    bound = bind_node_keys([_node(11, PEM), _node(22, other), _node(33, squatter), _node(44)], keys)
    assert bound.clients == {11: 0, 22: 1}
    assert bound.unlisted == [33, 44]
    assert bound.missing == [2]


def test_a_key_registered_on_another_database_keeps_its_client_number_under_a_new_node_id():
    keys = check_client_keys({FINGERPRINT: 4})
    assert bind_node_keys([_node(11, PEM)], keys).clients == {11: 4}
    assert bind_node_keys([_node(99, PEM)], keys).clients == {99: 4}


def test_client_keys_are_checked_and_every_problem_named():
    with pytest.raises(ValueError) as err:
        check_client_keys({"MD5:aa": 0, FINGERPRINT: -1, "SHA256:" + "B" * 43: True})
    text = str(err.value)
    assert "'MD5:aa' is not a key fingerprint" in text
    assert f"{FINGERPRINT}: client number must be an integer >= 0, got -1" in text
    assert "got True" in text
    with pytest.raises(ValueError, match="client 3 is listed for two keys"):
        check_client_keys({FINGERPRINT: 3, "SHA256:" + "C" * 43: 3})
    assert check_client_keys({FINGERPRINT: 0}) == {FINGERPRINT: 0}


def test_registered_node_id_reads_flwr_supernode_register_json():
    recorded = '{\n  "success": true,\n  "node-id": 17069830946637927675\n}\n'
    assert registered_node_id(recorded) == 17069830946637927675
    failed = '{\n  "success": false,\n  "error-message": "Public key already in use"\n}\n'
    with pytest.raises(ValueError, match="did not register the key"):
        registered_node_id(failed)
    with pytest.raises(ValueError, match="not the JSON output"):
        registered_node_id("✅ SuperNode 1 registered successfully.\n")


def test_flwr_supernode_list_json_carries_no_key():
    # Recorded: `flwr supernode list CONNECTION --format json` (flwr/cli/supernode/ls.py _to_json) drops
    # NodeInfo.public_key, so it cannot map keys to node ids; the Control API's ListNodes and a
    # ServerApp's Grid.get_nodes() carry it.
    import json

    recorded = json.loads(
        '{"success": true, "nodes": [{"node-id": "17069830946637927675", "owner-name": "none", "status": '
        '"registered", "created-at": "2026-12-05 11:18:06Z", "online-at": "N/A", "online-elapsed": 0.0, '
        '"offline-at": "N/A", "deleted-at": "N/A"}]}'
    )
    assert not any("key" in field for node in recorded["nodes"] for field in node)


def test_wait_log_fails_at_once_when_the_process_exits_and_shows_its_log(tmp_path):
    # The CI failure this guards against: `flwr run` refused the FAB and exited at once, and the
    # test waited its full 300 s for a round that never came, saying only "timed out".
    import time

    from fedse.deployment.launch import LocalProcesses

    procs = LocalProcesses(dict(os.environ), tmp_path / "logs", tmp_path)
    procs.start("run", ["sh", "-c", "echo FAB size exceeds; exit 3"])
    started = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        procs.wait_log("run", lambda log: "[ROUND 2/3]" in log, 300, "round 2")
    assert time.monotonic() - started < 30
    assert "run exited while waiting for round 2" in str(err.value)
    assert "--- run.log (exit 3) ---\nFAB size exceeds" in str(err.value)


def test_wait_log_returns_when_the_text_appears_and_times_out_with_the_logs(tmp_path):
    from fedse.deployment.launch import LocalProcesses

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
