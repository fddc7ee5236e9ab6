"""A websocket policy server that speaks openpi's protocol, so `openpi-client` (and its
`ActionChunkBroker`) drive an fmpolicy policy unchanged.

The protocol (openpi's `WebsocketPolicyServer` / `WebsocketClientPolicy`):
1. the client connects (optionally with the header `Authorization: Api-Key <key>`);
2. the server sends one binary msgpack frame: its metadata (a dict);
3. each request is one binary msgpack frame holding the observation dict (numpy arrays as in
   `fmpolicy.serving.wire`); the reply is one binary frame {"actions": (H, A) float32 in robot units,
   "server_timing": {"infer_ms", "queue_ms", "decode_ms", "batch_size", "batch_requests", "total_ms",
   "prev_total_ms"}};
4. a request that fails gets a *text* frame with the error and its traceback, and the connection
   stays usable: a bad request never kills the server or the other clients.
An HTTP `GET /healthz` is answered 200 "OK" without opening a websocket (as openpi's server does).

Client keys are mapped to ours by `ServerConfig.key_map` (openpi's `observation/state` ->
`observation.state`, `prompt` -> `task`, `observation/image` -> the policy's first camera, ...); keys
already in our names pass through, and keys the policy does not use are ignored. Images may come as
HWC or CHW, uint8 or float in [0, 1]; they reach the policy as float32 (3, H, W) in [0, 1]. An
unbatched observation (state (s,)) gets actions (H, A); a batched one (state (b, s)) gets (b, H, A).
The reply's "server_timing" also holds "queue_ms" (arrival to the start of its inference), "decode_ms"
(the part of it spent unpacking and checking the request), "batch_size" (rows in that call) and
"batch_requests" (requests in it).

Batching: each request is checked on its own as it arrives (a bad one gets its error and nothing else
happens to it). Requests that wait while the policy is busy are stacked into one `predict_action_chunk`
call of at most `max_batch` rows when they are compatible; with `ServerConfig.batch_window_ms` > 0 the
oldest waiting request also waits up to that long past the moment the policy could take it (the
policy being idle then), for more requests to join, unless `max_batch` rows are already there or every
connected client has a request waiting (a connection sends its next request only after its reply, so
none can join then); clients that each wait for their reply before sending again otherwise settle into
taking turns. Compatible:
the same state width, the same cameras at the same image size, a task in all or none of them, and the
same RTC settings (different tasks, robots and seeds batch fine: the policy takes them per row).
Incompatible ones run in separate calls, oldest first. Each row gets its own noise (from the request's `seed` when it sends one, otherwise from
torch's global generator), so a batched result equals the unbatched one to float rounding when the
noise is fixed (`seed`), and is an equally likely sample otherwise. When a batched call raises (a
request that passed the checks but fails in the policy), its requests are run again one by one, so
only the faulty one gets an error. One policy call runs at a time (one policy, one device), off the
event loop, which keeps accepting connections and sending metadata meanwhile: on the thread that
calls `serve_forever()` (or `pump()`), otherwise on a worker thread. Where the calls run matters on
CPU: torch's OpenMP runtime (libgomp) keeps a pool of worker threads for every host thread that has
run a parallel region, and once the pools together hold more threads than there are cores it stops
letting its workers spin between regions, so every region pays for waking them (measured on 2 cores:
a small `nn.Linear` 25 -> 55-90 us, a policy call ~2x). The process that loaded the policy on its main
thread and serves from it keeps one pool; the event loop's own per-request work stays in numpy.
Requests are checked and kept on the host (the policy moves its inputs to its device in its call):
on a GPU, the event loop never waits for the call in flight.

Optional request fields (our names, not mapped):
- `seed` (int >= 0): the request's noise is drawn from `torch.Generator().manual_seed(seed)`:
  reproducible chunks, batched or not.
- Real-time chunking (`fmpolicy.rtc`, LeRobot's names): `prev_chunk_left_over` (n, a) in robot units
  ((b, n, a) for a batched request): the previous chunk's actions from the moment the request is
  sent on, n <= chunk_size; `inference_delay` (int d, default 0): how many of them run while this
  inference does (the committed prefix); `execution_horizon` (int, default n): how many leading
  positions are guided. With them the flow is integrated with RTC's guidance towards that prefix
  (`ServerConfig.rtc_max_guidance_weight`, `rtc_schedule`); without them the plain sampler runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import time
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import numpy as np
import torch

from fmpolicy import __version__
from fmpolicy.batch import STATE, TASK
from fmpolicy.embodiment import EMBODIMENT
from fmpolicy.errors import ConfigError, FmPolicyError, InputError
from fmpolicy.rtc import SCHEDULES
from fmpolicy.serving.record import Recorder
from fmpolicy.serving.wire import packb, unpackb

# optional request fields beyond the observation (see the module docstring)
SEED = "seed"
PREV_CHUNK = "prev_chunk_left_over"
INFERENCE_DELAY = "inference_delay"
EXECUTION_HORIZON = "execution_horizon"
REQUEST_FIELDS = (SEED, PREV_CHUNK, INFERENCE_DELAY, EXECUTION_HORIZON)

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
    max_batch: int = 16  # most rows in one predict_action_chunk call; 1 = no batching across requests
    batch_window_ms: float = 0.0  # how long the oldest waiting request waits for others (at most: the window
    #   closes as soon as every connected client has a request waiting); 0 = batch what waits
    rtc_max_guidance_weight: float = 5.0  # RTC's beta (requests with prev_chunk_left_over)
    rtc_schedule: str = "exp"  # RTC's prefix weights over the execution horizon: "exp" or "linear"
    record_dir: str | None = None  # when set, every answered request and its reply is saved there
    #   (fmpolicy.serving.record: one msgpack file each, written atomically off the event loop)

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"ServerConfig.port = {self.port!r} is invalid: expected an int in [0, 65535]")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ConfigError(f"ServerConfig.api_key = {self.api_key!r} is invalid: expected a non-empty string or None")
        if not isinstance(self.key_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in self.key_map.items()):
            raise ConfigError(f"ServerConfig.key_map = {self.key_map!r} is invalid: expected {{client key: our key}} "
                              "strings")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ConfigError(f"ServerConfig.max_batch = {self.max_batch!r} is invalid: expected an int >= 1 "
                              "(1: no batching across requests)")
        if isinstance(self.batch_window_ms, bool) or not isinstance(self.batch_window_ms, (int, float)) \
                or not 0 <= self.batch_window_ms < float("inf"):
            raise ConfigError(f"ServerConfig.batch_window_ms = {self.batch_window_ms!r} is invalid: expected a "
                              "finite number of milliseconds >= 0")
        if not isinstance(self.rtc_max_guidance_weight, (int, float)) or not self.rtc_max_guidance_weight > 0:
            raise ConfigError(f"ServerConfig.rtc_max_guidance_weight = {self.rtc_max_guidance_weight!r} is invalid: "
                              "expected a number > 0")
        if self.record_dir is not None and (not isinstance(self.record_dir, (str, os.PathLike))
                                            or not str(self.record_dir)):
            raise ConfigError(f"ServerConfig.record_dir = {self.record_dir!r} is invalid: expected a directory path "
                              "or None")
        if self.rtc_schedule not in SCHEDULES:
            raise ConfigError(f"ServerConfig.rtc_schedule = {self.rtc_schedule!r} is invalid: expected one of "
                              f"{SCHEDULES}")


class ObservationAdapter:
    """Client observation dict (numpy, openpi's names) -> the policy's batch (torch, our names)."""

    def __init__(self, policy, key_map: Mapping[str, str]):
        encoder = policy.config.encoder
        self.cameras = list(encoder.cameras) if encoder.kind != "none" else []
        slots = {f"{{camera{i}}}": cam for i, cam in enumerate(self.cameras)}
        # a camera placeholder the policy has no camera for is dropped (the key is then ignored)
        self.key_map = {k: slots.get(v, v) for k, v in key_map.items() if not v.startswith("{camera") or v in slots}
        # the batch stays on the host: the policy moves its inputs to its device in its own call, so that
        # the event loop, checking requests while the GPU computes, never waits for the GPU
        self.device = torch.device("cpu")

    def __call__(self, obs: Any) -> tuple[dict[str, Any], bool]:
        """-> (batch, batched): `batched` is False when the client sent one observation."""
        batch, batched, _ = self.adapt(obs)
        return batch, batched

    def adapt(self, obs: Any) -> tuple[dict[str, Any], bool, dict[str, Any]]:
        """-> (batch, batched, extras): `extras` holds the optional request fields (`REQUEST_FIELDS`) it
        sent, unchecked (`PolicyServer.prepare` checks them)."""
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
        if EMBODIMENT in mapped:
            batch[EMBODIMENT] = _embodiment(mapped[EMBODIMENT], b, self.device)
        for key in ("observation.prefix", "observation.prefix_mask"):
            if key in mapped:
                batch[key] = torch.as_tensor(np.array(mapped[key]), device=self.device)
        return batch, batched, {k: mapped[k] for k in REQUEST_FIELDS if k in mapped}

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
        if img.dtype == np.uint8:
            # stays uint8 (a channels-first view of `_array`'s copy): the encoder divides by 255 once for
            # the whole stacked call, off the event loop, instead of per request here (3 passes over
            # the pixels per image, which serialised 2-4 simultaneous requests)
            return torch.from_numpy(img).to(self.device)
        if img.dtype.kind != "f":
            raise InputError(f"{key!r} has dtype {img.dtype}: expected uint8 or float in [0, 1]")
        # cast by numpy: a torch op this size would be an OpenMP region on the event loop's thread
        return torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32)).to(self.device)


def _embodiment(value: Any, b: int, device: torch.device) -> list[str] | torch.Tensor:
    """A request's robot: a name for all its rows, one name per row, or indices -> per-row names or (b,)."""
    if isinstance(value, (str, bytes, np.str_)):
        value = [value] * b
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, bytes, np.str_)) for v in value):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value]
    arr = _array(value, EMBODIMENT)
    if arr.dtype.kind not in "iu":
        raise InputError(f"{EMBODIMENT!r} = {value!r}: expected a robot name, one name per row, or integer indices")
    return torch.as_tensor(arr, dtype=torch.long, device=device).reshape(-1)


def _int_field(extras: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = extras.get(name, default)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise InputError(f"{name!r} = {value!r}: expected an int in [{low}, {high}]")
    return int(value)


def _array(value: Any, key: str) -> np.ndarray:
    arr = np.array(value)  # a copy: arrays decoded from a message are read-only views of it
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{key!r} has dtype {arr.dtype}: expected numbers")
    return arr


@dataclass
class Request:
    """One checked request, ready to be stacked with others (`PolicyServer.prepare`)."""

    batch: dict[str, Any]  # the policy's inputs, rows first
    batched: bool  # the client sent a batch (state (b, s)): it gets (b, H, A) back
    rows: int
    width: int  # its robot's action width: the columns of its rows it gets back
    key: tuple  # requests with equal keys can be stacked into one call
    seed: int | None = None
    rtc: tuple[torch.Tensor, int, int] | None = None  # (prev_chunk_left_over (b, n, a), delay, horizon)
    arrived: float = field(default_factory=time.perf_counter)
    decode_ms: float = 0.0  # unpacking and checking it, before it could queue
    future: Any = None  # the asyncio future its connection waits on


class PolicyServer:
    """Serves `policy` (a `FlowPolicy`) over websockets; see the module docstring.

    `start()` runs the server (its event loop) on a background thread and returns once it listens
    (`self.port`); `serve_forever()` (starting it when needed) blocks until Ctrl-C or `stop()`,
    running the policy calls on its own thread; `pump(until)` does the same for a while. Without a
    pumping thread the calls run on a worker thread. `calls` counts the policy calls made and `rows`
    the rows they held (batching at work: rows / calls).
    """

    def __init__(self, policy, config: ServerConfig | None = None, sampler=None):
        policy.eval()
        self.policy = policy
        self.config = config or ServerConfig()
        self.sampler = sampler  # a SamplerConfig overriding the policy's own, or None
        self.adapter = ObservationAdapter(policy, self.config.key_map)
        self.metadata = {
            "server": "fmpolicy", "fmpolicy_version": __version__,
            "chunk_size": policy.config.chunk_size, "n_action_steps": policy.config.n_action_steps,
            "action_dim": policy.config.action_dim, "state_dim": policy.config.state_dim,
            "cameras": self.adapter.cameras, "key_map": self.adapter.key_map,
            "embodiments": list(policy.embodiments.names), "max_batch": self.config.max_batch,
            "rtc": policy.config.head == "flow",
        }
        self.port: int | None = None
        self.calls = 0
        self.rows = 0
        self._lock = threading.Lock()  # one inference at a time
        self._pending: deque[Request] = deque()  # checked requests waiting for the policy (event loop only)
        self._connections = 0  # open client connections (event loop only): each has at most one request out
        self._wakeup: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Future | None = None
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()  # (requests, asyncio future) for the pumping threads
        self._pumps = 0  # threads in pump() now
        self._pump_lock = threading.Lock()  # the count and the queue change together
        self._connection_count = 0  # connections opened in this run (event loop only): each one's number
        self._recorder: Recorder | None = None

    # ---- requests ----
    def prepare(self, obs: Any) -> Request:
        """Check one decoded request on its own (an `InputError` names the field, the value and what is
        expected) and make it ready to be stacked with others."""
        policy = self.policy
        batch, batched, extras = self.adapter.adapt(obs)
        state = batch[STATE]
        b = state.shape[0]
        if b == 0:
            raise InputError(f"{STATE!r} has batch size 0: expected at least one row")
        if not np.isfinite(state.numpy()).all():  # numpy: ~10x less per call than torch on tiny arrays
            rows = (~torch.isfinite(state)).any(1).nonzero().flatten().tolist()
            raise InputError(f"{STATE!r} holds non-finite values (row {rows[0]}: {state[rows[0]].tolist()}): "
                             "expected finite numbers")
        if TASK in batch and len(batch[TASK]) != b:
            raise InputError(f"{TASK!r} has {len(batch[TASK])} entries: expected one per row ({b}) or one string")
        swidth, width = policy.embodiments.host_widths(batch, b)
        if state.shape[1] not in (swidth, policy.config.state_dim):
            raise InputError(f"{STATE!r} has width {state.shape[1]}: this policy expects state_dim="
                             f"{' or '.join(str(w) for w in sorted({swidth, policy.config.state_dim}))}")
        for cam in self.adapter.cameras:
            if cam in batch and batch[cam].shape[0] != b:
                raise InputError(f"{cam!r} has {batch[cam].shape[0]} images: expected one per row ({b})")
        seed = extras.get(SEED)
        if seed is not None:
            if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
                raise InputError(f"{SEED!r} = {seed!r}: expected an int in [0, 2**63)")
            seed = int(seed)
        rtc = self._rtc_fields(extras, b, batched, width)
        key = tuple((k, tuple(v.shape[1:]), str(v.dtype)) if isinstance(v, torch.Tensor) else (k, type(v).__name__)
                    for k, v in sorted(batch.items()))
        key += (None,) if rtc is None else ((tuple(rtc[0].shape[1:]), rtc[1], rtc[2]),)
        return Request(batch, batched, b, width, key, seed, rtc)

    def _rtc_fields(self, extras: dict[str, Any], b: int, batched: bool, width: int):
        if PREV_CHUNK not in extras:
            for name in (INFERENCE_DELAY, EXECUTION_HORIZON):
                if name in extras:
                    raise InputError(f"{name!r} = {extras[name]!r} was sent without {PREV_CHUNK!r}: expected both "
                                     "(real-time chunking continues the previous chunk) or neither")
            return None
        if self.policy.config.head != "flow":
            raise InputError(f"{PREV_CHUNK!r} was sent, but this policy has a {self.policy.config.head!r} head: "
                             "real-time chunking needs a flow head")
        h = self.policy.config.chunk_size
        prev = _array(extras[PREV_CHUNK], PREV_CHUNK)
        want = f"({b}, n, {width})" if batched else f"(n, {width})"
        if prev.ndim != (3 if batched else 2) or (batched and prev.shape[0] != b) or prev.shape[-1] != width \
                or not 1 <= prev.shape[-2] <= h:
            raise InputError(f"{PREV_CHUNK!r} has shape {prev.shape}: expected {want} with 1 <= n <= {h} (the "
                             "previous chunk's actions from this request on, robot units)")
        if not np.isfinite(prev).all():
            raise InputError(f"{PREV_CHUNK!r} holds non-finite values: expected finite actions")
        n = prev.shape[-2]
        horizon = _int_field(extras, EXECUTION_HORIZON, n, 1, h)
        delay = _int_field(extras, INFERENCE_DELAY, 0, 0, min(horizon, n))
        leftover = torch.as_tensor(prev if batched else prev[None], dtype=self.policy.dtype)  # to the device in _run
        return leftover, delay, horizon

    def run_batch(self, requests: list[Request]) -> list[dict[str, Any] | Exception]:
        """Stack compatible `requests` (equal keys) into one policy call; -> one reply or exception each.
        When the stacked call raises, each request is run alone, so that only the faulty ones fail."""
        try:
            return self._run(requests)
        except Exception as e:  # noqa: BLE001 (returned to its request(s))
            if len(requests) == 1:
                return [e]
        return [self.run_batch([r])[0] for r in requests]

    def _run(self, requests: list[Request]) -> list[dict[str, Any]]:
        policy = self.policy
        first = requests[0]
        if len(requests) == 1:
            batch = first.batch
        else:
            batch = {}
            for k, v in first.batch.items():
                parts = [r.batch[k] for r in requests]
                batch[k] = torch.cat(parts) if isinstance(v, torch.Tensor) else [x for p in parts for x in p]
        noise = torch.cat([policy.sample_noise(r.rows, None if r.seed is None else
                                               torch.Generator().manual_seed(r.seed)) for r in requests])
        noise = noise.to(policy.device, policy.dtype)
        rows = sum(r.rows for r in requests)
        with self._lock, torch.no_grad():
            start = time.perf_counter()
            if first.rtc is None:
                actions = policy.predict_action_chunk(batch, noise=noise, sampler=self.sampler)
            else:
                from fmpolicy.rtc import sample_chunk_rtc

                _, delay, horizon = first.rtc
                leftover = torch.cat([r.rtc[0] for r in requests]).to(policy.device)
                actions = sample_chunk_rtc(policy, batch, leftover, delay, horizon,
                                           max_guidance_weight=self.config.rtc_max_guidance_weight,
                                           schedule=self.config.rtc_schedule, noise=noise, sampler=self.sampler)
            if actions.is_cuda:
                torch.cuda.synchronize(actions.device)
            infer_ms = 1000 * (time.perf_counter() - start)
            self.calls += 1
            self.rows += rows
        actions = actions.float().cpu().numpy()
        replies, row = [], 0
        for r in requests:
            mine = actions[row:row + r.rows, :, :r.width]
            row += r.rows
            replies.append({"actions": mine if r.batched else mine[0], "server_timing": {
                "infer_ms": infer_ms, "queue_ms": 1000 * (start - r.arrived), "decode_ms": r.decode_ms,
                "batch_size": rows, "batch_requests": len(requests)}})
        return replies

    def infer(self, obs: Any) -> dict[str, Any]:
        """The reply to one decoded request (also usable without a network)."""
        reply = self.run_batch([self.prepare(obs)])[0]
        if isinstance(reply, Exception):
            raise reply
        return reply

    def warmup(self, batch_sizes: tuple[int, ...] = (1,), rtc: bool | None = None) -> list[dict[str, Any]]:
        """Run made-up requests through the server's own path (`prepare`, `run_batch`) before serving, so
        that the first real request at each of `batch_sizes` rows does not pay for compiling the solve
        (`--compile`: seconds to minutes) or capturing its CUDA graph. `rtc` (default: a flow head) also
        sends each size with `prev_chunk_left_over`, which compiles the guided solve (its graph does not
        depend on the leftover's length). The requests carry zero states and black images at the
        encoder's size, and a task when the policy reads one (its first known task for `kind="task"`):
        the prefix has the length real requests give it (instructions are padded to a fixed length). A
        policy fed prefix tokens directly gets none (their length is the client's). Not counted in
        `calls` / `rows`. -> one {"batch", "rtc", "seconds"} per call made. Run it on the thread that
        will serve (`serve_forever()`), before it: the compiled code and torch's threads are then warm
        there."""
        policy = self.policy
        rtc = policy.config.head == "flow" if rtc is None else rtc
        spec = policy.embodiments.specs[0]
        encoder, h = policy.config.encoder, policy.config.chunk_size
        timings, counts = [], (self.calls, self.rows)
        for b in batch_sizes:
            if not isinstance(b, int) or not 1 <= b <= self.config.max_batch:
                raise InputError(f"warm-up batch size {b!r}: expected an int in [1, max_batch = {self.config.max_batch}]")
            obs: dict[str, Any] = {STATE: np.zeros((b, spec.state_dim), np.float32)}
            if len(policy.embodiments.names) > 1:
                obs[EMBODIMENT] = [spec.name] * b
            for cam in self.adapter.cameras:
                obs[cam] = np.zeros((b, encoder.image_size, encoder.image_size, 3), np.uint8)
            if encoder.kind != "none":
                obs[TASK] = [encoder.tasks[0] if encoder.kind == "task" else "warm-up"] * b
            variants = [(False, obs)]
            if rtc:
                variants.append((True, {**obs, PREV_CHUNK: np.zeros((b, h, spec.action_dim), np.float32),
                                        INFERENCE_DELAY: 1}))
            for guided, request in variants:
                start = time.perf_counter()
                reply = self.run_batch([self.prepare(request)])[0]
                if isinstance(reply, Exception):
                    raise reply
                timings.append({"batch": b, "rtc": guided, "seconds": time.perf_counter() - start})
        self.calls, self.rows = counts
        return timings

    # ---- batching (on the event loop) ----
    def _take(self) -> list[Request]:
        """The oldest waiting request and every later one compatible with it, up to max_batch rows."""
        head = self._pending.popleft()
        group, rows, rest = [head], head.rows, deque()
        while self._pending:
            r = self._pending.popleft()
            if r.future.done():  # its client went away
                continue
            if r.key == head.key and rows + r.rows <= self.config.max_batch:
                group.append(r)
                rows += r.rows
            else:
                rest.append(r)
        self._pending = rest
        return group

    def _compatible_rows(self) -> int:
        head = self._pending[0]
        return sum(r.rows for r in self._pending if r.key == head.key)

    def _window_open(self) -> bool:
        """More requests can still join the oldest one's call: it has room, and some connected client has
        none waiting (a connection sends its next request only after the reply to its last)."""
        waiting = sum(not r.future.done() for r in self._pending)
        return self._compatible_rows() < self.config.max_batch and waiting < self._connections

    async def _batcher(self) -> None:
        window = self.config.batch_window_ms / 1000
        free_since = time.perf_counter()  # when the policy last finished a call
        while True:
            while not self._pending or self._pending[0].future.done():
                if self._pending:
                    self._pending.popleft()
                    continue
                self._wakeup.clear()
                await self._wakeup.wait()
            if window > 0:  # the oldest request waits at most `window` past the moment the policy could take it
                deadline = max(self._pending[0].arrived, free_since) + window
                while self._window_open() and time.perf_counter() < deadline:
                    self._wakeup.clear()
                    try:
                        await asyncio.wait_for(self._wakeup.wait(), deadline - time.perf_counter())
                    except asyncio.TimeoutError:  # TimeoutError from 3.11 on
                        break
            group = self._take()
            try:
                results = await self._call(group)
            except Exception as e:  # noqa: BLE001 (run_batch returns errors; this is a last resort)
                results = [e] * len(group)
            free_since = time.perf_counter()
            for r, result in zip(group, results):
                if r.future.done():
                    continue
                if isinstance(result, Exception):
                    r.future.set_exception(result)
                else:
                    r.future.set_result(result)

    async def _call(self, group: list[Request]) -> list[dict[str, Any] | Exception]:
        """`run_batch(group)` on a thread in `pump()` when there is one, else on a worker thread."""
        done = None
        with self._pump_lock:  # a pump leaving takes the queue's rest under this lock: nothing is stranded
            if self._pumps:
                done = asyncio.get_running_loop().create_future()
                self._jobs.put((group, done))
        results = None if done is None else await done  # None: the last pump left before running it
        return results if results is not None else await asyncio.to_thread(self.run_batch, group)

    @property
    def pumping(self) -> int:
        """How many threads are in `pump()` (or `serve_forever()`) now."""
        return self._pumps

    def pump(self, until: threading.Event | None = None, poll_s: float = 0.1) -> None:
        """Run the server's policy calls on this thread until `until` is set or the server stops.

        Use it to keep every policy call on the thread that loaded the policy (the main thread): on
        CPU a call from another thread is slower (see the module docstring). Calls queued when the
        last pumping thread leaves go back to the worker thread; several threads may pump at once.
        """
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the policy server is not running: start() it before pump()")
        with self._pump_lock:
            self._pumps += 1
        try:
            while self._thread.is_alive() and (until is None or not until.is_set()):
                try:
                    group, done = self._jobs.get(timeout=poll_s)
                except queue.Empty:
                    continue
                try:
                    results = self.run_batch(group)
                except Exception as e:  # noqa: BLE001 (run_batch returns errors; this is a last resort)
                    results = [e] * len(group)
                except BaseException:  # Ctrl-C in this thread: the call goes back to the worker thread
                    self._hand_back(lambda d=done: d.done() or d.set_result(None))
                    raise
                self._hand_back(lambda d=done, r=results: d.done() or d.set_result(r))
        finally:
            with self._pump_lock:
                self._pumps -= 1
                left = [] if self._pumps else self._drain()
            for _, done in left:  # nobody pumps any more: back to `_call`, which runs them on the worker thread
                self._hand_back(lambda d=done: d.done() or d.set_result(None))

    def _drain(self) -> list[tuple[list[Request], asyncio.Future]]:
        left = []
        with contextlib.suppress(queue.Empty):
            while True:
                left.append(self._jobs.get_nowait())
        return left

    def _hand_back(self, fn) -> None:
        """Run `fn` on the event loop (asyncio futures are not thread-safe); a stopped loop drops it."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped meanwhile
            self._loop.call_soon_threadsafe(fn)

    # ---- the websocket side ----
    async def _handle(self, websocket) -> None:
        from websockets.exceptions import ConnectionClosed

        self._connections += 1
        connection, self._connection_count = self._connection_count, self._connection_count + 1
        try:
            await self._serve_connection(websocket, connection)
        except ConnectionClosed:  # the client went away (closed, or its process ended): nothing to answer
            pass
        finally:
            self._connections -= 1
            self._wakeup.set()  # a batch window may have been waiting for this client

    async def _serve_connection(self, websocket, connection: int) -> None:
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
                request = self.prepare(obs)
                request.arrived = start
                request.decode_ms = 1000 * (time.perf_counter() - start)
                request.future = asyncio.get_running_loop().create_future()
                self._pending.append(request)
                self._wakeup.set()
                reply = await request.future
                reply["server_timing"]["total_ms"] = 1000 * (time.perf_counter() - start)
                if prev_total_ms is not None:
                    reply["server_timing"]["prev_total_ms"] = prev_total_ms
                await websocket.send(packb(reply))
                prev_total_ms = 1000 * (time.perf_counter() - start)
                if self._recorder is not None:
                    self._recorder.put(obs, reply, connection)
            except Exception:  # noqa: BLE001 (the client gets it; the server goes on)
                await websocket.send(traceback.format_exc())

    def _process_request(self, connection, request):
        """Before the websocket opens: `GET /healthz` is answered 200 "OK" (openpi's health check, for
        load balancers and container probes; it needs no API key and tells nothing); otherwise the API
        key is checked when one is set."""
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "OK\n")
        if self.config.api_key is None:
            return None
        if request.headers.get("Authorization") != f"Api-Key {self.config.api_key}":
            return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong API key: send the header "
                                      "'Authorization: Api-Key <key>'\n")
        return None

    async def _serve(self, ready: threading.Event | None = None) -> None:
        self._stop = asyncio.get_running_loop().create_future()
        self._wakeup = asyncio.Event()
        self._pending.clear()
        self._drain()  # calls a previous run of the server left queued
        self._connection_count = 0
        self._recorder = None if self.config.record_dir is None else Recorder(self.config.record_dir)
        batcher = asyncio.create_task(self._batcher())
        try:
            await self._serve_forever_on(ready)
        finally:
            if self._recorder is not None:
                self._recorder.close()  # what is queued is written, the directory released
            batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await batcher

    async def _serve_forever_on(self, ready: threading.Event | None) -> None:
        from websockets.asyncio.server import serve

        async with serve(self._handle, self.config.host, self.config.port, compression=None, max_size=None,
                         process_request=self._process_request) as server:
            self.port = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready.set()
            await self._stop

    def serve_forever(self) -> None:
        """Serve until interrupted (Ctrl-C) or `stop()`, running the policy calls on this thread;
        `start()` first to learn the bound port."""
        if self._thread is None:
            self.start()
        try:
            self.pump()
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
            if errors and isinstance(errors[0], FmPolicyError):  # e.g. the recording directory is in use
                raise errors[0]
            raise RuntimeError(f"the policy server did not start on {self.config.host}:{self.config.port}: "
                               f"{errors[0] if errors else 'timed out'}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        if self._thread is not None:
            self._thread.join(timeout=10)
