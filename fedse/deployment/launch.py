"""Start and stop a deployment's processes on one machine: SuperLink, SuperNodes, ``flwr run``.

For the end-to-end test, the deployment benchmarks and local demos. Each process
starts in its own session with its output in ``<logs>/<name>.log``; stopping one
stops its process group and the children it started in other sessions (a
SuperNode's ClientApp processes), and waits until they are gone, so nothing is
left running. :func:`start_superlink`, :func:`start_supernodes` and
:func:`start_run` start the three parts in that order and wait until each is up;
:func:`run_rounds` reads what the run recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .deploy import NO_RUNTIME_INSTALL, node_config_string

__all__ = [
    "NODE_ACTIVATED",
    "SUPERLINK_SERVING",
    "LocalProcesses",
    "flower_env",
    "flwr_cli",
    "free_port",
    "register_supernode",
    "run_rounds",
    "start_run",
    "start_superlink",
    "start_supernodes",
    "wait_for",
]

SUPERLINK_SERVING = "Uvicorn running"  # the SuperLink's log line once it serves its APIs
NODE_ACTIVATED = "Activated node_id"  # the SuperLink's log line for each SuperNode that joins


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


def flower_env(home: str | Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a deployment's processes: ``base`` (default: this process's) with
    Flower's app folder in ``home`` (``FLWR_HOME``; every process reads its own, and the default is
    ``~/.flwr``), telemetry off, and no runtime dependency installation (the apps run in the
    environment fedse is installed in)."""
    env = dict(os.environ if base is None else base)
    return {**env, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", **NO_RUNTIME_INSTALL}


def flwr_cli() -> str:
    """The ``flwr`` CLI: the one beside this Python (its virtual environment), else the first on
    ``PATH`` (``pip install --target DIR`` puts it in ``DIR/bin``, not beside the interpreter)."""
    beside = Path(sys.executable).with_name("flwr")
    if beside.is_file():
        return str(beside)
    found = shutil.which("flwr")
    if found is None:
        raise FileNotFoundError(
            f"'flwr' is neither beside {sys.executable} nor on PATH; install fedse's dependencies (flwr 1.42)"
        )
    return found


def register_supernode(
    public_key: Path, name: str, *, connection: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``flwr supernode register PUBLIC_KEY CONNECTION --name NAME`` (:func:`flwr_cli`), its output
    captured; the caller checks ``returncode``."""
    return subprocess.run(
        [flwr_cli(), "supernode", "register", str(public_key), connection, "--name", name],
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


def start_superlink(procs: LocalProcesses, cmd: list[str], timeout: float = 120) -> subprocess.Popen:
    """Start ``cmd`` (:func:`~fedse.deployment.deploy.superlink_command`) as ``superlink`` and wait
    until it serves its APIs."""
    proc = procs.start("superlink", cmd)
    procs.wait_log("superlink", lambda log: SUPERLINK_SERVING in log, timeout, "the SuperLink")
    return proc


def start_supernodes(procs: LocalProcesses, commands: Sequence[list[str]], timeout: float = 300) -> None:
    """Start ``commands[i]`` (:func:`~fedse.deployment.deploy.supernode_command`) as ``node<i>`` and
    wait until the SuperLink (:func:`start_superlink`) has activated that many nodes; fail at once
    when it or a SuperNode exits first (an unregistered key, a port taken)."""
    names = tuple(f"node{i}" for i in range(len(commands)))
    for name, cmd in zip(names, commands, strict=True):
        procs.start(name, cmd)
    n = len(commands)
    procs.wait_log(
        "superlink", lambda log: log.count(NODE_ACTIVATED) >= n, timeout, f"{n} SuperNodes to join", alive=names
    )


def start_run(
    procs: LocalProcesses, name: str, connection: str, run_config: Mapping[str, str | int | float]
) -> subprocess.Popen:
    """``flwr run <procs.cwd> CONNECTION --run-config ... --stream`` as ``name``: the app in the
    processes' working directory, ``run_config`` in Flower's ``key="value"`` syntax. Give paths in it
    (``output-dir``, ``config-file``) absolute: the ServerApp resolves a relative one against Flower's
    installed copy of the app."""
    config = node_config_string(run_config)
    return procs.start(name, [flwr_cli(), "run", str(procs.cwd), connection, "--run-config", config, "--stream"])


def run_rounds(output_dir: str | Path) -> list[dict]:
    """The rounds record (``rounds.json``, one row per round) of the one run folder in a run's
    ``output-dir``."""
    out = Path(output_dir)
    folders = sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []
    if len(folders) != 1:
        raise RuntimeError(f"expected one run folder in {out}, found {[p.name for p in folders]}")
    return json.loads((folders[0] / "rounds.json").read_text())
