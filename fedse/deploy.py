"""Deployment on Flower's Deployment Engine: SuperLink, SuperNodes, ``flwr run``.

fedse adds no transport of its own. These helpers build the Flower commands a
deployment needs, with fedse's defaults: TLS on (a test certificate authority
made here, or the operator's own certificates), SuperNode authentication on
(only registered public keys join), runtime dependency installation off (the
apps run in the environment fedse is installed in). Insecure mode exists only
behind an explicit flag and logs a warning.

Flower 1.42 serves the Fleet, Control and Runtime APIs of a SuperLink on one
address (``--host``/``--port``); a SuperNode's key pair is an ECDSA (P-384)
key in OpenSSH format, registered with ``flwr supernode register``. Who may
register a key (or submit a run) is not authenticated in the open-source
SuperLink: see ``control_api_exposure``, which ``fedse server`` prints.
"""

from __future__ import annotations

import ipaddress
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
    "superlink_command",
    "supernode_command",
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
    """``flower-superlink`` with TLS and SuperNode authentication (``certs=None``: insecure, warned)."""
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
        cmd += ["--database", str(database)]
    return cmd


def control_api_exposure(host: str, port: int) -> str:
    """Who can act on the SuperLink's Control API at ``host:port``, and the deployment that limits it.

    ``fedse server`` prints this at start-up because nothing in Flower 1.42 (open source)
    closes the gap: the Control API (register/unregister SuperNodes, start/stop runs) is
    always served on ``--host``/``--port`` with the Fleet API (``--control-api-address`` is
    deprecated and does not move it), account authentication is enterprise-only (the
    open-source plugin accepts every caller), and the HTTPS server asks callers for no
    certificate. SuperNode authentication therefore refuses unregistered keys, but anyone
    who can reach the port can register one. Only the network can limit who reaches it."""
    if port < 1 or port > 65535:
        raise ValueError(f"port must be 1..65535, got {port}")
    where = f"{host}:{port}"
    if _is_loopback(host):
        who = f"any process on this machine (the SuperLink listens on {where})"
    elif _is_unspecified(host):
        who = f"anyone who can reach port {port} on any address of this machine"
    else:
        who = f"anyone who can reach {where}"
    return (
        f"Control API exposure: {who} can register a SuperNode key (that node then joins: SuperNode "
        "authentication only refuses keys nobody registered), unregister nodes, and start or stop runs; a run's "
        "ServerApp code executes on this machine and its ClientApp code on every connected SuperNode. No "
        "credential is needed: TLS proves this server to callers, not callers to it (ca.crt is public, and a "
        "client that skips verification needs not even that); Flower 1.42's open-source SuperLink has no "
        "account authentication and serves the Control API on the same address as the Fleet API.\n"
        "To limit it to the operator and the clients: (1) run 'fedse server --host 127.0.0.1 --database FILE', "
        "register every client's key from this machine (flwr supernode register KEY.pub), and stop it; "
        "(2) run it again with the same --database FILE (it keeps the registrations; the in-memory default "
        f"does not) on the address the clients use, with tcp/{port} reachable only from the clients' hosts "
        "(firewall: allow their addresses, drop the rest). The clients' hosts can still do all of the above."
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
    from .io import atomic_write_text

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
