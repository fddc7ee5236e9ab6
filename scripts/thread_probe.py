#!/usr/bin/env python
"""What a second host thread costs torch on this CPU (libgomp's pools; docs/serving.md).

    python scripts/thread_probe.py [--calls 2000] [--chunks 40] [--threads N] [--json]

Times, with the machine's torch threads (or `--threads`), the median of `--calls` calls of one small
`nn.Linear(128, 512)` on an (11, 128) input (an expert step's size at batch 1), in five situations:
`main` (the main thread, nothing else), `other_thread` (a new thread, while the main thread's OpenMP
pool lives), `main_while_other_lives` (the main thread while another, now idle, thread that once ran
one element-wise op on a 224x224x3 tensor, i.e. one parallel region, is still alive),
`main_after_other_ended` (the same once that thread has ended) and `main_while_small_op_thread_lives`
(that thread's op too small for a parallel region). Then `bench_serving.py`'s policy
(`predict_action_chunk` at batch 1) over `--chunks` alternated calls: on the main thread
(`chunk_main`), on a new thread per call as `AsyncChunkRunner` makes them (`chunk_new_thread`), and
the same with one torch thread there, as `AsyncChunkRunner(..., threads=1)` sets it
(`chunk_new_thread_1_thread`); `--chunks 0` skips them. Prints a table, or one JSON object with `--json`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from fmpolicy.control import torch_threads
from fmpolicy.machine import cpu_model
from fmpolicy.scripting import load_script


def linear_us(calls: int) -> float:
    lin, x = torch.nn.Linear(128, 512), torch.randn(11, 128)
    times = []
    with torch.no_grad():
        for _ in range(200):
            lin(x)
        for _ in range(calls):
            start = time.perf_counter()
            lin(x)
            times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def on_new_thread(fn, *args):
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn(*args)))
    t.start()
    t.join()
    return out[0]


def with_other_thread(calls: int, big: bool) -> tuple[float, float]:
    """-> (main while a thread that ran one op is alive, main after it ended)."""
    ran, leave = threading.Event(), threading.Event()

    def other() -> None:
        x = torch.rand(224, 224, 3) if big else torch.rand(10, 3)
        (x * 255).to(torch.uint8)
        ran.set()
        leave.wait()

    t = threading.Thread(target=other)
    t.start()
    ran.wait()
    during = linear_us(calls)
    leave.set()
    t.join()
    return during, linear_us(calls)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=2000, help="nn.Linear calls per situation")
    p.add_argument("--chunks", type=int, default=40, help="policy chunks per thread (0: skip the policy)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads first (default: torch's own)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    r: dict = {"cpu": cpu_model(), "torch_threads": torch.get_num_threads(),
               "main_us": linear_us(args.calls), "other_thread_us": on_new_thread(linear_us, args.calls)}
    r["main_while_other_lives_us"], r["main_after_other_ended_us"] = with_other_thread(args.calls, True)
    r["main_while_small_op_thread_lives_us"], _ = with_other_thread(args.calls, False)
    if args.chunks:
        bench_serving = load_script("bench_serving", Path(__file__).resolve().parent)
        policy = bench_serving.make_policy()
        obs = bench_serving.bench_obs(policy)

        def chunk_ms() -> float:
            with torch.no_grad():
                start = time.perf_counter()
                policy.predict_action_chunk(obs)
                return 1000 * (time.perf_counter() - start)

        for _ in range(5):
            chunk_ms()
        def one_thread_chunk_ms() -> float:
            with torch_threads(1):  # as AsyncChunkRunner(threads=1) does on its worker thread
                return chunk_ms()

        times: dict[str, list[float]] = {"chunk_main_ms": [], "chunk_new_thread_ms": [],
                                         "chunk_new_thread_1_thread_ms": []}
        for _ in range(args.chunks):
            times["chunk_main_ms"].append(chunk_ms())
            times["chunk_new_thread_ms"].append(on_new_thread(chunk_ms))
            times["chunk_new_thread_1_thread_ms"].append(on_new_thread(one_thread_chunk_ms))
        r.update({k: statistics.median(v) for k, v in times.items()})
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{r['cpu']}, {r['torch_threads']} torch threads; nn.Linear(128, 512) on (11, 128), median of "
              f"{args.calls} calls:")
        for k, v in r.items():
            if k.endswith("_us"):
                print(f"  {k[:-3]:>34}: {v:8.1f} us")
            elif k.endswith("_ms"):
                print(f"  {k[:-3]:>34}: {v:8.2f} ms (policy chunk, median of {args.chunks})")
    return r


if __name__ == "__main__":
    main()
