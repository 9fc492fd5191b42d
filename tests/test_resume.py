"""A stop is a pause: runs killed (SIGKILL) or interrupted (SIGINT) at random points, then resumed,
end exactly where an uninterrupted run with the same seed ends.

Each command runs as a real ``fedse`` process in its own session, as a terminal would run it, and
every signal goes to that whole session (Ray's processes included), as Ctrl-C does. The kill points
are drawn from ``FEDSE_KILL_SEED`` (a fresh seed when unset); a failure names the seed and points.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("FEDSE_KILL_SEED", random.SystemRandom().randrange(1 << 30)))

TINY = {
    "partition": {"num_clients": 3, "scheme": "dirichlet", "alpha": 1.0},
    "model": {"width": 8},
    "train": {"batch_size": 64},
    "server": {"rounds": 5},
    "evaluate": {"private_digest": True, "pooled_max_samples": 200, "pooled_every": 2},
}


def _fedse(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedse.cli", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a signal reaches Ray's processes too
    )


def _session_alive(pgid: int) -> bool:
    """Whether any process is left in process group ``pgid`` (read from /proc)."""
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            if int(stat[stat.rindex(")") + 2 :].split()[2]) == pgid:
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def _stop_session(pgid: int, timeout: float = 30.0) -> None:
    """SIGKILL whatever of the session is left, and wait until nothing of it is."""
    deadline = time.monotonic() + timeout
    while _session_alive(pgid) and time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            break
        time.sleep(0.2)


def _run(args: list[str], cwd: Path, timeout: float = 240) -> tuple[int, str, float]:
    start = time.monotonic()
    proc = _fedse(args, cwd)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        _stop_session(proc.pid)
    return proc.returncode, out, time.monotonic() - start


def _interrupt(args: list[str], cwd: Path, after: float, signum: int) -> tuple[int, str]:
    """Run ``args``; ``after`` seconds later send ``signum`` to its whole session (a run that ended
    first is left as it ended). Every process of the session is gone when this returns."""
    proc = _fedse(args, cwd)
    try:
        try:
            out, _ = proc.communicate(timeout=after)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signum)
            out, _ = proc.communicate(timeout=300)  # a hang guard: a stop under load can take minutes
    finally:
        _stop_session(proc.pid)
    return proc.returncode, out


def _run_to_the_end(first: list[str], folder: Path, cwd: Path, kills: list[tuple[float, int]]) -> list[str]:
    """Start ``first``; stop it at each (seconds, signal) of ``kills``, each time continuing as a user
    would (``--resume`` once the folder holds its record, else the first command again); then let
    the last continuation finish. The transcript of what happened."""
    story = []
    for after, signum in kills:
        args = ["simulate", "--resume", str(folder), "--quiet"] if (folder / "config.yaml").is_file() else first
        code, out = _interrupt(args, cwd, after, signum)
        story.append(f"{' '.join(args[:2])} {signal.Signals(signum).name} at {after:.1f}s -> exit {code}")
        if signum == signal.SIGINT and code != 0:  # stopped cleanly: one line, the resume command, no traceback
            assert code == 130, (story, out)
            assert "Traceback" not in out, (story, out)
            again = f"fedse simulate --resume {folder}" if (folder / "config.yaml").is_file() else "the same command"
            assert out.strip().splitlines()[-1].endswith(f"Continue with: {again}"), (story, out)
    args = ["simulate", "--resume", str(folder), "--quiet"] if (folder / "config.yaml").is_file() else first
    code, out, _ = _run(args, cwd)
    story.append(f"{' '.join(args[:2])} to the end -> exit {code}")
    assert code == 0, (story, out)
    return story


def _write_config(tmp_path: Path, name: str, **sections) -> Path:
    raw = json.loads(json.dumps(TINY))
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    raw["output"] = {"dir": str(tmp_path / "runs"), "name": name}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _same_run(a: Path, b: Path) -> None:
    """Two finished run folders hold the same results, bit for bit: final shared weights, every
    per-round and per-client figure, every client's private state and personalized model file."""
    wa, wb = torch.load(a / "shared_weights.pt"), torch.load(b / "shared_weights.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    timeless = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert timeless(json.loads((a / "rounds.json").read_text())) == timeless(
        json.loads((b / "rounds.json").read_text())
    )
    assert json.loads((a / "clients.json").read_text()) == json.loads((b / "clients.json").read_text())
    no_node = lambda t: {
        r: {c: {k: v for k, v in row.items() if k != "node-id"} for c, row in rows.items()} for r, rows in t.items()
    }  # noqa: E501, E731
    ra, rb = json.loads((a / "client_rounds.json").read_text()), json.loads((b / "client_rounds.json").read_text())
    assert no_node(ra["train"]) == no_node(rb["train"]) and no_node(ra["evaluate"]) == no_node(rb["evaluate"])
    for sub in ("clients", "private"):
        files_a = sorted(p.relative_to(a) for p in (a / sub).rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b) for p in (b / sub).rglob("*") if p.is_file())
        assert files_a == files_b and files_a
        assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files_a), sub


def test_simulate_killed_at_random_points_resumes_to_the_uninterrupted_result(tmp_path):
    whole = _write_config(tmp_path, "whole")
    code, out, seconds = _run(["simulate", "--config", str(whole), "--quiet"], tmp_path)
    assert code == 0, out
    rng = random.Random(SEED)
    kills = sorted(rng.uniform(1.0, seconds) for _ in range(3))
    kills = [(kills[0], signal.SIGKILL), (kills[1], signal.SIGINT), (kills[2], signal.SIGKILL)]
    stopped = _write_config(tmp_path, "stopped")
    folder = tmp_path / "runs" / "stopped"
    story = _run_to_the_end(["simulate", "--config", str(stopped), "--quiet"], folder, tmp_path, kills)
    try:
        _same_run(tmp_path / "runs" / "whole", folder)
    except AssertionError as err:
        raise AssertionError(f"FEDSE_KILL_SEED={SEED}: {story}") from err

    # Resuming the finished run adds nothing and changes nothing.
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    code, out, _ = _run(["simulate", "--resume", str(folder)], tmp_path)
    assert code == 0 and "nothing to add, nothing changed" in out, out
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


def test_sample_dp_run_killed_and_resumed_reports_the_uninterrupted_epsilons(tmp_path):
    """DP-SGD draws its noise from a generator seeded by the OS (fedse.privacy), so no two DP runs
    share their weights; what must not change with a stop is the privacy spent: every client's
    epsilon after every round, and the steps it was computed from."""
    dp = {"privacy": {"mode": "sample", "noise_multiplier": 1.0}, "model": {"width": 8, "norm": "groupnorm"}}
    whole = _write_config(tmp_path, "whole", **dp)
    code, out, seconds = _run(["simulate", "--config", str(whole), "--quiet"], tmp_path)
    assert code == 0, out
    stopped = _write_config(tmp_path, "stopped", **dp)
    folder = tmp_path / "runs" / "stopped"
    after = random.Random(SEED).uniform(0.5 * seconds, 0.9 * seconds)
    story = _run_to_the_end(
        ["simulate", "--config", str(stopped), "--quiet"], folder, tmp_path, [(after, signal.SIGKILL)]
    )
    eps = lambda run: {  # noqa: E731
        r: {c: row["dp-epsilon"] for c, row in rows.items()}
        for r, rows in json.loads((run / "client_rounds.json").read_text())["train"].items()
    }
    assert eps(folder) == eps(tmp_path / "runs" / "whole"), f"FEDSE_KILL_SEED={SEED}: {story}"
    assert len(eps(folder)) == 5 and all(len(v) == 3 for v in eps(folder).values())


def test_compare_killed_at_random_points_reruns_to_the_uninterrupted_comparison(tmp_path):
    """``fedse compare`` continues with the same command, whatever method or seed it was in."""
    cfg = _write_config(tmp_path, "cmp", server={"rounds": 3})
    command = ["compare", "--config", str(cfg), "--methods", "fedavg,fedse", "--seeds", "0"]
    code, out, seconds = _run([*command, "--out", str(tmp_path / "whole")], tmp_path)
    assert code == 0, out
    rng = random.Random(SEED + 1)
    points = sorted(rng.uniform(1.0, seconds) for _ in range(3))
    story = []
    for after, signum in zip(points, (signal.SIGKILL, signal.SIGINT, signal.SIGKILL), strict=True):
        code, out = _interrupt([*command, "--out", str(tmp_path / "stopped")], tmp_path, after, signum)
        story.append(f"{signal.Signals(signum).name} at {after:.1f}s -> exit {code}")
        if signum == signal.SIGINT and code != 0:
            assert code == 130 and "Traceback" not in out, (story, out)
            assert f"--out {tmp_path / 'stopped'}" in out.splitlines()[-1], (story, out)
    code, out, _ = _run([*command, "--out", str(tmp_path / "stopped")], tmp_path)
    assert code == 0, (story, out)
    timeless = lambda summary: [  # noqa: E731
        {**r, "seconds": None, "rounds": [{**x, "seconds": None} for x in r["rounds"]]} for r in summary["runs"]
    ]
    whole = json.loads((tmp_path / "whole" / "comparison.json").read_text())
    stopped = json.loads((tmp_path / "stopped" / "comparison.json").read_text())
    message = f"FEDSE_KILL_SEED={SEED}: {story}"
    assert timeless(whole) == timeless(stopped), message
    for method in ("fedavg", "fedse"):
        run = f"runs/{method}-seed0"
        try:
            _same_run(tmp_path / "whole" / run, tmp_path / "stopped" / run)
        except AssertionError as err:
            raise AssertionError(message) from err
