"""Run a federation of virtual clients on Flower's simulation engine (Ray backend).

``fedse simulate`` calls :func:`simulate`: the federation is built once here
(so a missing dataset fails before Ray starts), the label distribution is
plotted, then :func:`flwr.simulation.run_simulation` runs the ServerApp
(:func:`fedse.federation.server.run_server`, in this process) against one ClientApp per
virtual client (:func:`fedse.federation.client.make_client_app`, in Ray actors).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from .analysis.report import (
    COL_CLIENTS,
    COL_DROPPED,
    COL_EPSILON,
    COL_FAILED,
    COL_LOCAL_ACC_MEAN,
    COL_LOCAL_ACC_WEIGHTED,
    COL_POOLED_ACC_MEAN,
    COL_REFUSED,
    COL_SECONDS,
    COL_TRAIN_LOSS,
    RunLog,
    round_rows,
    write_record,
)
from .config import RECORD, Config
from .data.federated import FederatedData, build_federated_data
from .federation.client import make_client_app
from .federation.server import ServerOutcome, final_tables, format_privacy, run_server, setup_logging
from .interrupt import as_stop, clear_stop, stop_requested
from .rundir import claim_run_dir, discard_unstarted, write_partition
from .spec import resolve
from .state import PRIVATE_DIR

__all__ = ["SharedProgress", "SimulationResult", "backend_config", "epsilon_label", "progress_bar", "simulate"]

log = logging.getLogger("fedse")


@dataclass(frozen=True)
class SharedProgress:
    """A progress display another command started and shows (``fedse compare``'s
    :func:`progress_bar`), and the label of this run's lines and bar in it."""

    bar: Any
    label: str


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path | None
    outcome: ServerOutcome
    wall_seconds: float


def backend_config(cfg: Config, verbose: bool = False) -> dict[str, Any]:
    """Ray resources per virtual client and Ray's init arguments (Flower passes them to ``ray.init``).

    On a local Ray, a GPU fraction is asked for only where this machine has CUDA (Ray would wait
    forever for a GPU that is not there); on a cluster (``simulation.ray_address``) the cluster's
    nodes decide, so the configured fraction is asked for as is. Client failures reach the server as
    error replies (counted per round in the report), so actors' own logs go to the terminal only
    with ``verbose``."""
    sim = cfg.simulation
    gpus = sim.client_gpu_fraction if sim.ray_address is not None or torch.cuda.is_available() else 0.0
    init_args: dict[str, Any] = {
        "include_dashboard": False,
        "log_to_driver": verbose,
        "logging_level": "INFO" if verbose else "ERROR",
    }
    if sim.ray_address is not None:
        init_args["address"] = sim.ray_address
    return {"client_resources": {"num_cpus": sim.client_cpus, "num_gpus": gpus}, "init_args": init_args}


def progress_bar(console: Any = None) -> Any:  # noqa: ANN401 (rich's Console and Progress, imported lazily)
    """The progress display of ``fedse simulate`` and ``fedse compare``: one bar a task (its
    description, the bar, done/total, time elapsed), with the round lines printed above it
    (``console``: where, default the terminal)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    return Progress(*columns, console=console)


def epsilon_label(mode: str) -> str:
    """What a round line's epsilon is: the server's client-level accountant, or the largest of the
    cumulative epsilons this round's clients reported (sample level)."""
    return "eps(client-level)" if mode == "client" else "eps(sample-level, max over clients)"


class _Progress:
    """One line per round, with a rich progress bar where a terminal is attached; nothing when quiet.
    ``shared``: a display someone else shows (``fedse compare``'s), where this run adds its bar of
    rounds, its lines start with the shared label, and its bar is removed when the run ends."""

    def __init__(
        self, rounds: int, quiet: bool, *, privacy: str = "none", shared: SharedProgress | None = None
    ) -> None:
        self.rounds, self.privacy = rounds, privacy
        self.label = shared.label if shared is not None else ""
        self.owned = shared is None and not quiet
        self.bar = progress_bar() if self.owned else shared.bar if shared is not None else None
        if self.bar is not None:
            self.task = self.bar.add_task(self.label or "rounds", total=rounds)

    def __enter__(self) -> _Progress:
        if self.owned:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.owned:
            self.bar.stop()
        elif self.bar is not None:
            self.bar.remove_task(self.task)

    def __call__(self, server_round: int, run_log: RunLog) -> None:
        if self.bar is None:
            return
        row = round_rows(run_log)[-1]
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        text = (
            (f"{self.label}  " if self.label else "")
            + f"round {server_round}/{self.rounds}  clients {row[COL_CLIENTS]}  loss {fmt(row[COL_TRAIN_LOSS])}  "
            f"personalized mean {fmt(row[COL_LOCAL_ACC_MEAN])} weighted {fmt(row[COL_LOCAL_ACC_WEIGHTED])}  "
            + (f"pooled {fmt(row[COL_POOLED_ACC_MEAN])}  " if row[COL_POOLED_ACC_MEAN] is not None else "")
            + f"{row[COL_SECONDS]:.1f}s"
            + (f"  {epsilon_label(self.privacy)} {row[COL_EPSILON]:.3f}" if row[COL_EPSILON] is not None else "")
            + ("  no update (refused: see rounds.json)" if row[COL_REFUSED] else "")
            + (f"  dropped {row[COL_DROPPED]}" if row[COL_DROPPED] else "")
            + (f"  failed {row[COL_FAILED]}" if row[COL_FAILED] else "")
        )
        self.bar.console.print(text, soft_wrap=True)  # one line a round, in a log file too
        self.bar.advance(self.task)


def simulate(
    cfg: Config,
    *,
    config_name: str = "run",
    run_dir: Path | None = None,
    quiet: bool = False,
    verbose: bool = False,
    clients: int | None = None,
    resume: bool = False,
    num_supernodes: int | None = None,
    client_app_factory: Callable[..., ClientApp] = make_client_app,
    progress: SharedProgress | None = None,
) -> SimulationResult:
    """Run the whole simulation described by ``cfg``; write the run folder.

    ``clients``: how many of the partitions take part (the first ones; default all),
    so the others can be held out as new clients. ``resume``: continue the run in ``run_dir``
    from its last checkpoint. ``num_supernodes``: virtual nodes to start (default ``clients``;
    another number is refused by the server before round 1, as under ``flwr run``).
    ``progress``: a display already shown (``fedse compare``'s) to show this run's rounds in, each
    line starting with its label, even when ``quiet``. ``quiet``: nothing is printed (the
    caller prints what it needs of the result, e.g. its ``run_dir``).
    A run that fails before its first round leaves no run folder behind."""
    started = time.perf_counter()
    clear_stop()  # a stop asked of an earlier run in this process is not this run's
    resolve(cfg)  # every registry's rules, before anything starts
    fed = build_federated_data(cfg)
    claimed = run_dir is None
    existed = False
    try:
        if claimed:
            run_dir, existed = claim_run_dir(cfg, config_name)
            write_record(run_dir, cfg)  # the folder is resumable from here on
        outcome = _run(
            cfg,
            fed,
            run_dir,
            quiet=quiet,
            verbose=verbose,
            clients=clients,
            resume=resume,
            num_supernodes=num_supernodes,
            client_app_factory=client_app_factory,
            progress=progress,
        )
    except BaseException as err:
        if (stop := as_stop(err)) is not None:  # a pause: the folder stays, resumable (fedse.interrupt)
            stop.run_dir = run_dir if run_dir is not None and (run_dir / RECORD).is_file() else None
            raise stop from None
        if claimed and run_dir is not None:
            discard_unstarted(run_dir, existed)
        raise
    if not quiet:
        print(final_tables(outcome.log))
        if privacy := format_privacy(outcome.summary.get("privacy", {})):
            print(f"\n{privacy}")
        print(f"\nrun folder: {run_dir}")
    return SimulationResult(run_dir, outcome, time.perf_counter() - started)


def _run(
    cfg: Config,
    fed: FederatedData,
    run_dir: Path,
    *,
    quiet: bool,
    verbose: bool,
    clients: int | None,
    resume: bool,
    num_supernodes: int | None,
    client_app_factory: Callable[..., ClientApp],
    progress: SharedProgress | None,
) -> ServerOutcome:
    write_partition(fed, run_dir)
    holder: dict[str, Any] = {}
    server_app = ServerApp()
    setup_logging()  # one line per event: Flower's lines (--verbose) through its own handler only

    shown = _Progress(cfg.server.rounds, quiet, privacy=cfg.privacy.mode, shared=progress)
    with shown as rounds:

        @server_app.main()
        def _main(grid: Grid, context: Context) -> None:
            try:
                holder["outcome"] = run_server(
                    grid,
                    cfg,
                    fed,
                    run_dir,
                    on_round=rounds,
                    num_clients=clients,
                    resume=resume,
                    private_root=run_dir / PRIVATE_DIR,
                    show_privacy=False,  # printed after the tables (simulate)
                )
            except BaseException as err:  # noqa: BLE001 (re-raised in this process after the engine stopped)
                holder["error"] = err

        # Without --verbose, Flower's logger shows errors only: its INFO lines would interleave with the
        # progress bar, and its WARNINGs include the notice every run_simulation call logs (a log record
        # through flwr.supercore.logger.warn_deprecated_feature, not a DeprecationWarning): "DEPRECATED
        # FEATURE: The `run_simulation` function is deprecated and will be removed in a future version of
        # Flower. Please use `flwr run` in the CLI instead" (flwr/simulation/run_simulation.py). Flower 1.42
        # has no replacement that runs in this process: `flwr run` builds a FAB, hands it to a SuperLink and
        # runs the ServerApp it loads from the FAB in another process (flwr-simulation, through
        # run_simulation_process), so it can neither run this ServerApp (a closure over the federation built
        # above, the progress bar and `holder`) nor hand the ServerOutcome back here; start_simulation is
        # the older, also deprecated API, and _run_simulation is private. `flwr run` itself is supported as
        # its own path (server/app.py, clients/app.py). With --verbose the notice shows.
        flwr_logger = logging.getLogger("flwr")
        level = flwr_logger.level
        if not verbose:
            flwr_logger.setLevel(logging.ERROR)
        # A client with no GPU share must not see the GPU: Ray then hides CUDA from its actor, and
        # fedse.train picks the CPU. Ray does this today by default but warns that the default will
        # change; fedse asks for it explicitly (and Ray's FutureWarning about the default is moot).
        os.environ["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "1"
        warnings.filterwarnings("ignore", message=".*RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO.*", category=FutureWarning)
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app_factory(
                    run_dir if cfg.output.client_models else None, state_root=run_dir / PRIVATE_DIR
                ),
                num_supernodes=num_supernodes or clients or cfg.partition.num_clients,
                backend_config=backend_config(cfg, verbose),
                verbose_logging=verbose,
            )
        except BaseException as err:
            if (stop := as_stop(err)) is not None:  # Ctrl-C, SIGTERM (Ray's handler exits), RunStopped
                raise stop from None
            raise
        finally:
            if not stop_requested():  # after a stop, Flower's logger stays quiet while its threads end
                flwr_logger.setLevel(level)
    if "error" in holder:
        raise holder["error"]
    if "outcome" not in holder:
        raise RuntimeError("the simulation ended without a result from the ServerApp; rerun with --verbose")
    return holder["outcome"]
