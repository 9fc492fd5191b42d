"""fedse ClientApp: ``flwr run .`` and SuperNodes load ``clients.app:app``.

Receives the shared weights, restores this client's private excitation weights
from ``context.state``, trains, keeps them, replies with the shared keys only.
All logic lives in :mod:`fedse.federation.client`.
"""

from fedse.federation.client import make_client_app

app = make_client_app()
