"""Atomic file writes: a file is either the old version or the new one, never half.

Every file fedse writes (run folders, plots, caches, checkpoints, private state)
goes through these helpers: write to a temporary file in the same directory,
flush and fsync it, then ``os.replace`` it over the target (atomic on POSIX and
Windows), then fsync the directory so the rename itself survives a crash.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_open",
    "atomic_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_output_dir",
    "csv_cell",
]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    """The process's umask. On Linux read from /proc, which does not change it; elsewhere by setting
    and restoring it once per process (umask is process-wide: re-setting it on every write would let
    a file created meanwhile by another thread see the borrowed value)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    return _umask_once()


@functools.cache
def _umask_once() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", *, private: bool = False) -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success rename it over ``path``.

    If the block raises, the temporary file is removed and ``path`` is untouched. The file gets the
    permissions a plain ``open`` would (0666 less the umask); ``private``: owner only (0600), for a
    client's private state and its personalized model.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open mode must be 'wb' or 'w', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; a report should be as readable as any other
        os.fchmod(fd, 0o600 if private else 0o666 & ~_umask())
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, private: bool = False) -> None:
    with atomic_open(path, "wb", private=private) as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save(path: str | os.PathLike[str], writer: Callable[[IO[bytes]], None], *, private: bool = False) -> None:
    """Let ``writer`` fill a binary handle (``torch.save``, ``np.savez``, ``fig.savefig``)."""
    with atomic_open(path, "wb", private=private) as handle:
        writer(handle)


def check_output_dir(path: str | os.PathLike[str], what: str) -> Path:
    """``path`` checked as a folder a command may write into, before the command does any work: an
    existing folder, or a path under whose nearest existing folder one can be made. A file there or
    above it, or a folder this user cannot write to, is a ConfigError naming ``what``, the path and
    what is allowed."""
    from .config import ConfigError

    target = Path(path)
    allowed = "allowed: a folder this user can write to, or a path where one can be made"
    if target.exists() and not target.is_dir():
        raise ConfigError(f"{what} {str(target)!r} is a file, not a folder; {allowed}")
    above = target.absolute()
    while not above.exists():  # also False for a path under a regular file
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"{what} {str(target)!r}: {str(above)!r} is a file, not a folder to make it in; {allowed}")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"{what} {str(target)!r}: {str(above)!r} is not writable by this user; {allowed}")
    return target


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def csv_cell(value: Any) -> Any:
    """``value`` as a CSV cell a spreadsheet shows and never runs: text starting with ``=``, ``+``, ``-``,
    ``@``, a tab or a carriage return gets a leading ``'`` (as OWASP advises against CSV injection); numbers
    and None stay as they are, as does text that is a plain number ("-0.5")."""
    if value is None or isinstance(value, bool | int | float) or type(value).__module__ == "numpy":
        return value
    text = str(value)
    if text.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(text):
        return "'" + text
    return text
