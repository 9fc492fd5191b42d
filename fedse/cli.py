"""Command line: ``fedse simulate [--config FILE] [--set key=value ...]``.

Examples::

    fedse simulate                                   # built-in defaults: digits, 10 clients
    fedse simulate --config configs/quickstart.yaml
    fedse simulate --config configs/fmnist_dir01.yaml --set server.rounds=2 --set partition.alpha=0.1
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
    sim.add_argument("--quiet", action="store_true", help="no progress display or tables")
    sim.add_argument("--verbose", action="store_true", help="Flower's own INFO/DEBUG logs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"fedse: error: {err}", file=sys.stderr)
        return 2
    if args.command == "simulate":
        from .data import DatasetError
        from .partition import PartitionError
        from .simulation import simulate

        name = args.config.stem if args.config else "default"
        try:
            simulate(cfg, config_name=name, quiet=args.quiet, verbose=args.verbose)
        except (DatasetError, PartitionError, FileExistsError) as err:
            print(f"fedse: error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
