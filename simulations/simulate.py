"""Run a fedse simulation from Python or the shell (same as ``fedse simulate``).

    python -m simulations.simulate --config configs/quickstart.yaml --set server.rounds=3
"""

import sys

from fedse.cli import main

if __name__ == "__main__":
    sys.exit(main(["simulate", *sys.argv[1:]]))
