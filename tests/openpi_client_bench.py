"""Client side of scripts/bench_serving.py, run with the openpi-client venv's python: N requests through
the real `WebsocketClientPolicy`, each observation with two 224x224 uint8 images; prints one JSON line
of per-request round-trip and server times in ms (the policy call that served the request, the request's
wait in the server's queue, the part of that wait spent decoding it, the server's whole handling of it),
and the rows of that policy call.

    <openpi venv>/bin/python tests/openpi_client_bench.py PORT REQUESTS WARMUP
"""

import json
import sys
import time

import numpy as np
from openpi_client import websocket_client_policy


def main() -> None:
    port, requests, warmup = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", port)
    rng = np.random.default_rng(port)
    obs = {"observation/state": rng.standard_normal(8).astype(np.float32),
           "observation/image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
           "observation/wrist_image": rng.integers(0, 256, (224, 224, 3), dtype=np.uint8),
           "prompt": "pick up the red block"}
    rtt, infer, batch, queue, decode, total = [], [], [], [], [], []
    for i in range(warmup + requests):
        start = time.perf_counter()
        reply = client.infer(obs)
        ms = 1000 * (time.perf_counter() - start)
        if i >= warmup:
            rtt.append(ms)
            infer.append(reply["server_timing"]["infer_ms"])
            batch.append(reply["server_timing"].get("batch_size", 1))
            queue.append(reply["server_timing"]["queue_ms"])
            decode.append(reply["server_timing"]["decode_ms"])
            total.append(reply["server_timing"]["total_ms"])
    print(json.dumps({"rtt_ms": rtt, "infer_ms": infer, "batch_size": batch, "queue_ms": queue,
                      "decode_ms": decode, "total_ms": total}))


if __name__ == "__main__":
    main()
