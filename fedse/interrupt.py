"""Stopping a run: a signal is a pause, never a loss.

A long command (``fedse simulate``, ``fedse compare``) runs inside
:func:`stoppable`. The first SIGINT (Ctrl-C) or SIGTERM asks the run to stop:
the server's :class:`StoppableGrid` stops waiting for replies within a tenth of
a second and raises :class:`RunStopped`, so the ServerApp ends, Flower's engine
shuts Ray down, and the run folder keeps its last complete round (every file in
it is written atomically, so nothing is half-written). A second signal stops
the process at once: its child processes (Ray's) are killed and it exits; the
folder is still resumable, since it never depended on a clean exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NoReturn

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = [
    "RunStopped",
    "descendants",
    "StoppableGrid",
    "as_stop",
    "clear_stop",
    "exit_code",
    "exit_now",
    "request_stop",
    "stop_requested",
    "stoppable",
]

_STOP = threading.Event()
_SIGNAL: list[int] = []  # the first signal received, for the message and the exit code


class RunStopped(BaseException):  # noqa: N818 (a stop is not an error)
    """The run was asked to stop (a signal); its folder keeps the last complete round.

    A BaseException, as KeyboardInterrupt is: Flower's engine passes it through its
    ``except Exception`` handlers (no traceback logged) and still runs its ``finally`` blocks,
    which stop the engine and shut Ray down."""

    def __init__(self, signum: int | None = None) -> None:
        self.signum = signum if signum is not None else (_SIGNAL[0] if _SIGNAL else signal.SIGINT)
        self.run_dir: Path | None = None  # the run folder it stopped, where known
        self.out: Path | None = None  # a comparison's folder, where known
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")


def stop_requested() -> bool:
    return _STOP.is_set()


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def _parents() -> dict[int, int]:
    """Every process's parent, from Linux's /proc (empty elsewhere)."""
    out = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            out[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Ray's GCS, raylet and workers below a driver), nearest first."""
    parents, found, frontier = _parents(), [], {pid}
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = set(children)
    return found


def _kill_children() -> None:
    for child in reversed(descendants(os.getpid())):
        with contextlib.suppress(OSError):
            os.kill(child, signal.SIGKILL)


def exit_now(code: int, grace: float = 10.0) -> NoReturn:
    """End this process after a stop. The ServerApp's thread gets up to ``grace`` seconds to end (it
    ends at its next poll for replies, after any file it is writing); whatever is left below this
    process (Ray's) is killed; then the process exits without the interpreter's shutdown, which can
    wait forever on threads of Flower's engine blocked on Ray, or crash in Ray's core worker."""
    deadline = time.monotonic() + grace
    for thread in threading.enumerate():
        if "server_th" in thread.name:  # Flower's ServerApp thread (named after its target)
            thread.join(max(0.0, deadline - time.monotonic()))
    _kill_children()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _handler(signum: int, frame: object) -> None:
    if _STOP.is_set():  # the second signal: stop now
        print(f"\nfedse: {signal.Signals(signum).name} again: stopping at once", file=sys.stderr, flush=True)
        _kill_children()
        os._exit(exit_code(_SIGNAL[0] if _SIGNAL else signum))
    request_stop(signum)
    print(
        f"\nfedse: {signal.Signals(signum).name}: stopping after the last complete round "
        "(send it again to stop at once)",
        file=sys.stderr,
        flush=True,
    )
    raise RunStopped(signum)


@contextlib.contextmanager
def stoppable() -> Iterator[None]:
    """Run the block with fedse's SIGINT/SIGTERM handlers (main thread only; elsewhere a no-op).

    Ray installs its own SIGTERM handler when it starts (``sys.exit``); the block's caller treats
    that SystemExit as a stop too (:func:`as_stop`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    clear_stop()
    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:  # the stop stays requested: the server's thread may still be waiting, and must end too
        for s, h in previous.items():
            signal.signal(s, h)


def clear_stop() -> None:
    """Forget an earlier stop request (a new run starts)."""
    _STOP.clear()
    _SIGNAL.clear()


def request_stop(signum: int) -> None:
    """Ask the run to stop (as the first signal does) without raising here."""
    if not _SIGNAL:
        _SIGNAL.append(signum)
    _STOP.set()
    # Flower logs every client task that Ray's shutdown cuts short as an error: expected now
    logging.getLogger("flwr").setLevel(logging.CRITICAL)


def as_stop(err: BaseException) -> RunStopped | None:
    """A KeyboardInterrupt, a SystemExit from Ray's SIGTERM handler or a RunStopped, as a RunStopped
    (the server thread is told to stop too); None for anything else."""
    if isinstance(err, RunStopped):
        request_stop(err.signum)
        return err
    if isinstance(err, KeyboardInterrupt):
        request_stop(signal.SIGINT)
        return RunStopped()
    if isinstance(err, SystemExit) and err.code == signal.SIGTERM:  # Ray's handler: sys.exit(signum)
        request_stop(signal.SIGTERM)
        return RunStopped()
    return None


class StoppableGrid(Grid):
    """A Grid that stops waiting for replies when the run is asked to stop (:class:`RunStopped`).

    Flower's ``send_and_receive`` waits out its whole timeout however the process is asked to stop;
    this one pushes the messages, then pulls replies every ``pull_interval`` seconds until all came,
    the timeout passed, or a stop was requested."""

    def __init__(self, grid: Grid, pull_interval: float = 0.1) -> None:
        self._grid = grid
        self._interval = pull_interval

    def __getattr__(self, name: str) -> object:
        return getattr(self._grid, name)

    @property
    def run(self):  # noqa: ANN201
        return self._grid.run

    def set_run(self, run_id: int) -> None:
        self._grid.set_run(run_id)

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[object]:  # the nodes' records, registered public keys included
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            if _STOP.is_set() or not threading.main_thread().is_alive():
                raise RunStopped()
            got = list(self.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self._interval)
        return replies
