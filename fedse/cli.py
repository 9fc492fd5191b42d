"""Command line: ``fedse simulate`` and ``fedse compare``.

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
from pathlib import Path

from .config import ConfigError, load_config

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedse", description="Federated personalization with private excitation.")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federated simulation on Flower's simulation engine")
    sim.add_argument("--config", type=Path, default=None, help="YAML file (default: built-in defaults)")
    sim.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one config key, e.g. --set partition.alpha=0.1 (repeatable)")
    sim.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                     help="continue RUN_DIR's run from its last checkpoint (its config.yaml, plus --set)")
    sim.add_argument("--quiet", action="store_true", help="no progress display or tables")
    sim.add_argument("--verbose", action="store_true", help="Flower's own INFO/DEBUG logs")
    cmp = sub.add_parser("compare", help="run several methods under the identical partition and budget")
    cmp.add_argument("--config", type=Path, default=None, help="YAML file (default: built-in defaults)")
    cmp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cmp.add_argument("--methods", default="fedavg,fedbn,fedper,local,fedse",
                     help="comma-separated policies (default: %(default)s)")
    cmp.add_argument("--seeds", default="0", help="comma-separated seeds (default: %(default)s)")
    cmp.add_argument("--holdout", type=int, default=0, help="keep the last K clients out of training (cold start)")
    cmp.add_argument("--out", type=Path, default=None, help="comparison folder (default: <output.dir>/compare-...)")
    return parser


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated integers, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedse").setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    resume = getattr(args, "resume", None)
    try:
        if resume is not None and not (resume / "config.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no config.yaml there; is it a fedse run folder?")
        cfg = load_config(resume / "config.yaml" if resume else args.config, args.overrides)
    except ConfigError as err:
        print(f"fedse: error: {err}", file=sys.stderr)
        return 2
    from .data import DatasetError
    from .partition import PartitionError

    name = args.config.stem if args.config else "default"
    try:
        if args.command == "simulate":
            from .simulation import simulate

            simulate(cfg, config_name=name, quiet=args.quiet, verbose=args.verbose, run_dir=resume,
                     resume=resume is not None)
        elif args.command == "compare":
            import time

            from .compare import compare

            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            seeds = _int_list(args.seeds, "seeds")
            out = args.out or Path(cfg.output.dir) / f"compare-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
            compare(cfg, methods, seeds, out, holdout=args.holdout,
                              command="fedse " + " ".join(argv if argv is not None else sys.argv[1:]))
            print((out / "table.md").read_text())
            print(f"comparison folder: {out}")
    except (ConfigError, DatasetError, PartitionError, FileExistsError, FileNotFoundError) as err:
        print(f"fedse: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
