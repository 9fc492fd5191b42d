"""fedse: federated personalization with private squeeze-and-excitation.

A Flower server aggregates a shared SE-ResNet backbone; every client keeps its
excitation MLPs private. See README.md.
"""

import os

# Flower reports usage events over the network from a background thread (60 s
# timeout each); offline, those requests hold the process at exit and send
# traffic off the machine. fedse leaves them off unless the user opts in.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

__version__ = "0.1.0"
