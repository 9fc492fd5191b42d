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

__all__ = ["PersonalizedModel", "load_personalized"]


def __getattr__(name: str):  # PEP 562: `import fedse` stays light; the model API loads on first use
    if name in __all__:
        from . import personal

        return getattr(personal, name)
    raise AttributeError(f"module 'fedse' has no attribute {name!r}")
