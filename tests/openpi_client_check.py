"""Run by tests/test_serving.py with the *real* openpi-client, in its own small virtual env (it pins
numpy < 2): connect to our server, drive it through `ActionChunkBroker`, print one JSON line.

    <openpi venv>/bin/python tests/openpi_client_check.py PORT API_KEY STEPS CHUNK_SIZE

(Not collected by pytest: its name does not start with test_.)
"""

import json
import sys

import numpy as np
from openpi_client import action_chunk_broker, msgpack_numpy, websocket_client_policy


def main() -> None:
    port, api_key, steps, horizon = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    client = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", port, api_key=api_key)
    broker = action_chunk_broker.ActionChunkBroker(client, action_horizon=horizon)
    rng = np.random.default_rng(0)
    obs = {"observation/state": rng.standard_normal(2).astype(np.float32),
           "observation/image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
           "prompt": "go to the red goal"}
    actions = [broker.infer(obs)["actions"].tolist() for _ in range(steps)]
    chunk = client.infer(obs)
    try:  # a bad request: the server answers with a text frame, which the client raises
        client.infer({"observation/image": obs["observation/image"]})
        error = None
    except RuntimeError as e:
        error = str(e)
    after = client.infer(obs)["actions"].shape  # the connection is still usable
    # real-time chunking through the same client: the previous chunk's leftover and the delay ride along
    leftover = chunk["actions"][2:]
    rtc = client.infer({**obs, "prev_chunk_left_over": leftover, "inference_delay": 1, "seed": 5})["actions"]
    # the packers agree byte for byte (so any openpi client decodes what we send, and the reverse)
    sample = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(1.5), "t": "x"}
    print(json.dumps({
        "metadata": client.get_server_metadata(), "actions": actions, "chunk_shape": list(chunk["actions"].shape),
        "server_timing": chunk["server_timing"], "error": error, "after_error_shape": list(after),
        "rtc_actions": rtc.tolist(), "rtc_leftover": leftover.tolist(),
        "packed_sample": msgpack_numpy.packb(sample).hex(),
    }))


if __name__ == "__main__":
    main()
