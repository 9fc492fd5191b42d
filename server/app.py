"""fedse ServerApp: ``flwr run .`` loads ``server.app:app``.

Run config (``pyproject.toml`` ``[tool.flwr.app.config]`` or ``flwr run . --run-config``):

* ``config-file``: YAML file, relative to the project root (default ``configs/quickstart.yaml``);
* ``overrides``: space-separated ``key=value`` overrides (``"server.rounds=3 partition.alpha=0.1"``);
* ``output-dir``: parent of the run folder (default ``runs``); pass an ABSOLUTE path: a relative one is
  resolved against the app's root, which under ``flwr run`` is Flower's installed copy of the app
  (``~/.flwr/apps/...``), not the directory you ran from (see :func:`resolve_output_dir`);
* ``resume-from``: a run folder to continue from its last checkpoint (``config.yaml`` plus ``overrides``), found alike.

The strategy, guard and report live in :mod:`fedse.federation.server` and :mod:`fedse.federation.strategy`.
The server reads no data: the model's shape comes from the config, and the clients' label counts
are never collected (each client's prior stays with it).

A fedse error is one line, ``fedse: error: ...``, and fails the run (``finished:failed`` in ``flwr ls``);
``flwr run`` still exits 0: Flower 1.42's CLI never reads a run's status (``flwr/cli/run/run.py``).
"""

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedse.checkpoint import CheckpointError
from fedse.config import RECORD, ConfigError, load_config
from fedse.data.partition import PartitionError
from fedse.data.readers import DatasetError
from fedse.federation.server import final_tables, run_server
from fedse.rundir import claim_run_dir, discard_unstarted
from fedse.spec import resolve

ROOT = Path(__file__).resolve().parents[1]
# fedse's own errors, as `fedse simulate` reports them; anything else is a bug and keeps its traceback.
FEDSE_ERRORS = (ConfigError, CheckpointError, DatasetError, PartitionError, OSError)
log = logging.getLogger("fedse")

app = ServerApp()


class RunFailed(Exception):
    """A fedse error, printed in one line; raised so that Flower marks the run failed."""


def _hide_reported_traceback(record: logging.LogRecord) -> bool:
    # Flower logs a ServerApp's exception with its traceback (simulation/app.py, run_serverapp.py); not ours.
    if record.exc_info and isinstance(record.exc_info[1], RunFailed):
        record.exc_info = record.exc_text = None
    return True


logging.getLogger("flwr").addFilter(_hide_reported_traceback)


def resolve_output_dir(value: str, app_root: Path) -> Path:
    """The absolute directory a run-config path (``output-dir``, ``resume-from``) names.

    An absolute path (``~`` expanded) is kept; a relative one is resolved against ``app_root``, not
    the directory ``flwr run .`` ran in: Flower 1.42's CLI sends the SuperLink only the FAB (the app's
    files), the run config and the federation (``StartRunRequest`` in ``flwr/cli/run/run.py``), and
    the ServerApp runs where the SuperLink runs (with its working directory, possibly on another
    machine), from the app's installed copy under ``~/.flwr/apps/``. It prints the absolute run folder.
    """
    path = Path(value).expanduser()
    return Path(os.path.abspath(path if path.is_absolute() else app_root / path))


def _say(text: str) -> None:
    # Printed, as the final tables are: Flower streams the ServerApp's output to `flwr run --stream`.
    print(text, flush=True)


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        _main(grid, context)
    except FEDSE_ERRORS as err:
        message = " ".join(str(err).split())  # one line (library messages can span lines)
        print(f"fedse: error: {message}", file=sys.stderr, flush=True)
        raise RunFailed(message) from None


def _main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    overrides = str(rc["overrides"]).split()
    resume = str(rc["resume-from"])
    if resume:
        run_dir = resolve_output_dir(resume, ROOT)
        cfg = resolve(load_config(run_dir / RECORD, overrides, record=True)).cfg  # every registry's rules
    else:
        config_file = Path(str(rc["config-file"]))
        cfg = resolve(load_config(config_file if config_file.is_absolute() else ROOT / config_file, overrides)).cfg
        given = str(rc["output-dir"]) or cfg.output.dir
        out = resolve_output_dir(given, ROOT)
        if not Path(given).expanduser().is_absolute():
            log.warning(
                "output-dir %r is relative: resolved against the app's root %s (under flwr run, Flower's "
                "installed copy of the app); pass an absolute path, e.g. --run-config "
                "\"output-dir='$PWD/runs'\"",
                given,
                ROOT,
            )
        cfg = replace(cfg, output=replace(cfg.output, dir=str(out)))
        run_dir, existed = claim_run_dir(cfg, config_file.stem)
    _say(f"run folder: {run_dir}" + (" (resumed)" if resume else ""))
    try:
        # The server holds no data: the model's shape comes from the config (fedse.data.federated.model_shape),
        # and no partition is written (it would describe data the server does not have).
        outcome = run_server(grid, cfg, None, run_dir, resume=bool(resume))
    except BaseException:
        if not resume:  # a run that failed before its first round leaves no folder behind
            discard_unstarted(run_dir, existed)
        raise
    print(final_tables(outcome.log))
    _say(f"run folder: {run_dir}")
