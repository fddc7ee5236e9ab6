"""Control-time serving: a websocket policy server that openpi's client speaks to, and a small client
for it (needs the `serve` extra: websockets, msgpack)."""

from fmpolicy.serving.client import PolicyClient, ServerConnectionError, ServerError
from fmpolicy.serving.record import read_records
from fmpolicy.serving.server import DEFAULT_KEY_MAP, ObservationAdapter, PolicyServer, Request, ServerConfig
from fmpolicy.serving.wire import packb, unpackb

__all__ = ["DEFAULT_KEY_MAP", "ObservationAdapter", "PolicyClient", "PolicyServer", "Request", "ServerConfig",
           "ServerConnectionError", "ServerError", "packb", "read_records", "unpackb"]
