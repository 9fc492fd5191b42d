"""Command line: ``fedse simulate``, ``compare``, and deployment (``certs``, ``keygen``, ``server``, ``client``).

Examples::

    fedse simulate                                   # built-in defaults: digits, 10 clients
    fedse simulate --config configs/quickstart.yaml
    fedse simulate --config configs/fmnist_dir01.yaml --set server.rounds=2 --set partition.alpha=0.1
    fedse compare --config configs/quickstart.yaml --methods fedavg,fedper,fedse --seeds 0,1,2 --holdout 2
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import RECORD, ConfigError, load_config

__all__ = ["main"]


DEFAULT_METHODS = "fedavg,fedbn,fedper,local,fedse,fedse-la"


def _methods(text: str | None) -> list[str] | None:
    return None if text is None else [m.strip() for m in text.split(",") if m.strip()]


def _overrides(parser: argparse.ArgumentParser, text: str | None = None) -> None:
    """``--set KEY=VALUE``, repeatable: overrides of config keys (``text``: its help)."""
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=text)


def _simulate_arguments(sim: argparse.ArgumentParser) -> None:
    sim.add_argument("--config", type=Path, default=None, help="YAML file (default: built-in defaults)")
    _overrides(sim, "override one config key, e.g. --set partition.alpha=0.1 (repeatable)")
    sim.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help=f"continue RUN_DIR's run from its last checkpoint (its {RECORD}, plus --set)",
    )
    sim.add_argument(
        "--quiet", action="store_true", help="no progress display or tables: prints only the run folder's path"
    )
    sim.add_argument("--verbose", action="store_true", help="Flower's own INFO/DEBUG logs")


def _compare_arguments(cmp: argparse.ArgumentParser) -> None:
    cmp.add_argument("--config", type=Path, default=None, help="YAML file (default: built-in defaults)")
    _overrides(cmp)
    cmp.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated policies (default: {DEFAULT_METHODS}); with --merge or --budget: take only "
        "these methods from the folders",
    )
    cmp.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    cmp.add_argument("--holdout", type=int, default=0, help="keep the last K clients out of training (cold start)")
    cmp.add_argument("--out", type=Path, default=None, help="comparison folder (default: <output.dir>/compare-...)")
    cmp.add_argument(
        "--quiet",
        action="store_true",
        help="no progress display or table: prints only the comparison folder's path (with --budget and no "
        "--out, the table)",
    )
    cmp.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        metavar="DIR",
        help="instead of running: combine comparison folders measured under the same config "
        "(other methods or seeds) into --out",
    )
    cmp.add_argument(
        "--budget",
        type=Path,
        nargs="+",
        default=None,
        metavar="DIR",
        help="instead of running: one table of comparison folders measured under other local budgets "
        "(batch size, epochs, width): accuracy, rounds, seconds and upload to --target; with --out, "
        "also written there as budget.md and budget.csv",
    )
    cmp.add_argument(
        "--target",
        type=float,
        default=0.9,
        help="with --budget: the mean personalized accuracy whose round, seconds and upload are "
        "reported (default: %(default)s)",
    )


def _predict_arguments(prd: argparse.ArgumentParser) -> None:
    prd.add_argument(
        "model", type=Path, help="a run folder (with --client N), a deployed client's state dir, or a .fedse file"
    )
    prd.add_argument("--client", type=int, default=None, help="the client, in a run folder")
    source = prd.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--images",
        type=Path,
        help="a folder of PNG/JPEG images; in subfolders named after the model's classes, accuracy is reported",
    )
    source.add_argument(
        "--split", choices=["train", "test"], help="the client's own part of the run's dataset (run folders only)"
    )
    prd.add_argument("--out", type=Path, required=True, help="the CSV to write")


def _adapt_arguments(adp: argparse.ArgumentParser) -> None:
    adp.add_argument("run", type=Path, help=f"the finished run's folder ({RECORD}, shared_weights.pt)")
    adp.add_argument("--data-dir", type=Path, required=True, help="the client's own data (data.dataset's format)")
    adp.add_argument("--out", type=Path, required=True, help="where to write its model (.fedse)")
    _overrides(adp, "override a config key")


def _monitor_arguments(mon: argparse.ArgumentParser) -> None:
    mon.add_argument("run", type=Path, help="a finished simulation's run folder (with clients/)")
    mon.add_argument("--out", type=Path, default=None, help="where to write (default: RUN/monitor)")
    mon.add_argument("--max-other", type=int, default=1000, help="other clients' test images per client (sampled)")
    mon.add_argument("--seed", type=int, default=0)
    mon.add_argument("--quiet", action="store_true", help="no progress display or table: prints only the folder")


def _certs_arguments(crt: argparse.ArgumentParser) -> None:
    crt.add_argument("directory", type=Path)


def _keygen_arguments(key: argparse.ArgumentParser) -> None:
    key.add_argument("path", type=Path)


def _server_arguments(srv: argparse.ArgumentParser) -> None:
    srv.add_argument("--certs", type=Path, help="directory from 'fedse certs' (ca.crt, server.pem, server.key)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=9093)
    srv.add_argument("--database", type=Path, help="SuperLink state (registered nodes, runs); default in memory")
    srv.add_argument("--insecure", action="store_true", help="no TLS, no authentication (warned; testing only)")


def _client_arguments(cli: argparse.ArgumentParser) -> None:
    cli.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    cli.add_argument("--ca", type=Path, help="CA certificate the SuperLink's certificate is signed by")
    cli.add_argument("--key", type=Path, help="this node's private key (from fedse keygen)")
    cli.add_argument("--state-dir", type=Path, required=True, help="where this client's private state lives")
    cli.add_argument("--data-dir", type=Path, help="this client's own data (any supported on-disk format)")
    cli.add_argument("--client-id", type=int, help="this client's number in reports (with --data-dir)")
    cli.add_argument("--partition-id", type=int, help="demo: which partition of the run's dataset is this client's")
    cli.add_argument("--num-partitions", type=int)
    cli.add_argument("--port", type=int, default=9094, help="this SuperNode's local Runtime API port")
    cli.add_argument("--insecure", action="store_true", help="no TLS (warned; testing only)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedse", description="Federated personalization with private excitation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in _COMMANDS.items():
        command.arguments(sub.add_parser(name, help=command.help))
    return parser


def _exec(cmd: list[str]) -> int:
    """Replace this process with a Flower process (signals reach it directly)."""
    import os

    from .deployment.deploy import NO_RUNTIME_INSTALL

    os.execvpe(cmd[0], cmd, {**os.environ, **NO_RUNTIME_INSTALL})
    return 0  # not reached


def _certs(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .deployment.deploy import make_test_certs

    certs = make_test_certs(args.directory)
    print(f"CA {certs.ca}\nSuperLink certificate {certs.cert}\nkey {certs.key}")
    return 0


def _keygen(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .deployment.deploy import make_node_key

    print(make_node_key(args.path))
    return 0


def _server(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .deployment import deploy

    if args.certs is None and not args.insecure:
        raise ConfigError("fedse server needs --certs DIR (from 'fedse certs DIR') or an explicit --insecure")
    certs = (
        None
        if args.insecure
        else deploy.Certs(args.certs / "ca.crt", args.certs / "server.pem", args.certs / "server.key")
    )
    missing = [str(p) for p in (certs.ca, certs.cert, certs.key) if not p.is_file()] if certs else []
    if missing:
        raise ConfigError(
            f"--certs {args.certs}: missing {', '.join(missing)}; make them with 'fedse certs DIR' "
            "or put your CA certificate, server certificate and key there under these names"
        )
    cmd = deploy.superlink_command(certs=certs, host=args.host, port=args.port, database=args.database)
    # Before exec: the operator must see who can register nodes and start runs on this SuperLink.
    print(f"fedse: warning: {deploy.control_api_exposure(args.host, args.port)}", file=sys.stderr, flush=True)
    return _exec(cmd)


def _client(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .deployment.deploy import supernode_command

    if not args.insecure and (args.ca is None or args.key is None):
        raise ConfigError(
            "fedse client needs --ca and --key (TLS and SuperNode authentication) or an explicit --insecure"
        )
    from .records import NODE_CLIENT_ID, NODE_DATA_DIR, NODE_NUM_PARTITIONS, NODE_PARTITION_ID, NODE_STATE_DIR

    node: dict[str, str | int] = {NODE_STATE_DIR: str(args.state_dir.resolve())}
    if (args.data_dir is None) == (args.partition_id is None):
        raise ConfigError("fedse client needs exactly one of --data-dir DIR (its own data) or --partition-id N (demo)")
    if args.data_dir is not None:
        node[NODE_DATA_DIR] = str(args.data_dir.resolve())
        if args.client_id is not None:
            node[NODE_CLIENT_ID] = args.client_id
    else:
        node |= {
            NODE_PARTITION_ID: args.partition_id,
            NODE_NUM_PARTITIONS: args.num_partitions or args.partition_id + 1,
        }
    command = supernode_command(
        superlink=args.superlink,
        ca=None if args.insecure else args.ca,
        key=args.key,
        node_config=node,
        port=args.port,
    )
    return _exec(command)


def _run_folder(path: Path, message: str) -> None:
    """A ConfigError with ``message`` unless ``path`` is a run folder (it holds the run's record)."""
    if not (path / RECORD).is_file():
        raise ConfigError(message)


def _predict(args: argparse.Namespace, argv: list[str] | None) -> int:
    import torch

    from .data.readers import IMAGE_SUFFIXES, read_images
    from .personal import load_personalized, predict_csv

    loaded = load_personalized(args.model, args.client)
    labels = None
    if args.split is not None:
        from .data.federated import build_federated_data

        _run_folder(args.model, f"--split needs a run folder (with {RECORD}); {args.model} is not one")
        run_cfg = load_config(args.model / RECORD, record=True)
        shard = build_federated_data(run_cfg).shard(int(loaded.header["client"]))
        images, labels = (
            (shard.test_images, shard.test_labels) if args.split == "test" else (shard.train_images, shard.train_labels)
        )
        names = [f"{args.split}-{i}" for i in range(len(labels))]
    else:
        if not args.images.is_dir():
            raise FileNotFoundError(f"--images {args.images} is not a folder")
        files = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"--images {args.images}: no {'/'.join(IMAGE_SUFFIXES)} files there")
        images = read_images(files)
        names = [str(p.relative_to(args.images)) for p in files]
        if all(p.parent != args.images for p in files):  # class subfolders: the labels are known
            classes = loaded.classes
            unknown = sorted({p.parent.name for p in files} - set(classes))
            if unknown:
                raise ConfigError(f"--images: subfolders {unknown} are not among the model's classes {classes}")
            labels = torch.tensor([classes.index(p.parent.name) for p in files])
    accuracy = predict_csv(loaded, images, names, args.out, labels)
    print(f"{len(names)} images scored with {_whose(loaded.header.get('client'))} -> {args.out}")
    if accuracy is not None:
        print(f"accuracy {accuracy:.4f}")
    return 0


def _whose(client: int | None) -> str:
    """Whose model it is: a client of the run, or a new client's (``fedse adapt``: no client number)."""
    return "a new client's model (fedse adapt)" if client is None else f"client {client}'s model"


def _adapt(args: argparse.Namespace, argv: list[str] | None):  # noqa: ANN202 (PersonalizedModel, imported lazily)
    from .personal import adapt_new_client

    _run_folder(args.run, f"{args.run} is not a run folder (no {RECORD})")
    return adapt_new_client(args.run, args.data_dir, args.out, args.overrides)


def _adapted(args: argparse.Namespace, loaded) -> int:  # noqa: ANN001 (PersonalizedModel)
    h = loaded.header
    print(
        f"new client: {h['train_samples']} train / {h['test_samples']} test images, own test accuracy "
        f"{h['local_acc']:.4f} -> {args.out}"
    )
    return 0


def _monitor(args: argparse.Namespace, argv: list[str] | None) -> Path:
    from simulations.monitor import monitor

    _run_folder(args.run, f"{args.run} is not a run folder (no {RECORD})")
    out = args.out or args.run / "monitor"
    monitor(args.run, out, max_other=args.max_other, seed=args.seed, quiet=args.quiet)
    return out


def _monitored(args: argparse.Namespace, out: Path) -> int:
    if args.quiet:
        print(out, flush=True)
        return 0
    print((out / "table.md").read_text())
    print(f"monitor folder: {out}")
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated integers, got {text!r}") from None


def _fail(err: BaseException) -> int:
    """One line on stderr (library and torch messages can span lines), exit code 2."""
    print(f"fedse: error: {' '.join(str(err).split())}", file=sys.stderr)
    return 2


def _fail_as_is(err: BaseException) -> int:
    """The message as it is (a deployment tool's output may span lines), exit code 2."""
    print(f"fedse: error: {err}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _main(args, argv)
    except KeyboardInterrupt:  # Ctrl-C before a run's own handler (reading a config, importing)
        if args.command in ("simulate", "compare"):
            from .interrupt import RunStopped

            return _stopped(RunStopped(), args, argv)
        print("\nfedse: interrupted", file=sys.stderr)
        return 130


def _main(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The subcommand's work; what it raises of its ``errors`` is one message and exit code 2, a stopped
    run is its resume line (:func:`_stopped`). Then what it shows of its outcome."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = _COMMANDS[args.command]
    try:
        outcome = command.run(args, argv)
    except command.stops() as stop:  # evaluated only when something is raised: imported lazily
        return _stopped(stop, args, argv)
    except command.errors() as err:
        return command.fail(err)
    return command.show(args, outcome)


def _simulate_or_compare(args: argparse.Namespace, argv: list[str] | None) -> int:
    logging.getLogger("fedse").setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    resume = getattr(args, "resume", None)
    cfg = _run_config(args, resume)
    from .interrupt import stoppable

    name = args.config.stem if args.config else "default"
    with stoppable():
        return _run(args, cfg, name, resume, argv)


def _run_config(args: argparse.Namespace, resume: Path | None):  # noqa: ANN202 (Config, imported lazily)
    """The run's configuration: ``--config`` plus ``--set``; with ``--resume``, the run folder's
    record plus ``--set``. ``--config`` with ``--resume`` is taken as overrides of the record: what
    it changes is printed, and the resume's checks apply to it as to ``--set``. An imported split
    (``partition.scheme: file``) is pinned (:func:`fedse.data.split_import.pin_split`): by a new run,
    and by a resumed one whose record pinned it, so the checkpoint's configuration refuses another."""
    from .checkpoint import config_diff
    from .config import config_to_dict
    from .spec import resolve

    pin = resume is None  # a new run pins an imported split; a resumed one, where its record did
    if resume is None:
        cfg = load_config(args.config, args.overrides)
    elif not (resume / RECORD).is_file():
        raise ConfigError(f"--resume {resume}: no {RECORD} there; allowed: a folder fedse simulate made")
    else:
        cfg = load_config(resume / RECORD, args.overrides, record=True)
        pin = cfg.partition.split_sha256 is not None
        if args.config is not None:
            given = load_config(args.config, args.overrides)
            changes = config_diff(config_to_dict(cfg), config_to_dict(given))
            if changes:
                print(f"fedse: --config {args.config} changes {resume}'s record: {'; '.join(changes)}", file=sys.stderr)
            cfg = given
    resolve(cfg)  # every registry's rules, before anything starts
    if pin:
        from .data.split_import import pin_split

        cfg = pin_split(cfg)  # an imported split's digest and absolute path go into the run's record
    return cfg


def _stopped(stop, args: argparse.Namespace, argv: list[str] | None) -> int:  # noqa: ANN001 (RunStopped)
    """One line: what stopped, what is kept, the exact command that continues; the signal's exit code."""
    import shlex

    from .checkpoint import checkpoint_status
    from .interrupt import exit_code, exit_now

    if args.command == "simulate":
        folder = args.resume or stop.run_dir
        again = f"fedse simulate --resume {shlex.quote(str(folder))}" if folder else "the same command"
    else:
        words = list(argv if argv is not None else sys.argv[1:])
        if "--out" not in words and args.out is None and getattr(stop, "out", None) is not None:
            words += ["--out", str(stop.out)]
        again = "fedse " + shlex.join(words)
    status = checkpoint_status(stop.run_dir) if stop.run_dir else None
    kept = f"{stop.run_dir} keeps round {status[0]}" if status else "no round of the run in progress had completed"
    print(f"fedse: {stop}; {kept}. Continue with: {again}", file=sys.stderr, flush=True)
    if argv is None:  # this process is the command: end it now (fedse.interrupt.exit_now)
        exit_now(exit_code(stop.signum))
    return exit_code(stop.signum)


def _run(args: argparse.Namespace, cfg, name: str, resume: Path | None, argv: list[str] | None) -> int:  # noqa: ANN001
    if args.command == "simulate":
        from simulations.simulate import run

        result = run(cfg, config_name=name, resume=resume, quiet=args.quiet, verbose=args.verbose)
        if args.quiet:  # the one line a script needs: the run folder (resume's, when it had nothing to add)
            print(result.run_dir if result is not None else resume, flush=True)
        return 0
    return _compare(args, cfg, name, argv)


def _compare(args: argparse.Namespace, cfg, name: str, argv: list[str] | None) -> int:  # noqa: ANN001 (Config)
    import time

    from simulations.compare import compare

    from .analysis.comparison import budget_report, budget_table, merge, terminal_table, write_budget
    from .interrupt import RunStopped

    command = "fedse " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.budget:
        if args.merge:
            raise ConfigError("--budget and --merge: give one of them")
        if not 0 < args.target <= 1:
            raise ConfigError(f"--target {args.target}: allowed: an accuracy in (0, 1]")
        rows = budget_table(args.budget, args.target, _methods(args.methods))
        if not rows:
            raise ConfigError(f"--methods {args.methods}: in none of the folders {args.budget}")
        if args.out is None or not args.quiet:
            print(budget_report(rows, command))
        if args.out is not None:
            write_budget(rows, command, args.out)
            print(args.out / "budget.md" if args.quiet else f"budget table: {args.out / 'budget.md'}")
        return 0
    if args.merge:
        if args.out is None:
            raise ConfigError("--merge needs --out: the folder the combined comparison is written to")
        out = args.out
        summary = merge(args.merge, out, command=command, methods=_methods(args.methods))
    else:
        methods = _methods(args.methods or DEFAULT_METHODS)
        seeds = _int_list(args.seeds, "seeds")
        out = args.out or Path(cfg.output.dir) / f"compare-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            summary = compare(cfg, methods, seeds, out, holdout=args.holdout, command=command, quiet=args.quiet)
        except RunStopped as stop:
            stop.out = out  # the folder to continue in, named in the resume command
            raise
    if args.quiet:
        print(out, flush=True)
        return 0
    print(terminal_table(summary))  # the narrow table; table.md, table.csv and comparison.json hold all of it
    print(f"comparison folder: {out} (the full table: {out / 'table.md'})")
    return 0


# What each subcommand raises that is the user's to fix (imported only when something is raised).
def _deploy_errors() -> tuple[type[BaseException], ...]:
    return (ConfigError, FileExistsError, FileNotFoundError, RuntimeError)


def _model_errors() -> tuple[type[BaseException], ...]:
    """Reading a run folder, a client's model, its data or state."""
    from .data.readers import DatasetError
    from .state import StateCorruptError

    return (ConfigError, DatasetError, StateCorruptError, FileNotFoundError, ValueError, OSError)


def _run_errors() -> tuple[type[BaseException], ...]:
    """A run's configuration, data, partition, checkpoint; OSError: an unwritable --out and the like."""
    from .checkpoint import CheckpointError
    from .data.partition import PartitionError
    from .data.readers import DatasetError

    return (ConfigError, CheckpointError, DatasetError, PartitionError, OSError)


def _run_stops() -> tuple[type[BaseException], ...]:
    from .interrupt import RunStopped

    return (RunStopped,)


@dataclass(frozen=True)
class _Command:
    """A subcommand: its help line and arguments; ``run``, its work, under :func:`_main`'s error handling;
    ``show``, what it prints of ``run``'s outcome afterwards; ``stops``, what ends it as a stopped run."""

    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, list[str] | None], Any]
    errors: Callable[[], tuple[type[BaseException], ...]]
    fail: Callable[[BaseException], int] = _fail
    show: Callable[[argparse.Namespace, Any], int] = lambda args, code: code
    stops: Callable[[], tuple[type[BaseException], ...]] = lambda: ()


_COMMANDS: dict[str, _Command] = {  # in --help's order
    "simulate": _Command(
        "run a federated simulation on Flower's simulation engine",
        _simulate_arguments,
        _simulate_or_compare,
        _run_errors,
        stops=_run_stops,
    ),
    "compare": _Command(
        "run several methods under the identical partition and budget",
        _compare_arguments,
        _simulate_or_compare,
        _run_errors,
        stops=_run_stops,
    ),
    "predict": _Command(
        "score images with a client's personalized model: a CSV of labels and probabilities",
        _predict_arguments,
        _predict,
        _model_errors,
    ),
    "adapt": _Command(
        "a new client: fit its private part on a finished run's shared weights, from its own data",
        _adapt_arguments,
        _adapt,
        _model_errors,
        show=_adapted,
    ),
    "monitor": _Command(
        "each client's gate fingerprint against other clients' data and corrupted inputs (AUROC)",
        _monitor_arguments,
        _monitor,
        _model_errors,
        show=_monitored,
    ),
    "certs": _Command(
        "make a test certificate authority and a SuperLink certificate",
        _certs_arguments,
        _certs,
        _deploy_errors,
        fail=_fail_as_is,
    ),
    "keygen": _Command(
        "make a SuperNode key pair (register the .pub with flwr supernode register)",
        _keygen_arguments,
        _keygen,
        _deploy_errors,
        fail=_fail_as_is,
    ),
    "server": _Command(
        "start a SuperLink (TLS and SuperNode authentication on)",
        _server_arguments,
        _server,
        _deploy_errors,
        fail=_fail_as_is,
    ),
    "client": _Command(
        "start a SuperNode for one client", _client_arguments, _client, _deploy_errors, fail=_fail_as_is
    ),
}


if __name__ == "__main__":
    sys.exit(main())
