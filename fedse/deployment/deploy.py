"""Deployment on Flower's Deployment Engine: SuperLink, SuperNodes, ``flwr run``.

fedse adds no transport of its own. These helpers build the Flower commands a
deployment needs, with fedse's defaults: TLS on (a test certificate authority
made here, or the operator's own certificates), SuperNode authentication on
(only registered public keys join), runtime dependency installation off (the
apps run in the environment fedse is installed in). Insecure mode exists only
behind an explicit flag and logs a warning.

Flower 1.42 serves the Control, Fleet and Runtime APIs of a SuperLink, with
``/docs``, ``/openapi.json`` and ``/health``, on one address
(``--host``/``--port``); a SuperNode serves its own Runtime API on
``127.0.0.1:--port``. A SuperNode's key pair is an ECDSA (P-384) key in
OpenSSH format, registered with ``flwr supernode register``. Which of these
answer without a credential, and what limits them: ``superlink_exposure``
(``fedse server`` prints it) and ``supernode_exposure``.

Flower hands the ServerApp each node's registered public key
(``Grid.get_nodes()``: ``NodeInfo.public_key``, PEM), so a client's number can
be bound to its key: ``key_fingerprint`` (the same ``SHA256:...`` text as
``ssh-keygen -lf KEY.pub``), ``node_key_fingerprints`` and ``bind_node_keys``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NO_RUNTIME_INSTALL",
    "Certs",
    "control_api_exposure",
    "make_node_key",
    "make_test_certs",
    "node_config_string",
    "owner_only_database",
    "registered_node_id",
    "superlink_command",
    "superlink_exposure",
    "supernode_command",
    "supernode_exposure",
    "write_connection",
]

log = logging.getLogger("fedse")

NO_RUNTIME_INSTALL = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


@dataclass(frozen=True)
class Certs:
    ca: Path  # the certificate authority clients trust
    cert: Path  # the SuperLink's certificate (for 127.0.0.1 and localhost in the test CA)
    key: Path


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise FileNotFoundError(
            f"'{tool}' is not installed; it is needed to make TLS certificates or node keys "
            f"(Debian: apt-get install {'openssh-client' if tool == 'ssh-keygen' else tool})"
        )
    return path


def _run(args: list[str], cwd: Path) -> None:
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ... failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")


def make_test_certs(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Certs:
    """A test certificate authority and a server certificate for ``hosts`` (valid 30 days).
    For testing and single-machine demos; use your organisation's CA in production."""
    openssl = _need("openssl")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    sans = ", ".join(f"IP:{h}" if h.replace(".", "").isdigit() else f"DNS:{h}" for h in hosts)
    (d / "server.ext").write_text(
        "basicConstraints = CA:FALSE\nkeyUsage = digitalSignature, keyEncipherment\n"
        f"extendedKeyUsage = serverAuth\nsubjectAltName = {sans}\n"
    )
    _run([openssl, "genrsa", "-out", "ca.key", "4096"], d)
    _run(
        [
            openssl,
            "req",
            "-x509",
            "-new",
            "-nodes",
            "-key",
            "ca.key",
            "-sha256",
            "-days",
            "30",
            "-subj",
            "/CN=fedse test CA",
            "-out",
            "ca.crt",
        ],
        d,
    )
    _run([openssl, "genrsa", "-out", "server.key", "4096"], d)
    _run([openssl, "req", "-new", "-key", "server.key", "-subj", f"/CN={hosts[0]}", "-out", "server.csr"], d)
    _run(
        [
            openssl,
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-sha256",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
        d,
    )
    os.chmod(d / "ca.key", 0o600)
    os.chmod(d / "server.key", 0o600)
    return Certs(d / "ca.crt", d / "server.pem", d / "server.key")


def make_node_key(path: str | Path, comment: str = "fedse-supernode") -> Path:
    """An ECDSA P-384 key pair in OpenSSH format for SuperNode authentication; returns the
    public key's path (``<path>.pub``), the file to register with the SuperLink.

    ``path`` is resolved first: ssh-keygen runs in the key's folder, where a relative
    ``-f keys/client0`` would name ``keys/keys/client0`` and fail."""
    keygen = _need("ssh-keygen")
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite a node key")
    _run([keygen, "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", comment, "-f", str(path)], path.parent)
    return path.with_name(path.name + ".pub")


def superlink_command(
    *, certs: Certs | None, host: str = "127.0.0.1", port: int = 9093, database: str | Path | None = None
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication (``certs=None``: insecure, warned).

    A ``database`` file is made owner-only here, before Flower opens it (:func:`owner_only_database`),
    and passed as an absolute path (the SuperLink may run in another working directory)."""
    cmd = [
        _flower("flower-superlink"),
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if certs is None:
        log.warning("SuperLink without TLS or SuperNode authentication: traffic is readable and anyone can join")
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-ca-certfile",
            str(certs.ca),
            "--ssl-certfile",
            str(certs.cert),
            "--ssl-keyfile",
            str(certs.key),
            "--enable-supernode-auth",
        ]
    if database is not None:
        cmd += ["--database", owner_only_database(database)]
    return cmd


_IN_MEMORY = (":flwr-in-memory:", ":memory:", "sqlite:///:memory:", "sqlite://")


def owner_only_database(database: str | Path) -> str:
    """Make the SuperLink's SQLite ``database`` file owner-only (0600) and return its absolute path
    (an in-memory name is returned as it is).

    Flower 1.42 opens the file with SQLite in WAL mode and creates it, and its ``-wal`` and
    ``-shm`` siblings, with the process's umask (0644 under the usual 022): registered node keys,
    runs, their configs and messages, readable by every local account. The file is created here
    with mode 0600 (an existing one, and existing siblings, are set to 0600); SQLite creates the
    siblings with the database file's permissions, so they are 0600 too."""
    text = str(database)
    if text in _IN_MEMORY:
        return text
    from ..config import ConfigError

    path = Path(os.path.abspath(Path(text.removeprefix("sqlite:///")).expanduser()))
    if path.is_symlink():
        raise ConfigError(f"--database {path} is a symbolic link; give the database file's own path")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        for suffix in ("-wal", "-shm", "-journal"):
            sibling = path.with_name(path.name + suffix)
            if sibling.is_file() and not sibling.is_symlink():
                os.chmod(sibling, 0o600)
    except OSError as err:
        raise ConfigError(f"--database {path}: cannot make it owner-only (0600): {err.strerror}") from None
    return f"sqlite:///{path}" if text.startswith("sqlite:///") else str(path)


def _who(host: str, port: int, listener: str) -> str:
    if port < 1 or port > 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    where = f"{host}:{port}"
    if _is_loopback(host):
        return f"any process on this machine (the {listener} listens on {where})"
    if _is_unspecified(host):
        return f"anyone who can reach port {port} on any address of this machine"
    return f"anyone who can reach {where}"


def superlink_exposure(host: str, port: int) -> str:
    """What a SuperLink on ``host:port`` serves without a credential, and the deployment that limits it.

    ``fedse server`` prints this at start-up: nothing in Flower 1.42 (open source) closes it.
    ``flower-superlink`` serves every API on ``--host``/``--port`` (one FastAPI app,
    flwr/superlink/main.py ``create_app``): the Control API (``/v1/control/*``) behind an
    account plugin that accepts every caller unless Flower's enterprise OIDC is installed; the
    Runtime (ServerAppIo) API (``/v1/runtime/*``), whose ``acquire-task`` checks a SuperExec
    secret only in ``--isolation process`` with ``--superexec-auth-secret-file`` (fedse runs the
    default subprocess isolation, where Flower ignores that secret) and hands the oldest pending
    ServerApp task and its token to the first caller; the Fleet API (``/v1/fleet/*``), each request
    signed by a node key; ``/docs``, ``/openapi.json`` and ``/health``, hard-wired (``docs_url``
    and the default ``openapi_url`` of ``FastAPI(...)``; no flag or environment variable).
    The HTTPS server asks callers for no certificate. Only the network limits who reaches it."""
    who = _who(host, port, "SuperLink")
    return (
        f"SuperLink exposure: {who} can use, without any credential, everything this SuperLink serves on "
        f"tcp/{port} (HTTPS with --certs, plain HTTP with --insecure). TLS proves this server to callers, not "
        "callers to it (ca.crt is public); Flower 1.42's open-source SuperLink has no account authentication.\n"
        "- Control API (/v1/control/*): register or unregister SuperNode keys (a registered key joins: SuperNode "
        "authentication only refuses keys nobody registered), list nodes and runs, start or stop runs; a run's "
        "ServerApp code executes on this machine and its ClientApp code on every connected SuperNode.\n"
        "- Runtime (ServerAppIo) API (/v1/runtime/*): /v1/runtime/acquire-task gives the oldest pending ServerApp "
        "task and its token to whoever asks first (this SuperLink's own executor asks once a second); with that "
        "token the caller gets the run's app, config and context and acts as its ServerApp (sends messages to the "
        "SuperNodes, reads their replies). The other /v1/runtime routes need such a token.\n"
        "- Fleet API (/v1/fleet/*): each request signed by a registered node key (with --insecure anyone "
        "registers a key of its own).\n"
        "- /docs and /openapi.json (all routes) and /health: always served; Flower 1.42 has no flag or "
        "environment variable to turn them off.\n"
        "To limit it to the operator and the clients: (1) run 'fedse server --host 127.0.0.1 --database FILE', "
        "register every client's key from this machine (flwr supernode register KEY.pub), and stop it; "
        "(2) run it again with the same --database FILE (it keeps the registrations; the in-memory default "
        f"does not) on the address the clients use, with tcp/{port} reachable only from the clients' hosts "
        "(firewall: allow their addresses, drop the rest). The clients' hosts can still do all of the above."
    )


control_api_exposure = superlink_exposure  # the name `fedse server` has called it by


def supernode_exposure(host: str, port: int) -> str:
    """What a SuperNode's own Runtime (ClientAppIo) API on ``host:port`` (``--host``/``--port``)
    serves without a credential.

    ``flower-supernode`` serves it in plain HTTP unless given ``--ssl-certfile`` (which proves
    the server, not the caller); ``acquire-task`` checks a SuperExec secret only in
    ``--isolation process`` (flwr/supercore/dependencies/superexec.py), and ``/docs`` and
    ``/openapi.json`` are hard-wired (flwr/supernode/main.py)."""
    who = _who(host, port, "SuperNode's Runtime API")
    return (
        f"SuperNode exposure: {who} can use, without any credential, this SuperNode's Runtime (ClientAppIo) API "
        f"(plain HTTP, tcp/{port}): /v1/runtime/acquire-task gives its oldest pending ClientApp task and token to "
        "whoever asks first; with that token the caller reads the server's instruction (the global model and "
        "the round's config), the run's config and this node's config (state and data paths), and answers the "
        "server as this client. /docs, /openapi.json and /health are always served. Only who can run a "
        "process on this machine limits it: keep --host 127.0.0.1 and no untrusted local accounts."
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return host == ""


def node_config_string(values: Mapping[str, str | int | float]) -> str:
    """Flower's ``--node-config`` syntax: ``key=value`` pairs, strings quoted (TOML values)."""
    parts = []
    for key, value in values.items():
        if isinstance(value, str):
            if '"' in value:
                raise ValueError(f"node config value for {key!r} may not contain a double quote: {value!r}")
            parts.append(f'{key}="{value}"')
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def supernode_command(
    *,
    superlink: str,
    ca: str | Path | None,
    key: str | Path | None,
    node_config: Mapping[str, str | int | float],
    host: str = "127.0.0.1",
    port: int = 9094,
) -> list[str]:
    """``flower-supernode`` trusting ``ca`` and authenticating with the private ``key``
    (``ca=None``: insecure, warned). ``node_config`` carries fedse's client settings:
    ``state-dir`` (private state on disk), ``partition-id``/``num-partitions`` (demos)."""
    cmd = [
        _flower("flower-supernode"),
        "--superlink",
        superlink,
        "--node-config",
        node_config_string(node_config),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if ca is None:
        log.warning("SuperNode without TLS: traffic to the SuperLink is readable")
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(ca)]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(key)]
    return cmd


def write_connection(flwr_home: str | Path, name: str, address: str, ca: str | Path | None) -> Path:
    """A SuperLink connection for the ``flwr`` CLI in ``<flwr_home>/config.toml``."""
    from ..io import atomic_write_text

    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines.append(f'root-certificates = "{Path(ca).resolve()}"' if ca is not None else "insecure = true")
    path = Path(flwr_home) / "config.toml"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _flower(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise FileNotFoundError(f"'{tool}' not found on PATH; install fedse's dependencies (flwr 1.42)")
    return path


def registered_node_id(output: str) -> int:
    """The node id ``flwr supernode register KEY.pub CONNECTION --format json`` printed (its whole
    stdout, an indented JSON object ``{"success": true, "node-id": <int>}``).
    ValueError with the output when registration failed."""
    try:
        reply = json.loads(output[output.index("{") :])
    except (ValueError, json.JSONDecodeError):
        raise ValueError(f"not the JSON output of flwr supernode register: {output.strip()[-300:]!r}") from None
    if not isinstance(reply, dict) or reply.get("success") is not True or "node-id" not in reply:
        raise ValueError(f"flwr supernode register did not register the key: {reply}")
    return int(reply["node-id"])
