#!/usr/bin/env python
"""What the policy server adds to a chunk: openpi-client round trips on localhost against
`predict_action_chunk` alone, with 1, 2 and 4 clients at once.

    python scripts/bench_serving.py [--clients 1,2,4] [--requests 200] [--json]
        [--client-python .venv-openpi/bin/python]

The policy: the `cpu` expert preset with a vision_text encoder over two 224x224 cameras (the tower
at its tiny test width) and an instruction, chunk 10 x 7, batch 1, 10 Euler steps. Each client is a
separate process running the real openpi-client (`tests/openpi_client_bench.py`, in the venv `make
test` creates) and sends two 224x224 uint8 images, an 8-d state and a prompt per request.

Per request: the round trip measured by the client, and the server's own `infer_ms` (the
`predict_action_chunk` call). Overhead = round trip - infer_ms: decoding, image conversion, the
websocket and msgpack both ways, and with several clients the wait for the one policy (requests are
served one at a time). Prints a table (median and p99 in ms) and, with --json, one JSON object per row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config
from fmpolicy.config import EncoderConfig
from fmpolicy.machine import cpu_model
from fmpolicy.serving import PolicyServer, ServerConfig

ROOT = Path(__file__).resolve().parents[1]
CLIENT = ROOT / "tests" / "openpi_client_bench.py"


def make_policy() -> FlowPolicy:
    cams = ("observation.images.top", "observation.images.wrist")
    enc = EncoderConfig(kind="vision_text", cameras=cams, image_size=224, vision_patch_size=32, out_dim=128,
                        max_text_tokens=16)
    cfg = PolicyConfig(state_dim=8, action_dim=7, chunk_size=10, n_action_steps=5, device="cpu",
                       expert=make_expert_config("cpu", prefix_dim=128), encoder=enc,
                       normalization=NormalizationConfig(state="identity", action="identity"))
    return FlowPolicy(cfg).eval()


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,2,4", help="numbers of simultaneous clients, comma separated")
    p.add_argument("--requests", type=int, default=200, help="timed requests per client")
    p.add_argument("--warmup", type=int, default=10, help="untimed requests per client first")
    p.add_argument("--client-python", default=str(ROOT / ".venv-openpi" / "bin" / "python"),
                   help="a python with openpi-client installed (make test creates .venv-openpi)")
    p.add_argument("--json", action="store_true", help="also print one JSON object per row")
    args = p.parse_args(argv)
    if not Path(args.client_python).exists():
        sys.exit(f"error: {args.client_python} does not exist: run `make test` once, or pass --client-python")

    torch.manual_seed(0)
    server = PolicyServer(make_policy(), ServerConfig(port=0)).start()
    rows = []
    try:
        for n in (int(c) for c in args.clients.split(",")):
            procs = [subprocess.Popen([args.client_python, str(CLIENT), str(server.port), str(args.requests),
                                       str(args.warmup)], stdout=subprocess.PIPE, text=True) for _ in range(n)]
            outs = [json.loads(proc.communicate(timeout=1800)[0].strip().splitlines()[-1]) for proc in procs]
            rtt = np.concatenate([o["rtt_ms"] for o in outs])
            infer = np.concatenate([o["infer_ms"] for o in outs])
            over = rtt - infer
            rows.append({"clients": n, "requests": int(len(rtt)), "infer_ms_median": float(np.median(infer)),
                         "rtt_ms_median": float(np.median(rtt)), "rtt_ms_p99": float(np.percentile(rtt, 99)),
                         "overhead_ms_median": float(np.median(over)), "overhead_ms_p99": float(np.percentile(over, 99)),
                         "cpu": cpu_model(), "threads": torch.get_num_threads()})
    finally:
        server.stop()
    print(f"{'clients':>7} {'requests':>8} {'infer ms':>9} {'round trip ms':>14} {'p99':>7} "
          f"{'overhead ms':>12} {'p99':>7}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['infer_ms_median']:>9.2f} {r['rtt_ms_median']:>14.2f} "
              f"{r['rtt_ms_p99']:>7.2f} {r['overhead_ms_median']:>12.2f} {r['overhead_ms_p99']:>7.2f}")
    if args.json:
        for r in rows:
            print(json.dumps(r))
    return rows


if __name__ == "__main__":
    main()
