"""A websocket policy server that speaks openpi's protocol, so `openpi-client` (and its
`ActionChunkBroker`) drive an fmpolicy policy unchanged.

The protocol (openpi's `WebsocketPolicyServer` / `WebsocketClientPolicy`):
1. the client connects (optionally with the header `Authorization: Api-Key <key>`);
2. the server sends one binary msgpack frame: its metadata (a dict);
3. each request is one binary msgpack frame holding the observation dict (numpy arrays as in
   `fmpolicy.serving.wire`); the reply is one binary frame {"actions": (H, A) float32 in robot units,
   "server_timing": {"infer_ms", "total_ms", "prev_total_ms"}};
4. a request that fails gets a *text* frame with the error and its traceback, and the connection
   stays usable: a bad request never kills the server or the other clients.

Client keys are mapped to ours by `ServerConfig.key_map` (openpi's `observation/state` ->
`observation.state`, `prompt` -> `task`, `observation/image` -> the policy's first camera, ...); keys
already in our names pass through, and keys the policy does not use are ignored. Images may come as
HWC or CHW, uint8 or float in [0, 1]; they reach the policy as float32 (3, H, W) in [0, 1]. An
unbatched observation (state (s,)) gets actions (H, A); a batched one (state (b, s)) gets (b, H, A).

Requests are served in the order they arrive, one inference at a time (one policy, one device), on a
worker thread: the event loop keeps accepting connections and sending metadata meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import numpy as np
import torch

from fmpolicy import __version__
from fmpolicy.batch import STATE, TASK
from fmpolicy.errors import ConfigError, InputError
from fmpolicy.serving.wire import packb, unpackb

# openpi's client keys (its LIBERO / DROID / ALOHA examples) -> ours; "{camera0}" / "{camera1}" stand
# for the policy's first and second camera keys
DEFAULT_KEY_MAP = {
    "observation/state": STATE,
    "state": STATE,
    "prompt": TASK,
    "observation/image": "{camera0}",
    "image": "{camera0}",
    "observation/wrist_image": "{camera1}",
    "wrist_image": "{camera1}",
}


@dataclass(frozen=True)
class ServerConfig:
    """Where and how the policy is served."""

    host: str = "127.0.0.1"  # interface to bind: localhost only unless you open it on purpose ("0.0.0.0")
    port: int = 8000  # TCP port; 0 = any free port (the bound one is `PolicyServer.port`)
    api_key: str | None = None  # when set, clients must send "Authorization: Api-Key <key>"
    key_map: dict = field(default_factory=lambda: dict(DEFAULT_KEY_MAP))  # client key -> our key

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"ServerConfig.port = {self.port!r} is invalid: expected an int in [0, 65535]")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError(f"ServerConfig.api_key = {self.api_key!r} is invalid: expected a non-empty string or None")
        if not isinstance(self.key_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in self.key_map.items()):
            raise ConfigError(f"ServerConfig.key_map = {self.key_map!r} is invalid: expected {{client key: our key}} "
                              "strings")


class ObservationAdapter:
    """Client observation dict (numpy, openpi's names) -> the policy's batch (torch, our names)."""

    def __init__(self, policy, key_map: Mapping[str, str]):
        encoder = policy.config.encoder
        self.cameras = list(encoder.cameras) if encoder.kind != "none" else []
        slots = {f"{{camera{i}}}": cam for i, cam in enumerate(self.cameras)}
        # a camera placeholder the policy has no camera for is dropped (the key is then ignored)
        self.key_map = {k: slots.get(v, v) for k, v in key_map.items() if not v.startswith("{camera") or v in slots}
        self.device = policy.device

    def __call__(self, obs: Any) -> tuple[dict[str, Any], bool]:
        """-> (batch, batched): `batched` is False when the client sent one observation."""
        if not isinstance(obs, dict):
            raise InputError(f"the request holds a {type(obs).__name__}: expected a dict of observation entries")
        mapped: dict[str, Any] = {}
        for key, value in obs.items():
            key = key.decode() if isinstance(key, bytes) else str(key)
            ours = self.key_map.get(key, key)
            if ours in mapped:
                raise InputError(f"the request gives {ours!r} twice (once as {key!r}): expected one of them")
            mapped[ours] = value
        if STATE not in mapped:
            raise InputError(f"the request has no state: expected {STATE!r} or a key mapped to it "
                             f"({sorted(k for k, v in self.key_map.items() if v == STATE)}); got {sorted(obs)}")
        state = _array(mapped[STATE], STATE)
        if state.ndim not in (1, 2):
            raise InputError(f"{STATE!r} has shape {state.shape}: expected (s,) or (b, s)")
        batched = state.ndim == 2
        batch: dict[str, Any] = {STATE: torch.as_tensor(state if batched else state[None], dtype=torch.float32,
                                                         device=self.device)}
        b = batch[STATE].shape[0]
        for cam in self.cameras:
            if cam in mapped:
                batch[cam] = self._image(mapped[cam], cam, batched)
        if TASK in mapped:
            task = mapped[TASK]
            tasks = [task] * b if isinstance(task, (str, bytes, np.str_)) else list(task)
            batch[TASK] = [t.decode() if isinstance(t, bytes) else str(t) for t in tasks]
        for key in ("embodiment", "observation.prefix", "observation.prefix_mask"):
            if key in mapped:
                value = mapped[key]
                batch[key] = value if isinstance(value, str) else torch.as_tensor(np.array(value), device=self.device)
        return batch, batched

    def _image(self, value: Any, key: str, batched: bool) -> torch.Tensor:
        img = _array(value, key)
        if img.ndim != (4 if batched else 3):
            raise InputError(f"{key!r} has shape {img.shape}: expected {'(b, H, W, 3)' if batched else '(H, W, 3)'} "
                             "or channels first")
        if not batched:
            img = img[None]
        if img.shape[-1] == 3 and img.shape[1] != 3:  # HWC -> CHW
            img = img.transpose(0, 3, 1, 2)
        if img.shape[1] != 3:
            raise InputError(f"{key!r} has shape {img.shape}: expected 3 colour channels")
        x = torch.as_tensor(np.ascontiguousarray(img), device=self.device)
        if x.dtype == torch.uint8:
            return x.float() / 255.0
        if not x.is_floating_point():
            raise InputError(f"{key!r} has dtype {img.dtype}: expected uint8 or float in [0, 1]")
        return x.float()


def _array(value: Any, key: str) -> np.ndarray:
    arr = np.array(value)  # a copy: arrays decoded from a message are read-only views of it
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{key!r} has dtype {arr.dtype}: expected numbers")
    return arr


class PolicyServer:
    """Serves `policy` (a `FlowPolicy`) over websockets; see the module docstring.

    `start()` runs the server on a background thread and returns once it listens (`self.port`);
    `serve_forever()` (starting it when needed) blocks until Ctrl-C or `stop()`.
    """

    def __init__(self, policy, config: ServerConfig | None = None, sampler=None):
        self.policy = policy.eval()
        self.config = config or ServerConfig()
        self.sampler = sampler  # a SamplerConfig overriding the policy's own, or None
        self.adapter = ObservationAdapter(policy, self.config.key_map)
        self.metadata = {
            "server": "fmpolicy", "fmpolicy_version": __version__,
            "chunk_size": policy.config.chunk_size, "n_action_steps": policy.config.n_action_steps,
            "action_dim": policy.config.action_dim, "state_dim": policy.config.state_dim,
            "cameras": self.adapter.cameras, "key_map": self.adapter.key_map,
            "embodiments": list(policy.embodiments.names),
        }
        self.port: int | None = None
        self._lock = threading.Lock()  # one inference at a time
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Future | None = None

    # ---- one request ----
    def infer(self, obs: Any) -> dict[str, Any]:
        """The reply to one decoded request (also usable without a network)."""
        batch, batched = self.adapter(obs)
        with self._lock, torch.no_grad():
            start = time.perf_counter()
            actions = self.policy.predict_action_chunk(batch, sampler=self.sampler)
            if actions.is_cuda:
                torch.cuda.synchronize(actions.device)
            infer_ms = 1000 * (time.perf_counter() - start)
        actions = actions.float().cpu().numpy()
        return {"actions": actions if batched else actions[0], "server_timing": {"infer_ms": infer_ms}}

    # ---- the websocket side ----
    async def _handle(self, websocket) -> None:
        from websockets.exceptions import ConnectionClosed

        try:
            await self._serve_connection(websocket)
        except ConnectionClosed:  # the client went away (closed, or its process ended): nothing to answer
            pass

    async def _serve_connection(self, websocket) -> None:
        await websocket.send(packb(self.metadata))
        prev_total_ms = None
        async for message in websocket:
            start = time.perf_counter()
            try:
                if isinstance(message, str):
                    raise InputError("the request is a text frame: expected one binary msgpack frame (openpi-client)")
                try:
                    obs = unpackb(message)
                except Exception as e:  # noqa: BLE001 (any malformed payload)
                    raise InputError(f"the request is not a msgpack observation dict: {e}") from e
                reply = await asyncio.to_thread(self.infer, obs)
                reply["server_timing"]["total_ms"] = 1000 * (time.perf_counter() - start)
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                await websocket.send(packb(reply))
                prev_total_ms = 1000 * (time.perf_counter() - start)
            except Exception:  # noqa: BLE001 (the client gets it; the server goes on)
                await websocket.send(traceback.format_exc())

    def _check_api_key(self, connection, request):
        if self.config.api_key is None:
            return None
        if request.headers.get("Authorization") != f"Api-Key {self.config.api_key}":
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send the header "
                                      "'Authorization: Api-Key <key>'\n")
        return None

    async def _serve(self, ready: threading.Event | None = None) -> None:
        from websockets.asyncio.server import serve

        self._stop = asyncio.get_running_loop().create_future()
        async with serve(self._handle, self.config.host, self.config.port, compression=None, max_size=None,
                         process_request=self._check_api_key) as server:
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set()
            await self._stop

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C) or `stop()`; `start()` first to learn the bound port."""
        if self._thread is None:
            self.start()
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            self.stop()

    def start(self, timeout: float = 30.0) -> "PolicyServer":
        """Serve on a background thread; returns once the port is bound (`self.port`)."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            try:
                self._loop.run_until_complete(self._serve(ready))
            except BaseException as e:  # noqa: BLE001 (reported to start())
                errors.append(e)
                ready.set()
            finally:
                self._loop.close()

        self._thread = threading.Thread(target=run, name="fmpolicy-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or errors:
            raise RuntimeError(f"the policy server did not start on {self.config.host}:{self.config.port}: "
                               f"{errors[0] if errors else 'timed out'}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        if self._thread is not None:
            self._thread.join(timeout=10)
