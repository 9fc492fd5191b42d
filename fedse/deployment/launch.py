"""Start and stop a deployment's processes on one machine: SuperLink, SuperNodes, ``flwr run``.

For the end-to-end test, the deployment benchmark and local demos. Each process
starts in its own session with its output in ``<logs>/<name>.log``; stopping one
stops its process group and the children it started in other sessions (a
SuperNode's ClientApp processes), and waits until they are gone, so nothing is
left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["LocalProcesses", "free_port", "register_supernode", "wait_for"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` every 0.5 s; TimeoutError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def register_supernode(
    public_key: Path, name: str, *, connection: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``flwr supernode register PUBLIC_KEY CONNECTION --name NAME`` (the ``flwr`` beside this
    Python), its output captured; the caller checks ``returncode``."""
    flwr = str(Path(sys.executable).with_name("flwr"))
    return subprocess.run(
        [flwr, "supernode", "register", str(public_key), connection, "--name", name],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def _children(pid: int) -> list[int]:
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().split(")")[-1].split()[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return kids


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


class LocalProcesses:
    """Named processes, each in its own session, logged to ``<logs>/<name>.log``."""

    def __init__(self, env: dict[str, str], logs: Path, cwd: Path) -> None:
        self.env, self.logs, self.cwd = env, Path(logs), cwd
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        handle = (self.logs / f"{name}.log").open("w")
        proc = subprocess.Popen(
            cmd, stdout=handle, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def tails(self, lines: int = 25) -> str:
        """The last ``lines`` lines of every process's log, each under its name."""
        return "\n".join(
            f"--- {name}.log (exit {proc.poll()}) ---\n" + "\n".join(self.log(name).splitlines()[-lines:])
            for name, proc in self.procs.items()
        )

    def wait_log(
        self, name: str, done: Callable[[str], bool], timeout: float, what: str, *, alive: tuple[str, ...] = ()
    ) -> None:
        """Poll until ``done(<name's log>)``. Fail at once when ``name`` or a process in ``alive``
        has exited first (it will never get there), and on timeout; either error carries the tails
        of every log, so a failure far away (CI) says why."""

        def ready() -> bool:
            if done(self.log(name)):
                return True
            dead = [n for n in (name, *alive) if self.procs[n].poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}\n{self.tails()}")
            return False

        try:
            wait_for(ready, timeout, what)
        except TimeoutError as err:
            raise TimeoutError(f"{err}\n{self.tails()}") from None

    def peak_rss_mb(self, name: str) -> float:
        """The process's peak resident memory so far (VmHWM), in MB."""
        for line in Path(f"/proc/{self.procs[name].pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmHWM for {name}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        descendants = _children(proc.pid)
        for pid in [proc.pid, *descendants]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, sig) if pid == proc.pid else os.kill(pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        for pid in descendants:
            wait_for(lambda p=pid: _gone(p), 20, f"process {pid} to stop")

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            if self.procs[name].poll() is None or _children(self.procs[name].pid):
                self.kill(name, signal.SIGTERM)

    def running(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is None]
