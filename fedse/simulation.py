"""Run a federation of virtual clients on Flower's simulation engine (Ray backend).

``fedse simulate`` calls :func:`simulate`: the federation is built once here
(so a missing dataset fails before Ray starts), the label distribution is
plotted, then :func:`flwr.simulation.run_simulation` runs the ServerApp
(:func:`fedse.server.run_server`, in this process) against one ClientApp per
virtual client (:func:`fedse.client.make_client_app`, in Ray actors).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from .client import make_client_app
from .config import Config, ConfigError
from .federated import FederatedData, build_federated_data
from .io import atomic_write_json
from .partition import plot_label_counts
from .report import round_rows
from .server import CHECKPOINT, ServerOutcome, final_tables, run_server
from .strategy import RunLog

__all__ = ["SimulationResult", "backend_config", "claim_run_dir", "discard_unstarted", "make_run_dir", "simulate"]

log = logging.getLogger("fedse")


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path | None
    outcome: ServerOutcome
    wall_seconds: float


def backend_config(cfg: Config, verbose: bool = False) -> dict[str, Any]:
    """Ray resources per virtual client; a GPU fraction only where CUDA is present.

    Client failures reach the server as error replies (counted per round in the
    report), so actors' own logs go to the terminal only with ``verbose``."""
    gpus = cfg.simulation.client_gpu_fraction if torch.cuda.is_available() else 0.0
    return {
        "client_resources": {"num_cpus": cfg.simulation.client_cpus, "num_gpus": gpus},
        "init_args": {"include_dashboard": False, "log_to_driver": verbose,
                      "logging_level": "INFO" if verbose else "ERROR"},
    }


def make_run_dir(cfg: Config, config_name: str) -> Path:
    """Create and claim a new run folder ``output.dir/<output.name or <config>-<timestamp>>``.

    Two runs may ask for the same folder at once, so claiming is atomic: ``mkdir`` without
    ``exist_ok``, then a marker file ``.fedse-run`` created with ``O_CREAT | O_EXCL``. An existing
    EMPTY folder named by ``output.name`` (made by hand or by a job scheduler) is still accepted,
    since refusing it would break such set-ups, but only through the marker: between its emptiness
    check and its first file another run could take the same folder, and ``O_EXCL`` lets exactly one
    of them win. The run that made the folder creates the marker too, so it races on the marker
    with any run that found the folder empty. The marker stays (it names the claiming process), so
    a claimed folder is never empty again. A timestamped name already taken gets a suffix ``-2``,
    ``-3``, ...; a taken ``output.name`` is a FileExistsError naming the folder. Any other OSError
    (output.dir under a file, not writable) propagates, with nothing left behind.
    """
    import errno

    marker = ".fedse-run"
    parent = Path(cfg.output.dir)
    if parent.exists() and not parent.is_dir():  # else mkdir(exist_ok=True) says "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    parent.mkdir(parents=True, exist_ok=True)
    named = cfg.output.name is not None
    if named:
        names = [cfg.output.name]
    else:
        stem = f"{config_name}-{time.strftime('%Y%m%d-%H%M%S')}"
        names = [stem] + [f"{stem}-{i}" for i in range(2, 100)]
    for name in names:
        run_dir = parent / name
        made = False
        try:
            run_dir.mkdir()
            made = True
        except FileExistsError:
            if not named:
                continue
            if not run_dir.is_dir():
                raise FileExistsError(f"run folder {str(run_dir)!r} exists and is not a folder; "
                                      "choose another output.name or remove it") from None
            if any(run_dir.iterdir()):
                raise FileExistsError(f"run folder {str(run_dir)!r} already exists and is not empty; "
                                      "choose another output.name or remove it") from None
        try:
            fd = os.open(run_dir / marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            if not named:
                continue
            raise FileExistsError(f"run folder {str(run_dir)!r} was claimed by another run at the same time; "
                                  "choose another output.name") from None
        except OSError:
            if made:
                run_dir.rmdir()
            raise
        with os.fdopen(fd, "w") as f:
            f.write(f"claimed by pid {os.getpid()} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        return run_dir
    raise FileExistsError(f"run folders {str(parent / names[0])!r} to '-{len(names)}' all exist; "
                          "set output.name or remove some")


def claim_run_dir(cfg: Config, config_name: str) -> tuple[Path, bool]:
    """:func:`make_run_dir`, with whether the folder existed (empty) before; an unwritable
    output.dir is a ConfigError naming it."""
    named = Path(cfg.output.dir) / cfg.output.name if cfg.output.name else None
    existed = named is not None and named.is_dir()
    try:
        return make_run_dir(cfg, config_name), existed
    except FileExistsError:
        raise
    except OSError as err:
        detail = err.strerror or str(err)
        where = f" ({err.filename})" if err.filename and str(err.filename) != cfg.output.dir else ""
        raise ConfigError(f"config key 'output.dir': cannot create a run folder under {cfg.output.dir!r}: "
                          f"{detail}{where}; allowed: a directory this user can create and write to") from None


def discard_unstarted(run_dir: Path, existed: bool) -> None:
    """Remove what a run that failed before its first checkpoint wrote (a run with a checkpoint is
    kept: it can be resumed); a folder that existed before the run is emptied, not removed."""
    if (run_dir / CHECKPOINT).exists():
        return
    if not existed:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for child in run_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def write_partition(fed: FederatedData, run_dir: Path) -> None:
    counts = fed.label_counts()
    atomic_write_json(run_dir / "label_counts.json", {
        "classes": list(fed.dataset.classes),
        "train": fed.label_counts("train").tolist(),
        "test": fed.label_counts("test").tolist(),
    })
    plot_label_counts(counts, run_dir / "label_distribution.png", class_names=list(fed.dataset.classes),
                      title=f"{fed.dataset.name}: samples per client and class")


class _Progress:
    """One line per round, with a rich progress bar where a terminal is attached."""

    def __init__(self, rounds: int, quiet: bool) -> None:
        self.rounds, self.quiet, self.bar = rounds, quiet, None
        if not quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TextColumn

            self.bar = Progress(TextColumn("rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
            self.task = self.bar.add_task("rounds", total=rounds)

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, server_round: int, run_log: RunLog) -> None:
        row = round_rows(run_log)[-1]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        text = (f"round {server_round}/{self.rounds}  clients {row['clients']}  loss {fmt(row['train_loss'])}  "
                f"pers-acc {fmt(row['local_acc_mean'])}  pooled {fmt(row['pooled_acc_mean'])}  "
                f"{row['seconds']:.1f}s" + (f"  eps {row['epsilon']:.3f}" if row["epsilon"] is not None else "")
                + ("  no update (DP: reply count)" if row["refused"] else "")
                + (f"  dropped {row['dropped']}" if row["dropped"] else "")
                + (f"  failed {row['failed']}" if row["failed"] else ""))
        if self.bar is not None:
            self.bar.console.print(text)
            self.bar.advance(self.task)
        else:
            log.info(text)


def simulate(cfg: Config, *, config_name: str = "run", run_dir: Path | None = None, quiet: bool = False,
             verbose: bool = False, clients: int | None = None, resume: bool = False,
             num_supernodes: int | None = None) -> SimulationResult:
    """Run the whole simulation described by ``cfg``; write the run folder.

    ``clients``: how many of the partitions take part (the first ones; default all),
    so the others can be held out as new clients. ``resume``: continue the run in ``run_dir``
    from its last checkpoint. ``num_supernodes``: virtual nodes to start (default ``clients``;
    another number is refused by the server before round 1, as under ``flwr run``).
    A run that fails before its first round leaves no run folder behind."""
    started = time.perf_counter()
    fed = build_federated_data(cfg)
    claimed = run_dir is None
    existed = False
    if claimed:
        run_dir, existed = claim_run_dir(cfg, config_name)
    try:
        outcome = _run(cfg, fed, run_dir, quiet=quiet, verbose=verbose, clients=clients, resume=resume,
                       num_supernodes=num_supernodes)
    except BaseException:
        if claimed:
            discard_unstarted(run_dir, existed)
        raise
    if not quiet:
        print(final_tables(outcome.log))
        if outcome.summary.get("privacy", {}).get("mode", "none") != "none":
            print(f"\nprivacy: {outcome.summary['privacy']}")
        print(f"\nrun folder: {run_dir}")
    return SimulationResult(run_dir, outcome, time.perf_counter() - started)


def _run(cfg: Config, fed: FederatedData, run_dir: Path, *, quiet: bool, verbose: bool, clients: int | None,
         resume: bool, num_supernodes: int | None) -> ServerOutcome:
    write_partition(fed, run_dir)
    holder: dict[str, Any] = {}
    server_app = ServerApp()

    with _Progress(cfg.server.rounds, quiet) as progress:

        @server_app.main()
        def _main(grid: Grid, context: Context) -> None:
            try:
                holder["outcome"] = run_server(grid, cfg, fed, run_dir, on_round=progress, num_clients=clients,
                                               resume=resume)
            except Exception as err:  # re-raised in this process after the engine stopped
                holder["error"] = err

        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        if not verbose:  # Flower's INFO lines and its run_simulation deprecation notice
            flwr_logger.setLevel(logging.ERROR)
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # Ray's FutureWarning
        try:
            run_simulation(
                server_app=server_app,
                client_app=make_client_app(),
                num_supernodes=num_supernodes or clients or cfg.partition.num_clients,
                backend_config=backend_config(cfg, verbose),
                verbose_logging=verbose,
            )
        finally:
            flwr_logger.setLevel(level)
    if "error" in holder:
        raise holder["error"]
    if "outcome" not in holder:
        raise RuntimeError("the simulation ended without a result from the ServerApp; rerun with --verbose")
    return holder["outcome"]
