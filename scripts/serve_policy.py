#!/usr/bin/env python
"""Serve a saved policy over websockets with openpi's protocol (`openpi-client` works unchanged).

    python scripts/serve_policy.py --policy runs/point_obstacle_flow/policy [--port 8000] [--host 127.0.0.1]
        [--api-key KEY] [--map observation/image=observation.images.top ...] [--device cpu] [--steps 10]

A client then does, e.g.:

    from openpi_client import websocket_client_policy
    client = websocket_client_policy.WebsocketClientPolicy("localhost", 8000)
    actions = client.infer({"observation/state": state, "observation/image": hwc_uint8, "prompt": "..."})["actions"]

Binds 127.0.0.1 unless --host says otherwise. See fmpolicy/serving/server.py for the protocol, the
default key mapping and the error behaviour.
"""

from __future__ import annotations

import argparse
import sys

from fmpolicy import FlowPolicy, SamplerConfig
from fmpolicy.errors import FmPolicyError


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
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the expert step (the first request at each batch size compiles)")
    args = p.parse_args(argv)
    try:
        from fmpolicy.serving import DEFAULT_KEY_MAP, PolicyServer, ServerConfig

        extra = {}
        for item in args.map:
            if "=" not in item:
                raise FmPolicyError(f"--map {item!r}: expected CLIENT_KEY=OUR_KEY")
            client, ours = item.split("=", 1)
            extra[client] = ours
        config = ServerConfig(host=args.host, port=args.port, api_key=args.api_key,
                              key_map={**DEFAULT_KEY_MAP, **extra})
        policy = FlowPolicy.from_pretrained(args.policy, device=args.device)
        if args.compile:
            policy.compile_velocity()
        sampler = None
        if args.steps is not None:
            sampler = SamplerConfig(**{**vars(policy.config.sampler), "num_steps": args.steps})
        server = PolicyServer(policy, config, sampler=sampler).start()
        print(f"serving {args.policy} on ws://{config.host}:{server.port} (chunk {policy.config.chunk_size} x "
              f"{policy.config.action_dim}); Ctrl-C stops", flush=True)
        server.serve_forever()
    except FmPolicyError as e:
        sys.exit(f"error: {e}")
    except ImportError as e:
        sys.exit(f"error: {e}: install the serve extra (pip install -e '.[serve]')")


if __name__ == "__main__":
    main()
