"""fedse: federated personalization with private squeeze-and-excitation.

A Flower server aggregates a shared SE-ResNet backbone; every client keeps its
excitation MLPs private. See README.md.
"""

__version__ = "0.1.0"
