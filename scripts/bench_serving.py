#!/usr/bin/env python
"""What the policy server adds to a chunk: openpi-client round trips on localhost against
`predict_action_chunk` alone, with 1, 2 and 4 clients at once, with batching of simultaneous requests
off (`max_batch=1`: one request per policy call), on (`--max-batch`, default 16, no window) and on with
a batching window (`--window-ms`, default 3), side by side in one run, and against `protocol`: a bare
server that speaks the same protocol and answers every request with a fixed chunk after unpacking it
(no policy, no checks): the round trip that no server can go below on this machine with these clients.

    python scripts/bench_serving.py [--clients 1,2,4] [--requests 200] [--modes off,on,window,protocol]
        [--max-batch 16] [--window-ms 3] [--json] [--out bench.json] [--client-python .venv-openpi/bin/python]
        [--device cuda] [--compile step|solve] [--cuda-graphs] [--bf16] [--calls-on main|worker]

The policy: the `cpu` expert preset with a vision_text encoder over two 224x224 cameras (the tower
at its tiny test width) and an instruction, chunk 10 x 7, 10 Euler steps, on `--device` (default cpu),
optionally with the expert step or the whole solve compiled, CUDA graphs and bf16 (as `serve_policy.py`
sets them up; one chunk at each batch size from 1 to the most clients compiles or captures first,
before anything is timed). Each client is a separate
process running the real openpi-client (`tests/openpi_client_bench.py`, in the venv `make test`
creates) and sends two 224x224 uint8 images, an 8-d state and a prompt per request, one after the
other as fast as its replies come. The server runs its policy calls on the main thread
(`PolicyServer.pump`), where the policy was loaded and `alone` is timed, as `serve_policy.py` does;
`--calls-on worker` leaves them on its worker thread (a server that is only `start()`ed), which on
CPU is slower (libgomp: docs/serving.md).

Per request: the round trip measured by the client, the server's own `infer_ms` (the policy call that
served it, which holds several requests when batched), that call's rows, and the server's timing of the
rest (`decode_ms`, `queue_ms`, `total_ms`), from which a second table splits the overhead into decode,
wait, after and outside (`breakdown`). Overhead = round trip -
infer_ms: decoding, checks, image conversion, the websocket and msgpack both ways, and the wait for the
policy while it serves other requests. `vs alone` = round trip - `predict_action_chunk` alone at
batch 1 (measured in-process just before each row): what a client pays over having the policy to itself. Prints a
table (median and p99 in ms), the machine's load average (`/proc/loadavg`) before and after, and with
--json / --out the rows as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config
from fmpolicy.config import EncoderConfig
from fmpolicy.errors import FmPolicyError
from fmpolicy.machine import cpu_model
from fmpolicy.serving import PolicyServer, ServerConfig, packb, unpackb

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "tests" / "openpi_client_bench.py"


def make_policy(device: str = "cpu") -> FlowPolicy:
    cams = ("observation.images.top", "observation.images.wrist")
    enc = EncoderConfig(kind="vision_text", cameras=cams, image_size=224, vision_patch_size=32, out_dim=128,
                        max_text_tokens=16)
    cfg = PolicyConfig(state_dim=8, action_dim=7, chunk_size=10, n_action_steps=5, device=device,
                       expert=make_expert_config("cpu", prefix_dim=128), encoder=enc,
                       normalization=NormalizationConfig(state="identity", action="identity"))
    return FlowPolicy(cfg).eval()


def bench_obs(policy: FlowPolicy, batch: int = 1) -> dict:
    """The benchmark's observation in-process: uint8 camera images and the prompt as the clients send them
    (the server hands them to the policy as uint8 too)."""
    rng = np.random.default_rng(0)
    return {"observation.state": torch.as_tensor(rng.standard_normal((batch, 8)), dtype=torch.float32),
            "task": ["pick up the red block"] * batch,
            **{cam: torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8) for cam in policy.config.encoder.cameras}}


def warm_batch_sizes(policy: FlowPolicy, sizes: range) -> None:
    """One chunk at each batch size the server may form, before anything is timed: with --compile or
    --cuda-graphs the first call at a size compiles or captures, which would otherwise land in a timed
    request (a call's rows never exceed the number of clients)."""
    with torch.no_grad():
        for b in sizes:
            policy.predict_action_chunk(bench_obs(policy, b))


def infer_alone_ms(policy: FlowPolicy, n: int = 20) -> float:
    """Median ms of `predict_action_chunk` at batch 1 on the benchmark's observation, in-process."""
    obs = bench_obs(policy)
    times = []
    with torch.no_grad():
        for i in range(n + 5):
            start = time.perf_counter()
            policy.predict_action_chunk(obs)
            if policy.device.type == "cuda":  # the chunk returned is on the GPU: wait for it
                torch.cuda.synchronize(policy.device)
            if i >= 5:
                times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


class ProtocolFloor:
    """openpi's protocol and nothing else: the metadata frame, then each request unpacked (its arrays
    copied out of the message, as the policy server does) and answered at once with a fixed chunk and
    the same `server_timing` keys (`infer_ms` 0)."""

    def __init__(self, chunk: np.ndarray):
        self.chunk, self.port = chunk, None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future | None = None
        self._thread: threading.Thread | None = None

    async def _handle(self, websocket) -> None:
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            await websocket.send(packb({"server": "protocol floor"}))
            async for message in websocket:
                start = time.perf_counter()
                _ = [np.array(v) for v in unpackb(message).values() if isinstance(v, np.ndarray)]
                ms = 1000 * (time.perf_counter() - start)
                await websocket.send(packb({"actions": self.chunk, "server_timing": {
                    "infer_ms": 0.0, "queue_ms": ms, "decode_ms": ms, "total_ms": ms, "batch_size": 1}}))

    def start(self) -> "ProtocolFloor":
        from websockets.asyncio.server import serve

        ready = threading.Event()

        async def run() -> None:
            self._stop = asyncio.get_running_loop().create_future()
            async with serve(self._handle, "127.0.0.1", 0, compression=None, max_size=None) as server:
                self.port = server.sockets[0].getsockname()[1]
                ready.set()
                await self._stop

        def thread() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(run())
            self._loop.close()

        self._thread = threading.Thread(target=thread, name="protocol-floor", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the protocol floor server did not start")
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(lambda: self._stop.done() or self._stop.set_result(None))
        self._thread.join(10)


def run_clients(server: PolicyServer | ProtocolFloor, n: int, args) -> dict:
    """n client processes against `server`; the policy calls run on this (the main) thread meanwhile,
    as under `serve_policy.py`, unless --calls-on worker."""
    procs = [subprocess.Popen([args.client_python, str(CLIENT), str(server.port), str(args.requests),
                               str(args.warmup)], stdout=subprocess.PIPE, text=True) for _ in range(n)]
    outs, done = [], threading.Event()

    def collect() -> None:
        try:
            outs.extend(json.loads(proc.communicate(timeout=1800)[0].strip().splitlines()[-1]) for proc in procs)
        finally:
            done.set()

    collector = threading.Thread(target=collect, name="clients")
    collector.start()
    if args.calls_on == "main" and isinstance(server, PolicyServer):
        server.pump(until=done)
    collector.join()
    if len(outs) != n:
        sys.exit(f"error: {n - len(outs)} of {n} clients failed")
    return {k: np.concatenate([o[k] for o in outs])
            for k in ("rtt_ms", "infer_ms", "batch_size", "queue_ms", "decode_ms", "total_ms")}


def breakdown(r: dict) -> dict:
    """Where a request's overhead (round trip - infer_ms) goes, medians in ms: `decode` (the server
    unpacking and checking it), `wait` (queued: the batch window, or the policy busy with other calls),
    `after` (from the end of its call to its connection taking the reply up: the replies of one call
    are handed over one after another on the event loop) and `outside` (everything before the server
    reads the frame and after it builds the reply: the client packing the request and unpacking the
    reply, the websocket both ways, the server packing the reply)."""
    parts = {"decode": r["decode_ms"], "wait": r["queue_ms"] - r["decode_ms"],
             "after": r["total_ms"] - r["queue_ms"] - r["infer_ms"], "outside": r["rtt_ms"] - r["total_ms"]}
    return {f"{k}_ms_median": float(np.median(v)) for k, v in parts.items()}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,2,4", help="numbers of simultaneous clients, comma separated")
    p.add_argument("--requests", type=int, default=200, help="timed requests per client")
    p.add_argument("--warmup", type=int, default=10, help="untimed requests per client first")
    p.add_argument("--max-batch", type=int, default=16, help="ServerConfig.max_batch with batching on")
    p.add_argument("--window-ms", type=float, default=3.0, help="ServerConfig.batch_window_ms in the mode 'window'")
    p.add_argument("--modes", default="off,on,window,protocol",
                   help="off (max_batch=1), on (--max-batch, no window), window (--max-batch and --window-ms), "
                        "protocol (a bare protocol server with a fixed reply: the floor)")
    p.add_argument("--client-python", default=str(ROOT / ".venv-openpi" / "bin" / "python"),
                   help="a python with openpi-client installed (make test creates .venv-openpi)")
    p.add_argument("--device", default="cpu", help="the policy's device: cpu, cuda, cuda:N or auto")
    p.add_argument("--compile", nargs="?", const="step", default=None, choices=("step", "solve"),
                   help="torch.compile the expert step (step) or the whole fixed-grid solve (solve)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay the fixed-grid solve from CUDA graphs")
    p.add_argument("--bf16", action="store_true", help="run the action expert in bfloat16")
    p.add_argument("--calls-on", default="main", choices=("main", "worker"),
                   help="where the server runs its policy calls: this process's main thread (PolicyServer.pump, "
                        "as serve_policy.py does) or its worker thread (a server only start()ed)")
    p.add_argument("--json", action="store_true", help="also print one JSON object per row")
    p.add_argument("--out", default=None, help="write {machine, rows} as JSON to this file")
    args = p.parse_args(argv)
    client_python = shutil.which(args.client_python)
    if client_python is None:
        sys.exit(f"error: --client-python {args.client_python} is not a python found here: run `make test` once, "
                 "or pass a python with openpi-client installed")
    args.client_python = client_python
    modes = [m.strip() for m in args.modes.split(",")]
    if not modes or set(modes) - {"off", "on", "window", "protocol"}:
        sys.exit(f"error: --modes {args.modes!r}: expected some of off,on,window,protocol")

    torch.manual_seed(0)
    try:
        policy = make_policy(args.device).prepare_inference(args.compile, args.cuda_graphs, args.bf16,
                                                            max_graphs=max(8, args.max_batch))
    except FmPolicyError as e:
        sys.exit(f"error: {e}")
    clients = [int(c) for c in args.clients.split(",")]
    if args.compile or args.cuda_graphs:
        warm_batch_sizes(policy, range(1, min(max(clients), args.max_batch) + 1))
    infer_alone_ms(policy, 5)  # the first calls are slow (allocations, lazy init)
    load_before = loadavg()
    configs = {"off": ServerConfig(port=0, max_batch=1), "on": ServerConfig(port=0, max_batch=args.max_batch),
               "window": ServerConfig(port=0, max_batch=args.max_batch, batch_window_ms=args.window_ms)}
    chunk = np.zeros((policy.config.chunk_size, policy.config.action_dim), np.float32)
    servers = {m: (ProtocolFloor(chunk) if m == "protocol" else PolicyServer(policy, configs[m])).start()
               for m in modes}
    rows = []
    try:
        for n in clients:
            for mode in modes:  # side by side: the same load for each
                alone_ms = infer_alone_ms(policy)  # just before: under the same load
                r = run_clients(servers[mode], n, args)
                rtt, infer = r["rtt_ms"], r["infer_ms"]
                over, vs_alone = rtt - infer, rtt - alone_ms
                config = configs.get(mode)
                rows.append({"batching": mode, "max_batch": config and config.max_batch,
                             "batch_window_ms": config and config.batch_window_ms, "clients": n,
                             "requests": int(len(rtt)), "alone_ms": alone_ms,
                             "infer_ms_median": float(np.median(infer)), "mean_batch": float(np.mean(r["batch_size"])),
                             "rtt_ms_median": float(np.median(rtt)), "rtt_ms_p99": float(np.percentile(rtt, 99)),
                             "overhead_ms_median": float(np.median(over)), "overhead_ms_p99": float(np.percentile(over, 99)),
                             "vs_alone_ms_median": float(np.median(vs_alone)),
                             "vs_alone_ms_p99": float(np.percentile(vs_alone, 99)),
                             **breakdown(r),
                             "cpu": cpu_model(), "threads": torch.get_num_threads(), "device": str(policy.device),
                             "gpu": torch.cuda.get_device_name(policy.device) if policy.device.type == "cuda" else None,
                             "compile": args.compile, "cuda_graphs": args.cuda_graphs, "bf16": args.bf16,
                             "calls_on": args.calls_on})
    finally:
        for server in servers.values():
            server.stop()
    load_after = loadavg()
    gpu = f", {torch.cuda.get_device_name(policy.device)}" if policy.device.type == "cuda" else ""
    print(f"load average before {load_before}, after {load_after}; {cpu_model()}, {torch.get_num_threads()} torch "
          f"threads; policy on {policy.device}{gpu} (compile {args.compile}, CUDA graphs {args.cuda_graphs}, bf16 "
          f"{args.bf16}); window = {args.window_ms} ms; policy calls on the {args.calls_on} thread")
    print(f"{'batching':>8} {'clients':>7} {'requests':>8} {'rows/call':>9} {'alone ms':>9} {'infer ms':>9} "
          f"{'round trip ms':>14} {'p99':>7} {'overhead ms':>12} {'p99':>7} {'vs alone ms':>12} {'p99':>7}")
    for r in rows:
        print(f"{r['batching']:>8} {r['clients']:>7} {r['requests']:>8} {r['mean_batch']:>9.2f} "
              f"{r['alone_ms']:>9.2f} {r['infer_ms_median']:>9.2f} {r['rtt_ms_median']:>14.2f} {r['rtt_ms_p99']:>7.2f} "
              f"{r['overhead_ms_median']:>12.2f} {r['overhead_ms_p99']:>7.2f} {r['vs_alone_ms_median']:>12.2f} "
              f"{r['vs_alone_ms_p99']:>7.2f}")
    print("where the overhead goes (medians, ms): decode + wait + after + outside")
    print(f"{'batching':>8} {'clients':>7} {'decode':>7} {'wait':>7} {'after':>7} {'outside':>8}")
    for r in rows:
        print(f"{r['batching']:>8} {r['clients']:>7} {r['decode_ms_median']:>7.2f} {r['wait_ms_median']:>7.2f} "
              f"{r['after_ms_median']:>7.2f} {r['outside_ms_median']:>8.2f}")
    for r in rows:
        r["load_before"], r["load_after"] = load_before, load_after
    if args.json:
        for r in rows:
            print(json.dumps(r))
    if args.out:
        Path(args.out).write_text(json.dumps({"load_before": load_before, "load_after": load_after, "rows": rows},
                                             indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
