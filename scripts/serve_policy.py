#!/usr/bin/env python
"""Serve a saved policy over websockets with openpi's protocol (`openpi-client` works unchanged).

    python scripts/serve_policy.py --policy runs/point_obstacle_flow/policy [--port 8000] [--host 127.0.0.1]
        [--api-key KEY] [--map observation/image=observation.images.top ...] [--device cpu] [--steps 10]
        [--max-batch 16] [--batch-window-ms 0] [--rtc-max-guidance-weight 5] [--rtc-schedule exp]
        [--compile step|solve] [--cuda-graphs] [--bf16] [--threads N] [--record DIR] [--warmup 1,2,4|none]

A client then does, e.g.:

    from openpi_client import websocket_client_policy
    client = websocket_client_policy.WebsocketClientPolicy("localhost", 8000)
    actions = client.infer({"observation/state": state, "observation/image": hwc_uint8, "prompt": "..."})["actions"]

Binds 127.0.0.1 unless --host says otherwise. Requests from several clients that wait for the policy
are batched into one call (--max-batch rows at most; --max-batch 1 turns it off). A request may carry
`seed`, and for real-time chunking `prev_chunk_left_over`, `inference_delay`, `execution_horizon`. See
fmpolicy/serving/server.py and docs/serving.md for the protocol, the default key mapping, batching,
the request fields and the error behaviour. The policy calls run on the main thread, which loaded the
policy (on CPU a call from another thread is slower: docs/serving.md); --threads sets torch's CPU
threads for them (default: torch's own, one per core). Before it listens, the server runs made-up
requests (plain and RTC) at the --warmup batch sizes, so that compiling (--compile: up to minutes) and
graph capture (--cuda-graphs) are done when the first client connects (`PolicyClient(wait_s=...)`
waits for it).
"""

from __future__ import annotations

import argparse
import signal
import sys

from fmpolicy import FlowPolicy, SamplerConfig
from fmpolicy.errors import FmPolicyError


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="a directory written by save_pretrained (<run>/policy)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one)")
    p.add_argument("--api-key", default=None, help="require the header 'Authorization: Api-Key <key>'")
    p.add_argument("--map", nargs="*", default=[], metavar="CLIENT=OURS",
                   help="extra key mappings, e.g. observation/exterior_image_1_left=observation.images.top")
    p.add_argument("--device", default="auto", help="device of the policy (auto: CUDA when present)")
    p.add_argument("--steps", type=int, default=None, help="integration steps (default: the policy's own)")
    p.add_argument("--compile", nargs="?", const="step", default=None, choices=("step", "solve"),
                   help="torch.compile the expert step ('step', the default) or the whole fixed-grid solve "
                        "('solve': one call per chunk); the first request at each batch size compiles")
    p.add_argument("--bf16", action="store_true",
                   help="run the action expert in bfloat16 (inputs, integration and actions stay float32)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the fixed-grid solve from CUDA graphs (CUDA only; one capture per batch size)")
    p.add_argument("--record", default=None, metavar="DIR",
                   help="save every answered request and its reply in DIR (one msgpack file each; "
                        "fmpolicy.serving.read_records reads them back)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's CPU threads (torch.set_num_threads; default: torch's own, one per core)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="most rows in one policy call when requests wait together (1: no batching)")
    p.add_argument("--batch-window-ms", type=float, default=0.0,
                   help="how long a request may wait, once the policy is free, for others to join its batch")
    p.add_argument("--rtc-max-guidance-weight", type=float, default=5.0,
                   help="real-time chunking's guidance clip (beta), for requests with prev_chunk_left_over")
    p.add_argument("--rtc-schedule", default="exp", help="real-time chunking's prefix weights: exp or linear")
    p.add_argument("--warmup", default="1", metavar="SIZES",
                   help="batch sizes to run made-up requests at (plain and RTC) before listening, so that "
                        "compiling / graph capture happen then and not on the first real request: e.g. 1,2,4; "
                        "'none' skips it (default: 1)")
    args = p.parse_args(argv)
    try:
        warmup = () if args.warmup.strip().lower() == "none" else tuple(int(b) for b in args.warmup.split(","))
    except ValueError:
        p.error(f"--warmup {args.warmup!r}: expected batch sizes like 1,2,4 or 'none'")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: expected an int >= 1")
    try:
        import torch

        if args.threads is not None:
            torch.set_num_threads(args.threads)
        from fmpolicy.serving import DEFAULT_KEY_MAP, PolicyServer, ServerConfig

        extra = {}
        for item in args.map:
            if "=" not in item:
                raise FmPolicyError(f"--map {item!r}: expected CLIENT_KEY=OUR_KEY")
            client, ours = item.split("=", 1)
            extra[client] = ours
        config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                              key_map={**DEFAULT_KEY_MAP, **extra}, max_batch=args.max_batch,
                              batch_window_ms=args.batch_window_ms,
                              rtc_max_guidance_weight=args.rtc_max_guidance_weight, rtc_schedule=args.rtc_schedule,
                              record_dir=args.record)
        policy = FlowPolicy.from_pretrained(args.policy, device=args.device)
        # one graph per batch size the batcher forms: keep them all
        policy.prepare_inference(args.compile, args.cuda_graphs, args.bf16, max_graphs=max(8, args.max_batch))
        sampler = None
        if args.steps is not None:
            sampler = SamplerConfig(**{**vars(policy.config.sampler), "num_steps": args.steps})
        server = PolicyServer(policy, config, sampler=sampler)
        for w in server.warmup(warmup):  # here, on the thread that will serve
            print(f"warm-up: batch {w['batch']}{' with RTC' if w['rtc'] else ''} {w['seconds']:.2f} s", flush=True)
        server.start()
        print(f"serving {args.policy} on ws://{config.host}:{server.port} (chunk {policy.config.chunk_size} x "
              f"{policy.config.action_dim}, batches of up to {config.max_batch}, {torch.get_num_threads()} torch threads); "
              "Ctrl-C stops", flush=True)
        # `docker stop` / systemd send SIGTERM: stop as on Ctrl-C (the recording, if any, is written out)
        signal.signal(signal.SIGTERM, _interrupt)
        server.serve_forever()
    except FmPolicyError as e:
        sys.exit(f"error: {e}")
    except ImportError as e:
        sys.exit(f"error: {e}: install the serve extra (pip install -e '.[serve]')")


if __name__ == "__main__":
    main()
