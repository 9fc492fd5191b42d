"""Run folders: claimed atomically, discarded when a run fails before its first round.

A run folder is ``output.dir/<output.name or <config>-<timestamp>>``; it holds
the run's configuration, its reports (:mod:`fedse.analysis.report`), its checkpoint
(:mod:`fedse.checkpoint`) and the partition it ran on (an imported split's digest: ``split.json``).
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from pathlib import Path

from .checkpoint import CHECKPOINT, checkpoint_status
from .config import RECORD, Config, ConfigError
from .data.federated import FederatedData
from .data.partition import plot_label_counts
from .data.split_import import record_split
from .io import atomic_write_json

__all__ = ["claim_run_dir", "discard_unstarted", "make_run_dir", "write_partition"]


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
                raise FileExistsError(
                    f"run folder {str(run_dir)!r} exists and is not a folder; choose another output.name or remove it"
                ) from None
            if _abandoned_claim(run_dir / marker):
                (run_dir / marker).unlink(missing_ok=True)
            if any(run_dir.iterdir()):
                raise FileExistsError(f"run folder {str(run_dir)!r} {_holds(run_dir)}") from None
        try:
            fd = os.open(run_dir / marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            if not named:
                continue
            raise FileExistsError(
                f"run folder {str(run_dir)!r} was claimed by another run at the same time; choose another output.name"
            ) from None
        except OSError:
            if made:
                run_dir.rmdir()
            raise
        with os.fdopen(fd, "w") as f:
            f.write(f"claimed by pid {os.getpid()} at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        return run_dir
    raise FileExistsError(
        f"run folders {str(parent / names[0])!r} to '-{len(names)}' all exist; set output.name or remove some"
    )


def _abandoned_claim(marker: Path) -> bool:
    """A folder holding nothing but a claim marker whose process is gone: a run killed between
    claiming its folder and writing its record. Nothing of it can be resumed, so the folder is
    free again."""
    folder = marker.parent
    if {p.name for p in folder.iterdir()} != {marker.name}:
        return False
    try:
        pid = int(marker.read_text().split()[3])
    except (OSError, ValueError, IndexError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _holds(run_dir: Path) -> str:
    """What an existing run folder holds, and what to do with it, for the refusal to reuse it."""
    if not (run_dir / RECORD).is_file():
        return "already exists and is not empty; choose another output.name or remove it"
    status = checkpoint_status(run_dir)
    state = (
        "a run stopped before its first round completed"
        if status is None
        else f"a run that finished its {status[0]} rounds"
        if status[1]
        else f"a run stopped after round {status[0]}"
    )
    return f"already holds {state}; continue it with: fedse simulate --resume {run_dir} (or choose another output.name)"


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
        raise ConfigError(
            f"config key 'output.dir': cannot create a run folder under {cfg.output.dir!r}: "
            f"{detail}{where}; allowed: a directory this user can create and write to"
        ) from None


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
    """The partition's label counts and their plot; for an imported split, ``split.json`` (its path,
    format, SHA-256 and part sizes), checked first against the one a resumed run's folder holds."""
    record_split(run_dir, fed.split, fed.train_parts, fed.test_parts)
    counts = fed.label_counts()
    atomic_write_json(
        run_dir / "label_counts.json",
        {
            "classes": list(fed.dataset.classes),
            "train": fed.label_counts("train").tolist(),
            "test": fed.label_counts("test").tolist(),
        },
    )
    plot_label_counts(
        counts,
        run_dir / "label_distribution.png",
        class_names=list(fed.dataset.classes),
        title=f"{fed.dataset.name}: samples per client and class",
    )
