"""A small synchronous client for the policy server (`fmpolicy.serving.server`), and for any server
that speaks openpi's protocol (openpi's `WebsocketPolicyServer`).

    with PolicyClient("gpu-box", 8000, api_key="KEY") as client:
        client.metadata["chunk_size"]                        # sent by the server on connect
        chunk = client.infer_chunk({"observation.state": state})          # (H, A) numpy, robot units
        nxt = client.infer_chunk(obs, prev_chunk_left_over=chunk[s:], inference_delay=d)   # RTC

One connection, no reconnection: when the server goes away, the next call raises
`ServerConnectionError` and a new `PolicyClient` is needed. A request the server refuses (it answers
with a text frame) raises `ServerError` with the server's message, and the connection stays usable.
Calls from several threads are serialized (one request in flight per connection).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from fmpolicy.errors import FmPolicyError, InputError
from fmpolicy.serving.wire import packb, unpackb

# the server's optional request fields (fmpolicy.serving.server; LeRobot's names for RTC)
PREV_CHUNK = "prev_chunk_left_over"
INFERENCE_DELAY = "inference_delay"
EXECUTION_HORIZON = "execution_horizon"


class ServerError(FmPolicyError, RuntimeError):
    """The server answered a request with an error (a text frame); `server_message` holds its text
    (the error and the server-side traceback). The connection stays usable."""

    def __init__(self, uri: str, server_message: str):
        self.server_message = server_message
        lines = [line for line in server_message.strip().splitlines() if line.strip()]
        super().__init__(f"the policy server at {uri} refused the request: {lines[-1] if lines else '(no message)'}"
                         f"\n--- server message ---\n{server_message.rstrip()}")


class ServerConnectionError(FmPolicyError, ConnectionError):
    """The client could not connect (refused, wrong API key, timed out) or the connection is gone."""


class PolicyClient:
    """One websocket connection to a policy server; numpy in, numpy out (see the module docstring).

    host, port: the server (`ws://host:port`). api_key: sent as "Authorization: Api-Key <key>" when
    set. timeout: seconds to wait for the connection and for each reply (None: wait forever); a reply
    that times out closes the connection (a late reply would otherwise answer the next request).
    wait_s: how long to keep trying (every `retry_s`) while nothing answers at that address yet, e.g.
    a robot process started before the GPU server has loaded its policy (openpi's client waits the
    same way); 0 fails at once, `math.inf` waits forever. A refusal (HTTP 401) is never retried.
    """

    def __init__(self, host: str = "127.0.0.1", port: int | None = 8000, api_key: str | None = None,
                 timeout: float | None = 30.0, wait_s: float = 0.0, retry_s: float = 0.5):
        from websockets.exceptions import InvalidStatus
        from websockets.sync.client import connect

        for name, value in (("wait_s", wait_s), ("retry_s", retry_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise InputError(f"{name} = {value!r}: expected a number of seconds >= 0")
        self.uri = f"ws://{host}" if port is None else f"ws://{host}:{port}"
        self.timeout = timeout
        headers = {"Authorization": f"Api-Key {api_key}"} if api_key is not None else None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                # entered as a context manager: websockets >= 17.1 deprecates using it directly
                self._ws = connect(self.uri, compression=None, max_size=None, additional_headers=headers,
                                   open_timeout=timeout).__enter__()
                break
            except InvalidStatus as e:
                status = e.response.status_code
                hint = " (missing or wrong API key: pass api_key=...)" if status == 401 else ""
                raise ServerConnectionError(f"the policy server at {self.uri} refused the connection with HTTP "
                                            f"{status}{hint}") from e
            except (OSError, TimeoutError) as e:
                if time.monotonic() + retry_s > deadline:
                    waited = f" (kept trying for {wait_s} s)" if wait_s else " (wait_s=... keeps trying)"
                    raise ServerConnectionError(f"cannot connect to a policy server at {self.uri}: {e}{waited}") from e
                time.sleep(retry_s)
        self._lock = threading.Lock()
        try:
            self.metadata: dict = self._receive()  # the server speaks first: its metadata
        except BaseException:
            self._ws.close()
            raise

    def _receive(self) -> Any:
        from websockets.exceptions import ConnectionClosed

        try:
            message = self._ws.recv(timeout=self.timeout)
        except TimeoutError as e:
            self._ws.close()
            raise ServerConnectionError(f"the policy server at {self.uri} sent nothing for {self.timeout} s; "
                                        "the connection is closed (make a new PolicyClient)") from e
        except ConnectionClosed as e:
            raise ServerConnectionError(f"the connection to the policy server at {self.uri} is closed ({e}); "
                                        "make a new PolicyClient") from e
        if isinstance(message, str):
            raise ServerError(self.uri, message)
        return unpackb(message)

    def infer(self, obs: Mapping[str, Any]) -> dict:
        """Send one observation dict (numpy arrays, strings; openpi's or our key names, and the server's
        optional fields such as "seed"); -> the server's reply: {"actions": (H, A) or (b, H, A) float32
        in robot units (read-only), "server_timing": {...}}."""
        from websockets.exceptions import ConnectionClosed

        if not isinstance(obs, Mapping):
            raise InputError(f"obs is a {type(obs).__name__}: expected a dict of observation entries")
        data = packb(dict(obs))
        with self._lock:
            try:
                self._ws.send(data)
            except ConnectionClosed as e:
                raise ServerConnectionError(f"the connection to the policy server at {self.uri} is closed ({e}); "
                                            "make a new PolicyClient") from e
            reply = self._receive()
        if not isinstance(reply, dict) or "actions" not in reply:
            raise ServerError(self.uri, f"a reply without 'actions': {reply!r:.200}")
        return reply

    def infer_chunk(self, obs: Mapping[str, Any], prev_chunk_left_over: np.ndarray | None = None,
                    inference_delay: int = 0, execution_horizon: int | None = None) -> np.ndarray:
        """The next action chunk, (H, A) float32 in robot units ((b, H, A) for a batched observation).

        With `prev_chunk_left_over` ((n, A) or (b, n, A): the current chunk's actions from the moment of
        this request on) the server samples it with real-time chunking: its first `inference_delay`
        positions (the actions executed while it computes) are pulled to those actions, and the
        guidance fades out over the first `execution_horizon` positions (default n). Position j of the
        result is planned for the control step of this request + j, like `prev_chunk_left_over[j]`."""
        request = dict(obs)
        if prev_chunk_left_over is None:
            if inference_delay or execution_horizon is not None:
                raise InputError(f"inference_delay = {inference_delay!r}, execution_horizon = {execution_horizon!r} "
                                 "without prev_chunk_left_over: real-time chunking continues a previous chunk")
        else:
            request[PREV_CHUNK] = np.asarray(prev_chunk_left_over, dtype=np.float32)
            request[INFERENCE_DELAY] = int(inference_delay)
            if execution_horizon is not None:
                request[EXECUTION_HORIZON] = int(execution_horizon)
        return np.array(self.infer(request)["actions"])  # a writable copy of the read-only reply

    def close(self) -> None:
        self._ws.close()

    def __enter__(self) -> "PolicyClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["PolicyClient", "ServerConnectionError", "ServerError"]
