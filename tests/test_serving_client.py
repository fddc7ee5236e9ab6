"""The policy client: metadata, chunks equal to the policy's own, server errors raised with their message
on a connection that stays usable, API keys, real-time chunking over the wire, and the async runner
driving a live server with RTC through an episode of PointObstacle."""

from __future__ import annotations

import threading
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("websockets")
pytest.importorskip("msgpack")

from fmpolicy.control import AsyncChunkRunner  # noqa: E402
from fmpolicy.errors import FmPolicyError, InputError  # noqa: E402
from fmpolicy.rtc import sample_chunk_rtc  # noqa: E402
from fmpolicy.serving import PolicyClient, PolicyServer, ServerConfig, ServerConnectionError, ServerError  # noqa: E402
from tests.test_control import point_policy  # noqa: E402
from tests.test_serving import CAM, client_obs, make_policy  # noqa: E402
from tests.test_serving_batch import expected  # noqa: E402


@pytest.fixture(scope="module")
def policy():
    return make_policy()


@pytest.fixture(scope="module")
def server(policy):
    srv = PolicyServer(policy, ServerConfig(port=0)).start()
    yield srv
    srv.stop()


def as_batch(obs: dict) -> dict:
    """A client observation as the policy takes it (one row)."""
    return {"observation.state": torch.as_tensor(obs["observation/state"])[None],
            CAM: torch.as_tensor(obs["observation/image"]).permute(2, 0, 1)[None].float() / 255.0,
            "task": [obs["prompt"]]}


def test_the_client_reads_the_metadata_and_gets_the_policys_own_chunks(server, policy):
    rng = np.random.default_rng(0)
    obs = {**client_obs(rng), "seed": 7}
    with PolicyClient("127.0.0.1", server.port) as client:
        assert client.metadata["chunk_size"] == 4 and client.metadata["cameras"] == [CAM]
        reply = client.infer(obs)
        chunk = client.infer_chunk(obs)
        batched = client.infer_chunk({"observation/state": rng.standard_normal((3, 2)).astype(np.float32),
                                      "observation/image": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8),
                                      "prompt": "go"})
    assert reply["actions"].shape == (4, 2) and "infer_ms" in reply["server_timing"]
    assert chunk.dtype == np.float32 and chunk.flags.writeable
    want = expected(policy, obs, 7)  # the policy alone, with the noise of seed 7
    np.testing.assert_allclose(chunk, want, rtol=2e-4, atol=1e-5)
    np.testing.assert_array_equal(reply["actions"], chunk)
    assert batched.shape == (3, 4, 2)


def test_a_refused_request_raises_the_servers_message_and_the_connection_stays_usable(server):
    rng = np.random.default_rng(1)
    with PolicyClient("127.0.0.1", server.port) as client:
        with pytest.raises(ServerError, match="InputError.*'observation.state' has width 5") as info:
            client.infer({**client_obs(rng), "observation/state": np.zeros(5, np.float32)})
        assert isinstance(info.value, FmPolicyError) and isinstance(info.value, RuntimeError)
        assert "Traceback" in info.value.server_message  # the server's whole text travels with it
        with pytest.raises(ServerError, match="'inference_delay' = 9"):
            client.infer_chunk(client_obs(rng), prev_chunk_left_over=np.zeros((4, 2), np.float32), inference_delay=9)
        with pytest.raises(InputError, match="without prev_chunk_left_over"):  # caught before sending
            client.infer_chunk(client_obs(rng), inference_delay=2)
        with pytest.raises(InputError, match="expected a dict"):
            client.infer(["not", "a", "dict"])
        assert client.infer_chunk(client_obs(rng)).shape == (4, 2)  # the same connection still serves


def test_an_api_key_is_required_when_set_and_a_lost_server_is_a_connection_error(policy):
    srv = PolicyServer(policy, ServerConfig(port=0, api_key="s3cret")).start()
    try:
        for key in (None, "wrong"):
            with pytest.raises(ServerConnectionError, match="HTTP 401.*API key"):
                PolicyClient("127.0.0.1", srv.port, api_key=key)
        client = PolicyClient("127.0.0.1", srv.port, api_key="s3cret")
        assert client.infer_chunk(client_obs(np.random.default_rng(2))).shape == (4, 2)
    finally:
        srv.stop()
    with pytest.raises(ServerConnectionError, match="closed.*new PolicyClient"):
        client.infer_chunk(client_obs(np.random.default_rng(2)))
    client.close()
    with pytest.raises(ServerConnectionError, match="cannot connect"):
        PolicyClient("127.0.0.1", srv.port, timeout=5)


def test_a_client_started_before_its_server_waits_for_it(policy):
    import socket

    with socket.socket() as s:  # a free port, for the server that is not there yet
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ServerConnectionError, match="kept trying for 0.3 s"):
        PolicyClient("127.0.0.1", port, wait_s=0.3, retry_s=0.1)
    assert time.monotonic() - start >= 0.2
    clients, errors = [], []

    def connect_early():
        try:
            clients.append(PolicyClient("127.0.0.1", port, wait_s=60, retry_s=0.05))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    early = threading.Thread(target=connect_early)
    early.start()
    time.sleep(0.3)  # the client is trying meanwhile
    assert early.is_alive() and not clients
    srv = PolicyServer(policy, ServerConfig(port=port)).start()
    try:
        early.join(60)
        assert errors == [] and len(clients) == 1
        assert clients[0].metadata["chunk_size"] == 4
        assert clients[0].infer_chunk(client_obs(np.random.default_rng(4))).shape == (4, 2)
        clients[0].close()
    finally:
        srv.stop()
    for bad in (-1, "5", True):
        with pytest.raises(InputError, match="wait_s"):
            PolicyClient("127.0.0.1", port, wait_s=bad)


def test_rtc_through_the_client_is_the_library_call_with_the_same_noise(server, policy):
    rng = np.random.default_rng(3)
    obs = {**client_obs(rng), "seed": 11}
    prev = np.array([[5.0, 4.0], [6.0, 3.0], [7.0, 2.0]], np.float32)
    with PolicyClient("127.0.0.1", server.port) as client:
        guided = client.infer_chunk(obs, prev_chunk_left_over=prev, inference_delay=2, execution_horizon=3)
        plain = client.infer_chunk(obs)
    noise = policy.sample_noise(1, torch.Generator().manual_seed(11))
    want = sample_chunk_rtc(policy, as_batch(obs), torch.as_tensor(prev)[None], 2, 3, noise=noise)[0].numpy()
    np.testing.assert_allclose(guided, want, rtol=2e-4, atol=1e-4)
    assert np.abs(guided - plain).max() > 1e-2  # the fields reached the server: guidance changed the chunk


def test_the_runner_answers_in_the_form_of_the_chunks_and_checks_its_rtc_settings():
    def predict(obs):  # numpy (h, a): position j -> obs + j
        return np.stack([obs + np.arange(6.0), -obs - np.arange(6.0)], axis=1).astype(np.float32)

    runner = AsyncChunkRunner(predict, n_action_steps=4, threshold=1)
    first = runner.act(0.0)
    assert isinstance(first, np.ndarray) and first.shape == (2,) and first.tolist() == [0.0, -0.0]
    runner.reset()
    with pytest.raises(InputError, match="aggregation='latest'"):
        AsyncChunkRunner(predict, 4, threshold=1, aggregation="ensemble", inference_delay=1)
    with pytest.raises(InputError, match="inference_delay = -1"):
        AsyncChunkRunner(predict, 4, threshold=1, inference_delay=-1)


def smooth_policy(sigma: float = 0.5, tau: float = 0.05):
    """A PointObstacle-sized policy whose flow is known in closed form: each action channel of a chunk is
    N(0, sigma^2 11^T + tau^2 I) over the h positions (a random level held for the whole chunk, plus a
    little jitter), so chunks are smooth and two independent chunks are far apart."""
    policy = point_policy()
    h = policy.config.chunk_size
    cov = sigma**2 * torch.ones(h, h) + tau**2 * torch.eye(h)

    def velocity(x, t, cache, valid):  # E[action - noise | x_t] with x_t = t action + (1 - t) noise
        t = t[:, None, None].to(x)
        eye = torch.eye(h).to(x)
        c = t**2 * cov.to(x) + (1 - t) ** 2 * eye  # (b, h, h): Cov(x_t)
        m = (t * cov.to(x) - (1 - t) * eye) @ torch.linalg.inv(c)
        return torch.einsum("bij,bja->bia", m, x)

    policy.net.velocity = velocity
    return policy


class Latency:
    """Wraps a chunk `predict` so that each inference takes exactly `d` control steps of the test's loop:
    the chunk is held until `tick` (called after every `act`) releases it, d steps after its request,
    and merged then. The first request, which the runner waits for, is not held. Records every call's
    arguments and chunk."""

    def __init__(self, predict, d: int):
        self.predict, self.d = predict, d
        self.calls: list[tuple[tuple, np.ndarray]] = []
        self.go = threading.Semaphore(0)

    def __call__(self, *args):
        chunk = self.predict(*args)
        self.calls.append((args, chunk))
        if len(self.calls) > 1:
            assert self.go.acquire(timeout=60), "the test loop never released the chunk"
        return chunk

    def tick(self, runner: AsyncChunkRunner) -> None:
        if runner.requested_at is not None and runner.step - runner.requested_at == self.d:
            self.go.release()
            runner.wait()


def run_episode(port: int, rtc: bool, d: int, steps: int = 40):
    """PointObstacle driven by the async runner against the server at `port`; -> (executed actions
    (T, a), the steps at which a new chunk took over, the Latency wrapper)."""
    import fmpolicy_envs  # noqa: F401

    env = gym.make("fmpolicy/PointObstacle-v0")
    obs, _ = env.reset(seed=5)
    actions = []
    with PolicyClient("127.0.0.1", port) as client:
        s = client.metadata["n_action_steps"]
        latency = Latency(client.infer_chunk, d)
        runner = AsyncChunkRunner(latency, n_action_steps=s, threshold=d, inference_delay=d if rtc else None)
        for step in range(steps):
            # a seed per step: each request its own noise, the same in both runs
            actions.append(runner.act({**obs, "seed": step}))
            latency.tick(runner)
            obs, _, terminated, truncated, _ = env.step(np.clip(actions[-1], -1.0, 1.0))
            if terminated or truncated:
                break
        assert list(runner.delays)[1:] == [d] * (len(runner.delays) - 1)  # each chunk took over d steps late
        runner.reset()
    # a chunk requested at step r takes over at r + d
    boundaries = [args[0]["seed"] + d for args, _ in latency.calls[1:] if args[0]["seed"] + d < len(actions)]
    return np.stack(actions), boundaries, latency


def test_the_async_runner_drives_a_live_server_with_rtc_and_the_chunk_boundaries_stay_smooth():
    d = 2
    srv = PolicyServer(smooth_policy(), ServerConfig(port=0)).start()
    try:
        naive, naive_at, _ = run_episode(srv.port, rtc=False, d=d)
        smooth, smooth_at, latency = run_episode(srv.port, rtc=True, d=d)
    finally:
        srv.stop()
    assert naive_at == smooth_at and len(smooth_at) >= 5  # chunks take over at the same steps in both runs
    # every request after the first sent the current chunk's actions from its step on, and the delay
    (_, first), *rest = latency.calls
    previous, start = first, 0
    for (obs, leftover, delay), chunk in rest:
        step = obs["seed"]
        np.testing.assert_array_equal(leftover, previous[step - start:])
        assert delay == d
        previous, start = chunk, step
    # jerk = |a_t - a_{t-1}|: at the steps where a new chunk takes over, and (naive) at all the others
    def jerk(actions: np.ndarray, at: list[int]) -> float:
        return float(np.mean([np.linalg.norm(actions[t] - actions[t - 1]) for t in at]))

    within = jerk(naive, [t for t in range(1, len(naive)) if t not in naive_at])
    assert jerk(naive, naive_at) > 3 * within  # switching to an independent chunk jumps (the premise)
    assert jerk(smooth, smooth_at) < 0.5 * jerk(naive, naive_at)  # RTC continues the executed chunk
