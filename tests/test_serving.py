"""The policy server: openpi's wire format, metadata first, actions in robot units, errors as text
frames on a connection that stays usable, API keys, several clients, and the real openpi-client."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("websockets")
pytest.importorskip("msgpack")

from websockets.exceptions import InvalidStatus  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config  # noqa: E402
from fmpolicy.config import EncoderConfig  # noqa: E402
from fmpolicy.errors import ConfigError, InputError  # noqa: E402
from fmpolicy.serving import PolicyServer, ServerConfig, packb, read_records, unpackb  # noqa: E402
from tests.helpers import randomized  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAM = "observation.images.top"


def make_policy() -> FlowPolicy:
    """A tiny image + instruction policy whose action normalizer is not the identity (robot units)."""
    enc = EncoderConfig(kind="vision_text", image_size=32, vision_patch_size=8, out_dim=32, max_text_tokens=12)
    cfg = PolicyConfig(state_dim=2, action_dim=2, chunk_size=4, n_action_steps=2, device="cpu",
                       expert=make_expert_config("tiny", prefix_dim=32), encoder=enc,
                       normalization=NormalizationConfig(state="mean_std", action="mean_std"))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0)
    g = torch.Generator().manual_seed(1)
    policy.fit_normalization(torch.randn(64, 2, generator=g), 5.0 + 3.0 * torch.randn(64, 4, 2, generator=g))
    return policy.eval()


@pytest.fixture(scope="module")
def policy() -> FlowPolicy:
    return make_policy()


@pytest.fixture()
def server(policy):
    srv = PolicyServer(policy, ServerConfig(port=0)).start()
    yield srv
    srv.stop()


def client_obs(rng: np.random.Generator) -> dict:
    return {"observation/state": rng.standard_normal(2).astype(np.float32),
            "observation/image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "prompt": "go to the red goal"}


def test_the_wire_format_round_trips_arrays_and_scalars_and_refuses_objects():
    data = {"f32": np.arange(12, dtype=np.float32).reshape(3, 4), "u8": np.zeros((2, 2, 3), np.uint8),
            "b": np.array([True, False]), "i64": np.int64(7), "f": np.float64(0.25), "s": "text", "l": [1, 2.5]}
    back = unpackb(packb(data))
    for k in ("f32", "u8", "b"):
        assert back[k].dtype == data[k].dtype and np.array_equal(back[k], data[k])
    assert back["i64"] == 7 and back["i64"].dtype == np.int64 and back["f"] == 0.25
    assert back["s"] == "text" and back["l"] == [1, 2.5]
    with pytest.raises(TypeError, match="dtype object"):
        packb({"x": np.array([{}, 1], dtype=object)})


def test_metadata_first_then_actions_in_robot_units_equal_to_the_policy_alone(server, policy):
    rng = np.random.default_rng(0)
    obs = client_obs(rng)
    with connect(f"ws://127.0.0.1:{server.port}", compression=None, max_size=None) as ws:
        meta = unpackb(ws.recv())
        assert meta["chunk_size"] == 4 and meta["action_dim"] == 2 and meta["cameras"] == [CAM]
        torch.manual_seed(5)
        ws.send(packb(obs))
        reply = unpackb(ws.recv())
    torch.manual_seed(5)
    expected = policy.predict_action_chunk({
        "observation.state": torch.as_tensor(obs["observation/state"])[None],
        CAM: torch.as_tensor(obs["observation/image"]).permute(2, 0, 1)[None].float() / 255.0,
        "task": [obs["prompt"]]})[0]
    assert reply["actions"].shape == (4, 2) and reply["actions"].dtype == np.float32
    # the policy's own output (robot units: predict_action_chunk undoes the action normalizer)
    np.testing.assert_allclose(reply["actions"], expected.numpy(), rtol=0, atol=1e-6)
    assert reply["server_timing"]["infer_ms"] > 0 and reply["server_timing"]["total_ms"] >= reply["server_timing"]["infer_ms"]


def test_a_bad_request_gets_a_text_error_and_the_connection_stays_usable(server):
    rng = np.random.default_rng(1)
    with connect(f"ws://127.0.0.1:{server.port}") as ws:
        unpackb(ws.recv())
        for bad, words in (({"observation/image": client_obs(rng)["observation/image"]}, "has no state"),
                           ({**client_obs(rng), "observation/state": np.zeros(5, np.float32)}, "state"),
                           ({**client_obs(rng), "observation/image": np.zeros((32, 32), np.uint8)}, "shape"),
                           ({**client_obs(rng), "observation/image": np.zeros((32, 32, 3), np.int16)}, "dtype int16"),
                           ({**client_obs(rng), "observation/image": np.full((32, 32, 3), 2.0, np.float32)},
                            "expected float images in [0, 1]"),
                           (["not", "a", "dict"], "expected a dict")):
            ws.send(packb(bad))
            answer = ws.recv()
            assert isinstance(answer, str) and "InputError" in answer and words in answer
        ws.send(b"\x00garbage")
        assert "not a msgpack observation" in ws.recv()
        ws.send("a text frame")
        assert "binary msgpack frame" in ws.recv()
        ws.send(packb(client_obs(rng)))
        assert unpackb(ws.recv())["actions"].shape == (4, 2)


def test_uint8_images_stay_uint8_until_the_policy_call_and_float_images_give_the_same_actions(policy):
    # the division by 255 happens once per stacked call inside the encoder, not per request on the
    # event loop; the actions are those of the same images sent as floats in [0, 1]
    server = PolicyServer(policy, ServerConfig())
    obs = client_obs(np.random.default_rng(4))
    request = server.prepare(obs)
    assert request.batch[CAM].dtype == torch.uint8 and request.batch[CAM].shape == (1, 3, 32, 32)
    as_float = {**obs, "observation/image": obs["observation/image"].astype(np.float32) / 255.0}
    assert server.prepare(as_float).batch[CAM].dtype == torch.float32
    np.testing.assert_allclose(server.infer({**obs, "seed": 7})["actions"],
                               server.infer({**as_float, "seed": 7})["actions"], rtol=0, atol=1e-6)


def test_batched_requests_get_batched_actions(server):
    rng = np.random.default_rng(2)
    obs = {"observation/state": rng.standard_normal((3, 2)).astype(np.float32),
           "observation/image": rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8), "prompt": "go"}
    with connect(f"ws://127.0.0.1:{server.port}") as ws:
        unpackb(ws.recv())
        ws.send(packb(obs))
        assert unpackb(ws.recv())["actions"].shape == (3, 4, 2)


def test_an_api_key_is_required_when_set(policy):
    srv = PolicyServer(policy, ServerConfig(port=0, api_key="s3cret")).start()
    try:
        for headers in (None, {"Authorization": "Api-Key wrong"}):
            with pytest.raises(InvalidStatus) as info:
                connect(f"ws://127.0.0.1:{srv.port}", additional_headers=headers)
            assert info.value.response.status_code == 401
        with connect(f"ws://127.0.0.1:{srv.port}", additional_headers={"Authorization": "Api-Key s3cret"}) as ws:
            assert unpackb(ws.recv())["chunk_size"] == 4
        # openpi's health check answers without the key (and without a websocket); other paths need it
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/healthz", timeout=30) as reply:
            assert reply.status == 200 and reply.read() == b"OK\n"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/", timeout=30)
        assert info.value.code == 401
        info.value.close()  # its connection, which the server would otherwise wait for when it stops
    finally:
        srv.stop()


def test_several_clients_are_served_at_once(server):
    results, errors = [], []

    def run(seed: int) -> None:
        try:
            rng = np.random.default_rng(seed)
            with connect(f"ws://127.0.0.1:{server.port}") as ws:
                unpackb(ws.recv())
                for _ in range(4):
                    ws.send(packb(client_obs(rng)))
                    results.append(unpackb(ws.recv())["actions"].shape)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and results == [(4, 2)] * 16


def test_the_serve_script_serves_a_saved_policy_and_refuses_a_bad_one(policy, tmp_path):
    policy.save_pretrained(tmp_path / "policy")
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve_policy.py"), "--policy",
                             str(tmp_path / "policy"), "--port", "0", "--device", "cpu", "--steps", "2",
                             "--map", "cam=observation.images.top", "--max-batch", "3", "--batch-window-ms", "1",
                             "--compile", "solve", "--threads", "1", "--record", str(tmp_path / "rec")],
                            # the warm-up compiles the whole solve, plain and guided
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        warm = [proc.stdout.readline() for _ in range(2)]  # the default --warmup 1: plain, then RTC
        assert warm[0].startswith("warm-up: batch 1 ") and warm[1].startswith("warm-up: batch 1 with RTC"), \
            proc.stderr.read() if proc.poll() is not None else warm
        line = proc.stdout.readline()
        assert "serving" in line, proc.stderr.read() if proc.poll() is not None else line
        assert "1 torch threads" in line
        port = int(line.split("ws://127.0.0.1:")[1].split()[0])
        rng = np.random.default_rng(3)
        obs = client_obs(rng)
        obs["cam"] = obs.pop("observation/image")  # through the --map entry
        with connect(f"ws://127.0.0.1:{port}") as ws:
            meta = unpackb(ws.recv())
            assert meta["key_map"]["cam"] == CAM and meta["max_batch"] == 3
            ws.send(packb(obs))
            actions = unpackb(ws.recv())["actions"]
            assert actions.shape == (4, 2)
    finally:
        proc.terminate()  # SIGTERM: the script stops as on Ctrl-C and writes its recording out
        proc.wait(30)
    assert proc.returncode == 0, proc.stderr.read()
    (record,) = read_records(tmp_path / "rec")
    assert np.array_equal(record["request"]["cam"], obs["cam"]) and np.array_equal(record["reply"]["actions"], actions)
    graphs = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve_policy.py"), "--policy", str(tmp_path / "policy"),
                             "--device", "cpu", "--bf16", "--cuda-graphs"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert graphs.returncode != 0 and "Traceback" not in graphs.stderr and "CUDA graphs need a CUDA device" in graphs.stderr
    (tmp_path / "policy" / "model.safetensors").write_bytes(b"junk")
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve_policy.py"), "--policy", str(tmp_path / "policy")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "CheckpointError" not in bad.stderr and "model.safetensors" in bad.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve_policy.py"), "--policy", str(tmp_path / "policy"),
                          "--max-batch", "0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "max_batch = 0" in bad.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve_policy.py"), "--policy", str(tmp_path / "policy"),
                          "--threads", "0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "--threads 0: expected an int >= 1" in bad.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve_policy.py"), "--policy", str(tmp_path / "policy"),
                          "--warmup", "1,two"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2 and "--warmup '1,two'" in bad.stderr


def test_the_warm_up_compiles_what_real_requests_then_use_and_counts_no_calls(policy):
    """After `warmup((1, 2))` a compiled server answers real requests at those batch sizes, plain and
    RTC, without compiling anything (dynamo's graph count stays, and it is told to raise on a
    recompilation)."""
    import copy

    from fmpolicy import SamplerConfig

    compiled = copy.deepcopy(policy).compile_solve()
    # 2 steps: each graph unrolls the solve, and compiling 4 of them at 10 steps takes minutes
    srv = PolicyServer(compiled, ServerConfig(max_batch=4), sampler=SamplerConfig(method="euler", num_steps=2))
    timings = srv.warmup((1, 2))
    assert [(t["batch"], t["rtc"]) for t in timings] == [(1, False), (1, True), (2, False), (2, True)]
    assert srv.calls == 0 and srv.rows == 0
    rng = np.random.default_rng(0)
    obs = client_obs(rng)
    two = {"observation/state": rng.standard_normal((2, 2)).astype(np.float32),
           "observation/image": rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), "prompt": ["left", "right"]}
    before = {"solve": compiled._compiled_solve.solve, "solve_guided": compiled._compiled_solve.solve_guided}
    used = []
    for name, method in before.items():
        setattr(compiled._compiled_solve, name, lambda *a, _m=method, _n=name, **k: used.append(_n) or _m(*a, **k))
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]  # graphs dynamo has made in this process so far
    torch._dynamo.config.error_on_recompile = True
    try:
        assert srv.infer(obs)["actions"].shape == (4, 2)
        rtc = {**obs, "prev_chunk_left_over": rng.standard_normal((3, 2)).astype(np.float32), "inference_delay": 2}
        assert srv.infer(rtc)["actions"].shape == (4, 2)
        assert srv.infer(two)["actions"].shape == (2, 4, 2)
        two_rtc = {**two, "prev_chunk_left_over": rng.standard_normal((2, 2, 2)).astype(np.float32)}
        assert srv.infer(two_rtc)["actions"].shape == (2, 4, 2)
    finally:
        torch._dynamo.config.error_on_recompile = False
    assert used == ["solve", "solve_guided", "solve", "solve_guided"] and srv.calls == 4
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled for the real requests
    with pytest.raises(InputError, match="warm-up batch size 5"):
        srv.warmup((5,))


def test_a_recording_holds_every_answered_request_and_its_reply_and_goes_on_after_a_restart(policy, tmp_path):
    from fmpolicy.errors import LockError

    rec = tmp_path / "rec"
    srv = PolicyServer(policy, ServerConfig(port=0, record_dir=str(rec))).start()
    rng = np.random.default_rng(5)
    sent, got = [], []
    try:
        with pytest.raises(LockError, match="recording"):  # one writer per recording
            PolicyServer(policy, ServerConfig(port=0, record_dir=str(rec))).start()
        with connect(f"ws://127.0.0.1:{srv.port}") as a, connect(f"ws://127.0.0.1:{srv.port}") as b:
            for ws in (a, b):
                unpackb(ws.recv())
            for ws in (a, b, a):
                obs = {**client_obs(rng), "seed": len(sent)}
                ws.send(packb(obs))
                got.append(unpackb(ws.recv())["actions"])
                sent.append(obs)
            a.send(packb({"observation/state": np.zeros(5, np.float32)}))  # refused: not recorded
            assert isinstance(a.recv(), str)
    finally:
        srv.stop()
    records = list(read_records(rec))
    assert [r["connection"] for r in records] == [0, 1, 0]
    for r, obs, actions in zip(records, sent, got):
        assert set(r["request"]) == set(obs) and r["request"]["prompt"] == obs["prompt"]
        assert np.array_equal(r["request"]["observation/image"], obs["observation/image"])
        assert np.array_equal(r["reply"]["actions"], actions) and r["reply"]["server_timing"]["infer_ms"] > 0
    assert records[0]["time"] <= records[1]["time"] <= records[2]["time"]
    srv = PolicyServer(policy, ServerConfig(port=0, record_dir=str(rec))).start()  # the lock went with the server
    try:
        with connect(f"ws://127.0.0.1:{srv.port}") as ws:
            unpackb(ws.recv())
            ws.send(packb(client_obs(rng)))
            unpackb(ws.recv())
    finally:
        srv.stop()
    names = sorted(p.name for p in rec.iterdir() if not p.name.startswith("."))
    assert names == [f"{i:08d}.msgpack" for i in range(4)]  # numbering goes on; nothing overwritten
    with pytest.raises(ConfigError, match="record_dir"):
        ServerConfig(record_dir="")


def test_a_recording_that_cannot_be_written_stops_with_one_message_and_serving_goes_on(policy, tmp_path, capsys,
                                                                                        monkeypatch):
    import fmpolicy.serving.record as record

    writes = []

    def failing_write(path, write):
        writes.append(path)
        if len(writes) >= 2:
            raise OSError(28, "No space left on device")
        return record_write(path, write)

    record_write = record.atomic_write
    monkeypatch.setattr(record, "atomic_write", failing_write)
    srv = PolicyServer(policy, ServerConfig(port=0, record_dir=str(tmp_path / "rec"))).start()
    rng = np.random.default_rng(6)
    try:
        with connect(f"ws://127.0.0.1:{srv.port}") as ws:
            unpackb(ws.recv())
            for _ in range(4):
                ws.send(packb(client_obs(rng)))
                assert unpackb(ws.recv())["actions"].shape == (4, 2)  # serving goes on
    finally:
        srv.stop()
    assert len(list(read_records(tmp_path / "rec"))) == 1 and len(writes) == 2  # stopped at the failure
    assert capsys.readouterr().err.count("No space left on device") == 1


def test_bad_server_settings_are_config_errors():
    with pytest.raises(ConfigError, match="port"):
        ServerConfig(port=70000)
    with pytest.raises(ConfigError, match="api_key"):
        ServerConfig(api_key="")


def test_the_real_openpi_client_drives_the_server_through_its_chunk_broker(policy):
    """openpi-client pins numpy < 2, so it runs in its own venv (`make test` makes it and sets
    OPENPI_CLIENT_PYTHON)."""
    python = os.environ.get("OPENPI_CLIENT_PYTHON")
    if not python or not Path(python).exists():
        pytest.skip("OPENPI_CLIENT_PYTHON is not set: `make test` creates the openpi-client venv")
    srv = PolicyServer(policy, ServerConfig(port=0, api_key="k")).start()
    try:
        out = subprocess.run([python, str(ROOT / "tests" / "openpi_client_check.py"), str(srv.port), "k", "5", "2"],
                             capture_output=True, text=True, timeout=120)
    finally:
        srv.stop()
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["metadata"]["chunk_size"] == 4 and result["chunk_shape"] == [4, 2]
    actions = np.array(result["actions"])  # one action per broker step: chunks of 4, 2 used each
    assert actions.shape == (5, 2) and np.isfinite(actions).all()
    assert not np.allclose(actions[0], actions[1])  # steps of one chunk differ
    assert "InputError" in result["error"] and result["after_error_shape"] == [4, 2]
    assert "infer_ms" in result["server_timing"] and result["server_timing"]["batch_size"] == 1
    rtc = np.array(result["rtc_actions"])
    assert rtc.shape == (4, 2) and np.isfinite(rtc).all()
    sample = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.float64(1.5), "t": "x"}
    assert packb(sample).hex() == result["packed_sample"]


def test_the_serving_benchmark_runs_the_real_client_and_refuses_a_missing_gpu(tmp_path):
    python = os.environ.get("OPENPI_CLIENT_PYTHON")
    if not python or not Path(python).exists():
        pytest.skip("OPENPI_CLIENT_PYTHON is not set: `make test` creates the openpi-client venv")
    script = ROOT / "scripts" / "bench_serving.py"
    out = subprocess.run([sys.executable, str(script), "--clients", "1", "--requests", "3", "--warmup", "1",
                          "--modes", "off,protocol", "--bf16", "--compile", "--client-python", python, "--out",
                          str(tmp_path / "b.json")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    row, floor = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert row["requests"] == 3 and row["bf16"] and row["compile"] == "step" and row["device"] == "cpu"
    # the round trip holds the policy call: it is never shorter than the server's own time for it
    assert row["rtt_ms_median"] >= row["infer_ms_median"] > 0
    # the bare protocol server answers without a policy call, so its round trip is all overhead
    assert floor["batching"] == "protocol" and floor["infer_ms_median"] == 0 and floor["requests"] == 3
    assert floor["rtt_ms_median"] == floor["overhead_ms_median"] > 0
    if not torch.cuda.is_available():
        bad = subprocess.run([sys.executable, str(script), "--device", "cuda", "--client-python", python],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert bad.returncode != 0 and "Traceback" not in bad.stderr and "CUDA is not available" in bad.stderr
