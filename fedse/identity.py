"""Who a node is: its registered SuperNode key, as an operator lists it.

In a deployment every SuperNode signs in with a key the operator registered
(``flwr supernode register``), and the SuperLink keeps each node's public key
with its node id. The operator lists each client's key fingerprint (what
``ssh-keygen -lf KEY.pub`` prints) with its client number; the guard
(:class:`fedse.federation.strategy.GuardedStrategy`) then binds each node to the number
its key is listed with, so a node whose key is not listed, or that claims
another number, is refused. Simulated nodes have no keys.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "KeyBindings",
    "bind_node_keys",
    "check_client_keys",
    "key_fingerprint",
    "node_key_fingerprints",
    "read_client_keys",
]

MAX_KEY_LIST_BYTES = 1 << 20  # a key list of a million clients is 70 MB; this one is for hundreds


_FINGERPRINT = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def key_fingerprint(public_key: bytes | str) -> str:
    """The ``SHA256:<base64>`` fingerprint of an EC public key, the text ``ssh-keygen -lf KEY.pub``
    prints for it.

    ``public_key``: a line of an OpenSSH ``.pub`` file (what ``fedse keygen`` writes and
    ``flwr supernode register`` reads), or PEM SubjectPublicKeyInfo (what Flower stores at
    registration and the ServerApp gets as ``NodeInfo.public_key`` from ``Grid.get_nodes()``).
    The same key gives the same fingerprint in either form. ValueError for anything else."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    data = public_key.encode() if isinstance(public_key, str) else bytes(public_key)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"not an OpenSSH or PEM public key: {err}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"not an EC public key (Flower's SuperNode keys are ECDSA): {type(key).__name__}")
    blob = base64.b64decode(
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def node_key_fingerprints(nodes: Iterable[Any]) -> dict[int, str]:
    """``{node_id: key fingerprint}`` for Flower ``NodeInfo`` records: those of ``Grid.get_nodes()``
    in a ServerApp, or ``ListNodesResponse.nodes_info`` of the Control API.

    A node without a usable EC key is left out: ``Grid.get_nodes()``'s default (a Grid that does
    not forward it) gives node ids only, and the simulation engine gives its nodes 32 random bytes."""
    found: dict[int, str] = {}
    for node in nodes:
        try:
            found[int(node.node_id)] = key_fingerprint(node.public_key)
        except (AttributeError, ValueError):
            continue
    return found


def check_client_keys(client_keys: Mapping[str, Any]) -> dict[str, int]:
    """Validate an operator's ``{key fingerprint: client number}`` list: each fingerprint as
    ``ssh-keygen -lf`` prints it (``SHA256:`` and 43 base64 characters), each number a distinct
    integer >= 0. Returns it with int values; ValueError naming every problem."""
    problems: list[str] = []
    checked: dict[str, int] = {}
    owner: dict[int, str] = {}
    for fingerprint, client in client_keys.items():
        if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
            problems.append(f"{fingerprint!r} is not a key fingerprint (ssh-keygen -lf KEY.pub: SHA256:...)")
            continue
        if isinstance(client, bool) or not isinstance(client, int) or client < 0:
            problems.append(f"{fingerprint}: client number must be an integer >= 0, got {client!r}")
            continue
        if client in owner:
            problems.append(f"client {client} is listed for two keys: {owner[client]} and {fingerprint}")
            continue
        owner[client] = fingerprint
        checked[fingerprint] = client
    if problems:
        raise ValueError("; ".join(problems))
    return checked


@dataclass(frozen=True)
class KeyBindings:
    """Which node is which client, by registered key: ``clients`` maps a node id to the client
    number listed for its key; ``unlisted`` holds the nodes whose key is not listed (or unknown),
    ``missing`` the listed clients no connected node holds the key of."""

    clients: dict[int, int] = field(default_factory=dict)
    unlisted: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)


def bind_node_keys(nodes: Iterable[Any], client_keys: Mapping[str, int]) -> KeyBindings:
    """Bind each node (Flower ``NodeInfo``: ``node_id``, ``public_key``) to the client number its
    registered key is listed with in ``client_keys`` (``{fingerprint: client}``, see
    :func:`check_client_keys`). A registered key has one node id while it stays registered (the
    SuperLink looks the node up by its key at every connection), so the binding survives
    reconnects and restarts; a key registered on another SuperLink database gets another node id
    and keeps its client number. (Flower never registers a key twice on one database, not even
    after ``flwr supernode unregister``.)"""
    nodes = list(nodes)
    fingerprints = node_key_fingerprints(nodes)
    clients: dict[int, int] = {}
    unlisted: list[int] = []
    for node in nodes:
        node_id = int(node.node_id)
        client = client_keys.get(fingerprints.get(node_id, ""))
        if client is None:
            unlisted.append(node_id)
        else:
            clients[node_id] = client
    missing = sorted(set(client_keys.values()) - set(clients.values()))
    return KeyBindings(clients, sorted(unlisted), missing)


def read_client_keys(path: str | Path) -> dict[str, int]:
    """An operator's key list file: one ``SHA256:<fingerprint> <client number>`` a line (``#``
    starts a comment), checked by :func:`check_client_keys`. ValueError naming the file, the line
    and what is allowed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_KEY_LIST_BYTES:
            raise ValueError(f"{path}: {size} bytes; allowed: at most {MAX_KEY_LIST_BYTES}")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the key list ({type(err).__name__}: {err})") from None
    keys: dict[str, Any] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2 or not words[1].isdigit() or words[0] in keys:
            raise ValueError(
                f"{path}, line {number}: {line.strip()[:100]!r}; allowed: 'SHA256:<fingerprint> <client number>', "
                "each fingerprint once"
            )
        keys[words[0]] = int(words[1])
    if not keys:
        raise ValueError(f"{path} lists no key; allowed: one 'SHA256:<fingerprint> <client number>' a line")
    try:
        return check_client_keys(keys)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
