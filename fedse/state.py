"""Private client state: where the tensors that never leave a client live.

In simulation (and in a SuperNode's process) the state lives in Flower's
``context.state``, a RecordDict that the engine keeps per client across rounds.
On disk (a deployed client's state directory) :class:`StateStore` keeps it in
one file written atomically (temporary file, fsync, rename) with a SHA-256 of
its payload: a crash leaves the previous file intact, and a corrupt file is a
clear error, never a silent re-initialisation.
A digest (CRC32 over keys, dtypes, shapes and bytes) identifies a state without
revealing it; it is used to verify continuity across rounds and restarts.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context

from .io import atomic_write_bytes
from .records import NODE_STATE_DIR, from_arrays, to_arrays

__all__ = [
    "ACCOUNTANT_KEY",
    "MAGIC",
    "PRIVATE_DIR",
    "PRIVATE_KEY",
    "RoundStore",
    "StateCorruptError",
    "StateStore",
    "digest",
    "load_accountant",
    "load_private",
    "read_tensor_file",
    "persist",
    "private_manifest",
    "restore",
    "save_accountant",
    "save_private",
    "verify_manifest",
    "write_tensor_file",
]

PRIVATE_KEY = "fedse.private"
LAYOUT_KEY = "fedse.private-layout"
ACCOUNTANT_KEY = "fedse.accountant"


def _layout_crc(state: Mapping[str, torch.Tensor]) -> int:
    """CRC32 of the keys, dtypes and shapes, in order: what a packed buffer needs to be read back."""
    text = ";".join(f"{k}|{t.dtype}|{tuple(t.shape)}" for k, t in state.items())
    return zlib.crc32(text.encode())


def load_private(context: Context, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """This client's private tensors from earlier rounds, or None on its first round.

    ``template``: the private tensors of a freshly built model (their keys, dtypes and shapes, in
    order, say how to read the packed buffer back); a stored state of another layout (the policy or
    model changed mid-run) is a ValueError."""
    if PRIVATE_KEY not in context.state.array_records:
        return None
    stored = context.state.config_records.get(LAYOUT_KEY)
    if stored is None or int(stored["crc"]) != _layout_crc(template):
        raise ValueError(
            "stored private state does not match this run's private keys; was the policy or model changed mid-run?"
        )
    buffer = from_arrays(context.state.array_records[PRIVATE_KEY])["packed"]
    out, offset = {}, 0
    for key, like in template.items():
        size = like.numel() * like.element_size()
        out[key] = buffer[offset : offset + size].clone().view(like.dtype).reshape(like.shape)
        offset += size
    if offset != buffer.numel():
        raise ValueError(f"stored private state holds {buffer.numel()} bytes, this run's private keys {offset}")
    return out


def save_private(context: Context, state: Mapping[str, torch.Tensor]) -> None:
    """Keep the private tensors in ``context.state`` packed into one byte buffer (plus the CRC of
    their layout): one Flower ``Array`` per client, not one per tensor, which is what keeps 1,000+
    virtual clients' state small in the simulation driver (measured in ``benchmarks/scale.py``)."""
    parts = [t.detach().cpu().contiguous().reshape(-1).view(torch.uint8) for t in state.values()]
    packed = torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    context.state[PRIVATE_KEY] = to_arrays({"packed": packed})
    context.state[LAYOUT_KEY] = ConfigRecord({"crc": _layout_crc(state)})


def load_accountant(context: Context) -> dict[str, Any] | None:
    """This client's DP accountant state (Opacus's ``state_dict()``, as JSON data); None before any DP step."""
    if ACCOUNTANT_KEY not in context.state.config_records:
        return None
    return json.loads(str(context.state.config_records[ACCOUNTANT_KEY]["state"]))


def save_accountant(context: Context, state: Mapping[str, Any]) -> None:
    context.state[ACCOUNTANT_KEY] = ConfigRecord({"state": json.dumps(dict(state))})


def _store(context: Context, store: StateStore | RoundStore | None) -> StateStore | RoundStore | None:
    if store is not None:
        return store
    directory = context.node_config.get(NODE_STATE_DIR)
    return StateStore(str(directory)) if directory else None


def restore(
    context: Context, template: Mapping[str, torch.Tensor], store: StateStore | RoundStore | None = None
) -> dict[str, torch.Tensor] | None:
    """This client's private tensors: from ``context.state`` within a run; else from disk (with its
    accountant history): ``store`` (a simulated client's :class:`RoundStore` in the run folder) or,
    for a client with a ``state-dir``, its :class:`StateStore`, so a restarted client or a resumed
    run continues bit-identically. None on a client's very first round. A corrupt file raises; so
    does a stored state whose keys, dtypes or shapes differ from ``template`` (this run's private
    tensors)."""
    private = load_private(context, template)
    if private is not None:
        return private
    store = _store(context, store)
    loaded = store.load() if store is not None else None
    if loaded is None:
        return None
    tensors, meta = loaded
    if _layout_crc(tensors) != _layout_crc(template):
        raise ValueError(
            "stored private state does not match this run's private keys; was the policy or model changed mid-run?"
        )
    save_private(context, tensors)
    if meta.get("accountant"):
        save_accountant(context, meta["accountant"])
    return tensors


def persist(
    context: Context, private: Mapping[str, torch.Tensor], store: StateStore | RoundStore | None = None
) -> None:
    """Keep the private tensors (and the accountant) in ``context.state`` and on disk atomically:
    in ``store`` or, for a client with a ``state-dir``, in its :class:`StateStore`."""
    save_private(context, private)
    store = _store(context, store)
    if store is not None:
        store.save(private, {"accountant": load_accountant(context)})


def digest(state: Mapping[str, torch.Tensor]) -> int:
    """CRC32 of the state's keys, dtypes, shapes and bytes (order-sensitive)."""
    crc = 0
    for key, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        crc = zlib.crc32(f"{key}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(t.numpy().tobytes(), crc)
    return crc


MAGIC = b"FEDSE-STATE\n"


class StateCorruptError(RuntimeError):
    """A state file failed its checksum or cannot be parsed; nothing was re-initialised."""


def write_tensor_file(
    path: str | Path, magic: bytes, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None
) -> None:
    """``magic``, one JSON header line (format, SHA-256 and length of the payload, ``meta``), then the
    payload: ``torch.save`` of the tensors (CPU copies). Written atomically, readable by its owner only."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buffer)
    payload = buffer.getvalue()
    header = {"format": 1, "sha256": hashlib.sha256(payload).hexdigest(), "length": len(payload)}
    header["meta"] = dict(meta or {})
    atomic_write_bytes(Path(path), magic + json.dumps(header).encode() + b"\n" + payload, private=True)


def read_tensor_file(path: str | Path, magic: bytes, kind: str, advice: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of a file :func:`write_tensor_file` wrote. The payload is checked against the
    header's SHA-256 and length before it is read, and read with ``torch.load(weights_only=True)``
    (tensors and plain data only: a pickled object is refused, never run). Any defect is a
    :class:`StateCorruptError` naming the file, what is wrong and ``advice``."""
    raw = Path(path).read_bytes()
    if not raw.startswith(magic) or b"\n" not in raw[len(magic) :]:
        raise StateCorruptError(f"{path} is not a fedse {kind} file (bad header); {advice}")
    line, _, payload = raw[len(magic) :].partition(b"\n")
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StateCorruptError(f"{path}: unreadable header; {advice}") from None
    if not isinstance(header, dict) or not isinstance(header.get("meta", {}), dict):
        raise StateCorruptError(f"{path}: header is not a JSON object with a 'meta' object; {advice}")
    actual = hashlib.sha256(payload).hexdigest()
    if len(payload) != header.get("length") or actual != header.get("sha256"):
        raise StateCorruptError(
            f"{path}: checksum mismatch (expected sha256 {header.get('sha256')}, "
            f"{header.get('length')} bytes; found {actual}, {len(payload)} bytes); {advice}"
        )
    try:
        tensors = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as err:  # noqa: BLE001 (weights_only refuses anything but tensors and plain data)
        raise StateCorruptError(
            f"{path}: payload is not a plain mapping of tensors ({type(err).__name__}); {advice}"
        ) from None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise StateCorruptError(f"{path}: payload is not a mapping of tensors; {advice}")
    return tensors, header.get("meta", {})


class StateStore:
    """One client's private state on disk: ``<directory>/private_state.bin``.

    Layout: :func:`write_tensor_file` with ``MAGIC``.
    """

    FILENAME = "private_state.bin"

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / self.FILENAME

    def save(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
        write_tensor_file(self.path, MAGIC, tensors, meta)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, metadata), or None when this client has no state yet."""
        if not self.path.exists():
            return None
        advice = (
            f"restore {self.path} from a backup, or delete it to start this client from the common "
            "initialisation (its personalization is then lost)"
        )
        return read_tensor_file(self.path, MAGIC, "state", advice)


PRIVATE_DIR = "private"  # in a simulation's run folder: every client's private state, one folder each
_ROUND_FILE = re.compile(r"r(\d{6})\.bin")


def _rounds_in(directory: Path) -> list[int]:
    """The rounds of the state files in ``directory`` (``r000007.bin``), ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _ROUND_FILE.fullmatch(p.name)))


class RoundStore:
    """A simulated client's private state in the run folder, one file per round it trained in:
    ``<root>/client-<id>/r<round>.bin`` (:func:`write_tensor_file` with ``MAGIC``).

    Flower's ``context.state`` lives in the simulation's process; these files are what a resumed
    run (a new process) restores from. A message of round ``r`` reads the newest file of a round
    before ``r`` (a train message) or up to ``r`` (an evaluate message): a file written in a round
    the checkpoint does not hold (the run stopped mid-round) is never read, and is overwritten
    when that round runs again. Each save keeps the client's two newest files, the most a resume
    can need (the checkpoint's round and the round after it)."""

    KEEP = 2

    def __init__(self, root: str | Path, client: int, server_round: int, *, inclusive: bool) -> None:
        self.directory = Path(root) / f"client-{int(client)}"
        self.round = int(server_round)
        self.bound = self.round if inclusive else self.round - 1

    def path(self, server_round: int) -> Path:
        return self.directory / f"r{server_round:06d}.bin"

    def save(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_tensor_file(self.path(self.round), MAGIC, tensors, {**(meta or {}), "round": self.round})
        for old in _rounds_in(self.directory)[: -self.KEEP]:
            self.path(old).unlink(missing_ok=True)

    def load(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """(tensors, metadata) of the newest file within the bound, or None (the client's first round)."""
        rounds = [r for r in _rounds_in(self.directory) if r <= self.bound]
        if not rounds:
            return None
        path = self.path(rounds[-1])
        advice = "restore the run folder from a backup; the run cannot continue without this client's state"
        return read_tensor_file(path, MAGIC, "state", advice)


_MAX_HEADER = 1 << 24  # a header line (its meta holds the DP accountant's history, growing by rounds)


def _header_sha(path: Path) -> str | None:
    """The payload SHA-256 a state file's header records, read from the header line alone (the
    payload is checked against it when the file is read); None for a file without such a header."""
    with path.open("rb") as f:
        if f.read(len(MAGIC)) != MAGIC:
            return None
        line = f.readline(_MAX_HEADER)
    if not line.endswith(b"\n"):
        return None
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return header.get("sha256") if isinstance(header, dict) else None


def private_manifest(root: str | Path, server_round: int) -> dict[str, dict[str, Any]]:
    """Every simulated client's private state as of the end of ``server_round``: its client id ->
    the round of its newest file up to that round and the SHA-256 of that file's payload. A
    checkpoint stores it; :func:`verify_manifest` checks the files against it before a resume."""
    root = Path(root)
    if not root.is_dir():
        return {}
    out = {}
    for directory in sorted(root.glob("client-*")):
        rounds = [r for r in _rounds_in(directory) if r <= server_round]
        if rounds and directory.name[len("client-") :].isdigit():
            path = directory / f"r{rounds[-1]:06d}.bin"
            out[directory.name[len("client-") :]] = {"round": rounds[-1], "sha256": _header_sha(path)}
    return out


def verify_manifest(root: str | Path, manifest: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What stops a resume from restoring the private state ``manifest`` lists, one line a client
    (empty when every file is there, whole and unchanged; each payload is hashed)."""
    problems = []
    for client, entry in sorted(manifest.items(), key=lambda kv: int(kv[0])):
        path = Path(root) / f"client-{int(client)}" / f"r{int(entry['round']):06d}.bin"
        if not path.is_file():
            problems.append(f"client {client}: {path} is missing")
            continue
        try:
            read_tensor_file(path, MAGIC, "state", "")
        except StateCorruptError:
            problems.append(f"client {client}: {path} is corrupt (checksum or format)")
            continue
        if _header_sha(path) != entry.get("sha256"):
            problems.append(f"client {client}: {path} is not the file the checkpoint recorded (another SHA-256)")
    return problems
