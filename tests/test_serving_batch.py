"""The policy server's batching of simultaneous requests (one policy call for the requests that wait,
each client its own rows, a bad request failing alone) and real-time chunking over the protocol."""

from __future__ import annotations

import threading
import time
from contextlib import ExitStack

import numpy as np
import pytest
import torch

pytest.importorskip("websockets")
pytest.importorskip("msgpack")

from websockets.sync.client import connect  # noqa: E402

from fmpolicy.errors import ConfigError  # noqa: E402
from fmpolicy.rtc import sample_chunk_rtc  # noqa: E402
from fmpolicy.serving import PolicyServer, ServerConfig, packb, unpackb  # noqa: E402
from tests.test_serving import CAM, client_obs, make_policy  # noqa: E402

POISON = 999.0  # a state entry that passes the server's checks but makes GatedPolicy raise


class GatedPolicy:
    """Wraps a policy: records every call ("plain" predict_action_chunk / "rtc" through encode, with its
    rows), holds calls until `gate` is set, and raises on a row whose first state entry is POISON."""

    def __init__(self, policy):
        self._policy = policy
        self.calls: list[tuple[str, int]] = []
        self.threads: list[str] = []  # the name of the thread each call ran on
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def _hold(self, kind: str, obs) -> None:
        self.threads.append(threading.current_thread().name)
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        state = obs["observation.state"]
        self.calls.append((kind, state.shape[0]))
        if bool((state[:, 0] == POISON).any()):
            raise ValueError("poisoned row")

    def predict_action_chunk(self, obs, **kwargs):
        self._hold("plain", obs)
        return self._policy.predict_action_chunk(obs, **kwargs)

    def encode(self, obs):  # reached by sample_chunk_rtc only (predict_action_chunk encodes inside)
        self._hold("rtc", obs)
        return self._policy.encode(obs)


@pytest.fixture(scope="module")
def policy():
    return make_policy()


def expected(policy, obs: dict, seed: int) -> np.ndarray:
    """What the policy alone gives one client's request with the noise of `seed`."""
    batch = {"observation.state": torch.as_tensor(obs["observation/state"])[None],
             CAM: torch.as_tensor(obs["observation/image"]).permute(2, 0, 1)[None].float() / 255.0,
             "task": [obs["prompt"]]}
    noise = policy.sample_noise(1, torch.Generator().manual_seed(seed))
    return policy.predict_action_chunk(batch, noise=noise)[0].numpy()


def wait_for(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


class Clients:
    """Several connections to one server, each past the metadata frame."""

    def __init__(self, port: int, n: int):
        self.stack = ExitStack()
        self.ws = [self.stack.enter_context(connect(f"ws://127.0.0.1:{port}", compression=None, max_size=None))
                   for _ in range(n)]
        for ws in self.ws:
            unpackb(ws.recv())

    def close(self) -> None:
        self.stack.close()


@pytest.fixture()
def gated(policy):
    """(server, gated policy, clients): the server's first call is held until `gated.gate` is set."""
    made = []

    def make(n_clients: int, **config):
        wrapper = GatedPolicy(policy)
        srv = PolicyServer(wrapper, ServerConfig(port=0, **config)).start()
        clients = Clients(srv.port, n_clients)
        made.append((srv, wrapper, clients))
        return srv, wrapper, clients

    yield make
    for srv, wrapper, clients in made:
        wrapper.gate.set()
        clients.close()
        srv.stop()


def hold_first_call(srv, wrapper, clients, rng) -> dict:
    """Client 0 sends a request and the policy is held on it; -> the reply, once released, is read later."""
    obs = {**client_obs(rng), "seed": 1}
    clients.ws[0].send(packb(obs))
    assert wrapper.entered.wait(60)
    return obs


def test_requests_waiting_for_the_policy_are_one_call_and_each_client_gets_its_own_rows(gated, policy):
    srv, wrapper, clients = gated(3)
    rng = np.random.default_rng(0)
    hold_first_call(srv, wrapper, clients, rng)
    # two clients, different states and tasks, the same seed: any difference comes from the inputs
    obs = [{**client_obs(rng), "seed": 7}, {**client_obs(rng), "prompt": "go to the blue goal", "seed": 7}]
    for ws, o in zip(clients.ws[1:], obs):
        ws.send(packb(o))
    wait_for(lambda: len(srv._pending) == 2, "both requests to wait for the policy")
    wrapper.gate.set()
    first = unpackb(clients.ws[0].recv())
    replies = [unpackb(ws.recv()) for ws in clients.ws[1:]]
    assert wrapper.calls == [("plain", 1), ("plain", 2)] and (srv.calls, srv.rows) == (2, 3)
    assert first["server_timing"]["batch_size"] == 1
    for o, reply in zip(obs, replies):
        timing = reply["server_timing"]
        assert timing["batch_size"] == 2 and timing["batch_requests"] == 2
        assert timing["queue_ms"] >= 0 and timing["total_ms"] >= timing["infer_ms"] > 0
        # the wait splits into decoding it and queueing; its call and the rest follow within total_ms
        assert 0 < timing["decode_ms"] <= timing["queue_ms"] <= timing["total_ms"] - timing["infer_ms"]
        assert reply["actions"].shape == (4, 2)
        # batched = the policy alone on this client's observation with the same noise, to float rounding
        np.testing.assert_allclose(reply["actions"], expected(policy, o, 7), rtol=2e-4, atol=1e-4)
    assert np.abs(replies[0]["actions"] - replies[1]["actions"]).max() > 1e-2  # routed, not swapped or shared


def test_without_a_seed_each_row_of_a_batch_gets_its_own_noise(gated):
    srv, wrapper, clients = gated(3)
    rng = np.random.default_rng(1)
    hold_first_call(srv, wrapper, clients, rng)
    obs = client_obs(rng)  # the very same observation from two clients
    for ws in clients.ws[1:]:
        ws.send(packb(obs))
    wait_for(lambda: len(srv._pending) == 2, "both requests to wait")
    wrapper.gate.set()
    clients.ws[0].recv()
    a, b = (unpackb(ws.recv())["actions"] for ws in clients.ws[1:])
    assert wrapper.calls[-1] == ("plain", 2) and np.abs(a - b).max() > 1e-3


def test_a_bad_request_fails_alone_while_the_others_in_its_batch_succeed(gated, policy):
    srv, wrapper, clients = gated(5)
    rng = np.random.default_rng(2)
    hold_first_call(srv, wrapper, clients, rng)
    # caught by the checks on arrival: answered at once, while the policy is still busy
    clients.ws[1].send(packb({**client_obs(rng), "observation/state": np.array([np.nan, 0.0], np.float32)}))
    answer = clients.ws[1].recv(timeout=60)
    assert isinstance(answer, str) and "InputError" in answer and "non-finite" in answer
    assert wrapper.calls == []  # the held call has not even finished
    # passes the checks, fails inside the policy: the batch is retried one request at a time
    good = [{**client_obs(rng), "seed": 3}, {**client_obs(rng), "seed": 4}]
    poisoned = {**client_obs(rng), "observation/state": np.array([POISON, 0.0], np.float32)}
    for ws, o in zip(clients.ws[2:], (good[0], poisoned, good[1])):
        ws.send(packb(o))
    wait_for(lambda: len(srv._pending) == 3, "three requests to wait")
    wrapper.gate.set()
    clients.ws[0].recv()
    first, error, second = unpackb(clients.ws[2].recv()), clients.ws[3].recv(), unpackb(clients.ws[4].recv())
    assert isinstance(error, str) and "poisoned row" in error
    assert wrapper.calls == [("plain", 1), ("plain", 3), ("plain", 1), ("plain", 1), ("plain", 1)]
    for o, reply in zip(good, (first, second)):
        np.testing.assert_allclose(reply["actions"], expected(policy, o, o["seed"]), rtol=2e-4, atol=1e-4)
    clients.ws[3].send(packb(client_obs(rng)))  # the failed client's connection still works
    assert unpackb(clients.ws[3].recv())["actions"].shape == (4, 2)


def test_incompatible_requests_run_in_separate_calls_and_max_batch_caps_the_rows(gated):
    srv, wrapper, clients = gated(6, max_batch=3)
    rng = np.random.default_rng(3)
    hold_first_call(srv, wrapper, clients, rng)
    leftover = {"prev_chunk_left_over": np.zeros((4, 2), np.float32), "inference_delay": 1}
    batched = {"observation/state": rng.standard_normal((2, 2)).astype(np.float32),
               "observation/image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), "prompt": "go"}
    sends = [client_obs(rng), {**client_obs(rng), **leftover}, batched, client_obs(rng), {**client_obs(rng), **leftover}]
    for ws, o in zip(clients.ws[1:], sends):
        ws.send(packb(o))
    wait_for(lambda: len(srv._pending) == 5, "five requests to wait")
    wrapper.gate.set()
    shapes = [unpackb(ws.recv())["actions"].shape for ws in clients.ws]
    assert shapes == [(4, 2), (4, 2), (4, 2), (2, 4, 2), (4, 2), (4, 2)]
    # oldest first: plain 1 + batched 2 fill max_batch = 3, the RTC pair is one call, the last plain alone
    assert wrapper.calls == [("plain", 1), ("plain", 3), ("rtc", 2), ("plain", 1)]


def test_max_batch_1_serves_one_request_per_call(gated):
    srv, wrapper, clients = gated(3, max_batch=1)
    rng = np.random.default_rng(4)
    hold_first_call(srv, wrapper, clients, rng)
    for ws in clients.ws[1:]:
        ws.send(packb(client_obs(rng)))
    wait_for(lambda: len(srv._pending) == 2, "both requests to wait")
    wrapper.gate.set()
    for ws in clients.ws:
        assert unpackb(ws.recv())["server_timing"]["batch_size"] == 1
    assert wrapper.calls == [("plain", 1)] * 3


def test_a_batch_window_gathers_requests_that_arrive_while_the_policy_is_idle(gated):
    srv, wrapper, clients = gated(2, max_batch=2, batch_window_ms=60_000)
    wrapper.gate.set()  # nothing held: only the window makes the first request wait for the second
    rng = np.random.default_rng(5)
    for ws in clients.ws:
        ws.send(packb(client_obs(rng)))
    for ws in clients.ws:
        assert unpackb(ws.recv())["server_timing"]["batch_requests"] == 2
    assert wrapper.calls == [("plain", 2)]  # the full batch ends the window at once


def test_the_window_closes_once_every_connected_client_has_a_request_waiting(gated):
    # max_batch has room for all of them: only the count of connected clients can end this window early
    srv, wrapper, clients = gated(3, max_batch=16, batch_window_ms=60_000)
    wrapper.gate.set()
    rng = np.random.default_rng(6)
    for ws in clients.ws:
        ws.send(packb(client_obs(rng)))
    for ws in clients.ws:
        timing = unpackb(ws.recv(timeout=30))["server_timing"]  # a 60 s window would time out here
        assert timing["batch_requests"] == 3
    assert wrapper.calls == [("plain", 3)]


def test_a_connected_client_without_a_request_keeps_the_window_open_until_it_ends(gated):
    srv, wrapper, clients = gated(3, max_batch=16, batch_window_ms=1_500)
    wrapper.gate.set()
    rng = np.random.default_rng(7)
    for ws in clients.ws[:2]:  # the third client stays silent: its request could still come
        ws.send(packb(client_obs(rng)))
    for ws in clients.ws[:2]:
        timing = unpackb(ws.recv(timeout=30))["server_timing"]
        assert timing["batch_requests"] == 2
        assert timing["queue_ms"] >= 1_000  # the window ran (a lower bound on a wait: robust to load)
    clients.ws[2].close()  # once it is gone, the two requests no longer wait for it
    wait_for(lambda: srv._connections == 2, "the server to see the third client leave")
    clients.ws[0].send(packb(client_obs(rng)))
    clients.ws[1].send(packb(client_obs(rng)))
    for ws in clients.ws[:2]:
        assert unpackb(ws.recv(timeout=30))["server_timing"]["queue_ms"] < 1_000
    assert [n for _, n in wrapper.calls] == [2, 2]


def test_rtc_over_the_protocol_is_the_library_call_and_plain_requests_are_unchanged(policy):
    srv = PolicyServer(policy, ServerConfig(port=0)).start()
    rng = np.random.default_rng(6)
    obs = {**client_obs(rng), "seed": 11}
    prev = np.array([[5.0, 4.0], [6.0, 3.0], [7.0, 2.0]], np.float32)
    try:
        with connect(f"ws://127.0.0.1:{srv.port}") as ws:
            unpackb(ws.recv())
            ws.send(packb({**obs, "prev_chunk_left_over": prev, "inference_delay": np.int64(2), "execution_horizon": 3}))
            guided = unpackb(ws.recv())["actions"]
            ws.send(packb(obs))
            plain = unpackb(ws.recv())["actions"]
    finally:
        srv.stop()
    batch = {"observation.state": torch.as_tensor(obs["observation/state"])[None],
             CAM: torch.as_tensor(obs["observation/image"]).permute(2, 0, 1)[None].float() / 255.0,
             "task": [obs["prompt"]]}
    noise = policy.sample_noise(1, torch.Generator().manual_seed(11))
    want = sample_chunk_rtc(policy, batch, torch.as_tensor(prev)[None], 2, 3, noise=noise)[0].numpy()
    np.testing.assert_allclose(guided, want, rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(plain, expected(policy, obs, 11), rtol=2e-4, atol=1e-4)
    assert np.abs(guided - plain).max() > 1e-2


def test_requests_are_checked_on_the_host_without_touching_the_policys_device_tensors(policy):
    """The event loop checks requests while the policy computes: on a GPU, reading a device tensor there
    would wait for the running call. So `prepare` keeps the batch on the host and reads no device-side
    table (here the embodiment tables are meta tensors, which cannot be read at all)."""
    import copy

    blind = copy.deepcopy(policy)
    blind.embodiments.state_dims = blind.embodiments.state_dims.to("meta")
    blind.embodiments.action_dims = blind.embodiments.action_dims.to("meta")
    srv = PolicyServer(blind, ServerConfig(port=0))
    rng = np.random.default_rng(7)
    prev = np.zeros((3, 2), np.float32)
    for obs in (client_obs(rng), {**client_obs(rng), "prev_chunk_left_over": prev, "inference_delay": 1}):
        request = srv.prepare(obs)
        assert request.width == 2 and request.rows == 1
        assert all(v.device.type == "cpu" for v in request.batch.values() if isinstance(v, torch.Tensor))
        assert request.rtc is None or request.rtc[0].device.type == "cpu"
    with pytest.raises(RuntimeError, match="meta"):  # the tables really are unreadable
        int(blind.embodiments.state_dims.max())
    # nor does the policy's own call read them for one robot (on a GPU: no wait before the solve)
    assert blind.embodiments.width(torch.zeros(1, dtype=torch.long, device="meta"), "action") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_policy_on_cuda_is_served_and_its_chunks_equal_the_policy_alone(policy):
    import copy

    cuda = copy.deepcopy(policy).to("cuda")
    srv = PolicyServer(cuda, ServerConfig(port=0)).start()
    rng = np.random.default_rng(8)
    obs = [{**client_obs(rng), "seed": i} for i in range(3)]
    clients = Clients(srv.port, 3)
    try:
        for ws, o in zip(clients.ws, obs):
            ws.send(packb(o))
        replies = [unpackb(ws.recv(timeout=120))["actions"] for ws in clients.ws]
    finally:
        clients.close()
        srv.stop()
    for reply, o, i in zip(replies, obs, range(3)):
        np.testing.assert_allclose(reply, expected(policy, o, i), rtol=1e-3, atol=1e-3)  # CPU vs GPU kernels


def test_rtc_pulls_the_committed_prefix_to_the_previous_chunk():
    """With a flow whose velocity is known in closed form (independent N(0, 0.5^2) action entries in
    network units), the committed positions land near the previous chunk's actions, and positions
    past the execution horizon are exactly the plain sample."""
    policy = make_policy()

    def gaussian(x, t, cache, valid):
        t = t[:, None, None]
        var = t**2 * 0.25 + (1 - t) ** 2
        return t * 0.25 / var * x - (1 - t) / var * x

    policy.net.velocity = gaussian
    srv = PolicyServer(policy, ServerConfig(port=0, rtc_max_guidance_weight=20.0)).start()
    b, rng = 16, np.random.default_rng(7)
    obs = {"observation/state": rng.standard_normal((b, 2)).astype(np.float32),
           "observation/image": rng.integers(0, 256, (b, 32, 32, 3), dtype=np.uint8), "prompt": "go", "seed": 3}
    idx = torch.zeros(b, dtype=torch.long)
    # the previous chunk: 1.5 prior standard deviations off in network units, as robot units
    prev = policy.embodiments.unnormalize_action(torch.full((b, 4, policy.config.expert.max_action_dim), 0.75), idx, 2).numpy()
    try:
        with connect(f"ws://127.0.0.1:{srv.port}") as ws:
            unpackb(ws.recv())
            ws.send(packb({**obs, "prev_chunk_left_over": prev, "inference_delay": 2, "execution_horizon": 3}))
            guided = unpackb(ws.recv())["actions"]
            ws.send(packb(obs))
            plain = unpackb(ws.recv())["actions"]
    finally:
        srv.stop()
    assert guided.shape == plain.shape == (b, 4, 2)
    err_guided = np.abs(guided[:, :2] - prev[:, :2]).mean()
    err_plain = np.abs(plain[:, :2] - prev[:, :2]).mean()
    assert err_guided < 0.2 * err_plain
    np.testing.assert_allclose(guided[:, 3:], plain[:, 3:], rtol=0, atol=1e-5)  # weight 0 past the horizon


def test_bad_rtc_fields_and_seeds_get_errors_naming_them(policy):
    srv = PolicyServer(policy, ServerConfig(port=0)).start()
    rng = np.random.default_rng(8)
    obs = client_obs(rng)
    prev = np.zeros((4, 2), np.float32)
    cases = [({"inference_delay": 1}, "'inference_delay' = 1 was sent without 'prev_chunk_left_over'"),
             ({"prev_chunk_left_over": np.zeros((4, 3), np.float32)}, "'prev_chunk_left_over' has shape (4, 3)"),
             ({"prev_chunk_left_over": np.zeros((5, 2), np.float32)}, "1 <= n <= 4"),
             ({"prev_chunk_left_over": prev, "inference_delay": 5}, "'inference_delay' = 5: expected an int in [0, 4]"),
             ({"prev_chunk_left_over": prev, "execution_horizon": 2, "inference_delay": 3}, "in [0, 2]"),
             ({"prev_chunk_left_over": prev, "inference_delay": 1.5}, "'inference_delay' = 1.5"),
             ({"prev_chunk_left_over": prev * np.nan}, "non-finite"),
             ({"seed": -1}, "'seed' = -1"), ({"seed": "x"}, "'seed' = 'x'")]
    try:
        with connect(f"ws://127.0.0.1:{srv.port}") as ws:
            unpackb(ws.recv())
            for extra, words in cases:
                ws.send(packb({**obs, **extra}))
                answer = ws.recv()
                assert isinstance(answer, str) and "InputError" in answer and words in answer, (extra, answer[-300:])
            ws.send(packb(obs))
            assert unpackb(ws.recv())["actions"].shape == (4, 2)
    finally:
        srv.stop()


def test_serve_forever_runs_the_policy_calls_on_its_own_thread_until_stop(policy):
    """On CPU a policy call from a thread other than the one that loaded the policy is slower (libgomp),
    so `serve_forever()` runs the calls itself while the event loop stays on the server's thread."""
    wrapper = GatedPolicy(policy)
    wrapper.gate.set()
    srv = PolicyServer(wrapper, ServerConfig(port=0)).start()
    serving = threading.Thread(target=srv.serve_forever, name="serving")
    serving.start()
    clients = None
    try:
        wait_for(lambda: srv.pumping == 1, "serve_forever to take the calls")
        clients = Clients(srv.port, 2)
        rng = np.random.default_rng(0)
        for _ in range(3):
            obs = [{**client_obs(rng), "seed": i} for i in range(2)]
            for ws, o in zip(clients.ws, obs):
                ws.send(packb(o))
            for ws, o, i in zip(clients.ws, obs, range(2)):
                np.testing.assert_allclose(unpackb(ws.recv())["actions"], expected(policy, o, i), rtol=2e-4, atol=1e-4)
        assert len(wrapper.threads) >= 3 and set(wrapper.threads) == {"serving"}
    finally:
        if clients is not None:
            clients.close()
        srv.stop()
    serving.join(10)
    assert not serving.is_alive() and srv.pumping == 0


def test_a_pump_that_leaves_hands_the_calls_back_and_no_request_is_stranded(policy):
    wrapper = GatedPolicy(policy)
    wrapper.gate.set()
    srv = PolicyServer(wrapper, ServerConfig(port=0)).start()
    with pytest.raises(RuntimeError, match="not running"):
        PolicyServer(policy).pump()
    clients = Clients(srv.port, 1)
    rng = np.random.default_rng(1)
    try:
        leave = threading.Event()
        pumping = threading.Thread(target=srv.pump, kwargs={"until": leave, "poll_s": 0.01}, name="pump")
        pumping.start()
        wait_for(lambda: srv.pumping == 1, "the pump to start")
        clients.ws[0].send(packb(client_obs(rng)))
        unpackb(clients.ws[0].recv())
        assert wrapper.threads == ["pump"]
        leave.set()
        pumping.join(10)
        clients.ws[0].send(packb(client_obs(rng)))
        unpackb(clients.ws[0].recv())
        assert wrapper.threads[-1] not in ("pump", threading.current_thread().name)  # the worker thread
        # the pump leaves while a call waits in its queue (it takes 0.3 s to see `until`, and a second
        # request is queued meanwhile): that call goes to the worker thread instead of being stranded
        class SlowToLeave:
            def __init__(self):
                self.leaving = False

            def is_set(self):
                if self.leaving:
                    time.sleep(0.3)
                return self.leaving

        wrapper.gate.clear()
        wrapper.entered.clear()
        leave = SlowToLeave()
        pumping = threading.Thread(target=srv.pump, kwargs={"until": leave}, name="pump")
        pumping.start()
        wait_for(lambda: srv.pumping == 1, "the pump to start")
        two = Clients(srv.port, 2)
        two.ws[0].send(packb(client_obs(rng)))
        assert wrapper.entered.wait(60)  # the pump holds the first request's call
        two.ws[1].send(packb(client_obs(rng)))
        time.sleep(0.1)  # the second request is read and waits for the policy
        leave.leaving = True
        wrapper.gate.set()
        for ws in two.ws:
            assert unpackb(ws.recv(timeout=60))["actions"].shape == (4, 2)
        two.close()
        pumping.join(10)
        assert wrapper.threads[-2] == "pump" and wrapper.threads[-1] != "pump"
        # pumps come and go while one client sends back to back: every request is answered
        sent, stop = 40, threading.Event()
        replies = []

        def send_all():
            for _ in range(sent):
                clients.ws[0].send(packb(client_obs(rng)))
                replies.append(unpackb(clients.ws[0].recv(timeout=60)))
            stop.set()

        sender = threading.Thread(target=send_all)
        sender.start()
        pumps = 0
        while not stop.is_set():
            leave = threading.Event()
            pumping = threading.Thread(target=srv.pump, kwargs={"until": leave, "poll_s": 0.002})
            pumping.start()
            time.sleep(0.002 * (1 + pumps % 5))
            leave.set()
            pumping.join(10)
            pumps += 1
        sender.join(60)
        assert not sender.is_alive() and len(replies) == sent and pumps > 1
        assert all(r["actions"].shape == (4, 2) for r in replies)
    finally:
        clients.close()
        srv.stop()


def test_a_pump_interrupted_in_a_call_hands_it_to_the_worker_thread(policy):
    """Ctrl-C reaches the pumping thread (the main one) in the middle of a policy call: the call is run
    again on the worker thread, and its client still gets its chunk."""

    class InterruptOnce(GatedPolicy):
        def predict_action_chunk(self, obs, **kwargs):
            if threading.current_thread().name == "pump" and not self.calls:
                self.calls.append(("interrupted", 0))
                raise KeyboardInterrupt
            return super().predict_action_chunk(obs, **kwargs)

    wrapper = InterruptOnce(policy)
    wrapper.gate.set()
    srv = PolicyServer(wrapper, ServerConfig(port=0)).start()
    clients = Clients(srv.port, 1)
    caught = []

    def pump():
        try:
            srv.pump()
        except KeyboardInterrupt:
            caught.append(True)

    try:
        pumping = threading.Thread(target=pump, name="pump")
        pumping.start()
        wait_for(lambda: srv.pumping == 1, "the pump to start")
        obs = {**client_obs(np.random.default_rng(9)), "seed": 3}
        clients.ws[0].send(packb(obs))
        reply = unpackb(clients.ws[0].recv(timeout=60))
        pumping.join(10)
        assert caught == [True] and srv.pumping == 0
        np.testing.assert_allclose(reply["actions"], expected(policy, obs, 3), rtol=2e-4, atol=1e-4)
        assert wrapper.threads and wrapper.threads[-1] != "pump"  # served by the worker thread
    finally:
        clients.close()
        srv.stop()


def test_bad_batching_settings_are_config_errors():
    for kwargs, name in (({"max_batch": 0}, "max_batch"), ({"max_batch": 2.0}, "max_batch"),
                         ({"batch_window_ms": -1}, "batch_window_ms"), ({"rtc_schedule": "cosine"}, "rtc_schedule"),
                         ({"rtc_max_guidance_weight": 0}, "rtc_max_guidance_weight")):
        with pytest.raises(ConfigError, match=name):
            ServerConfig(**kwargs)
