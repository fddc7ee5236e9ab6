"""Fixed-grid sampling replayed from CUDA graphs: one launch per chunk instead of one per kernel.

A 10-step Euler solve of the transformer expert launches hundreds of small kernels; at batch 1 on a GPU
the launches, not the arithmetic, set the latency. `GraphedSolver` captures the whole solve (every
step, from the noise to x1, given the observation's `ExpertCache`) once per input signature in a
`torch.cuda.CUDAGraph` and replays it: the inputs are copied into the graph's own (static) tensors,
the graph runs, and its output is copied out (a later replay overwrites the static output, never a
chunk already returned).

A signature is the method, the step count and the shape, dtype and device of every tensor that the
solve reads (noise, action mask, state token, prefix keys / values, attention mask, MLP conditioning):
a new batch size or prefix length captures a new graph (the first call at it costs a few warm-up
solves and the capture), at most `max_graphs` of them are kept (least recently used dropped). The
graph reads the weights where they are: updates in place (an optimizer step, `load_state_dict`) are
seen by the next replay; moving or converting the policy (`.to`) drops every graph
(`FlowPolicy._apply`).

Switched on by `FlowPolicy.enable_cuda_graphs()` (CUDA only); used by `sample_chunk` /
`predict_action_chunk` / `select_action` for the fixed-grid methods in eval mode. Outputs agree with
the eager solve to float rounding (`solve_fixed_grid` against torchdiffeq's odeint).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fmpolicy.model import ExpertCache
from fmpolicy.sampling import NFE_PER_STEP, Velocity, fixed_grid, solve_fixed_grid, stage_times

BACKENDS = ("cuda", "eager")
WARMUP_SOLVES = 2  # solves on a side stream before capture (cuBLAS / cuDNN pick and allocate their workspaces)


def flatten_solve_inputs(x0: Tensor, valid: Tensor | None, cache: ExpertCache) -> list[Tensor | None]:
    """Every tensor the solve reads, in a fixed order: x0, valid, state_token, attn_mask, cond, then the
    prefix keys and values layer by layer (also what `fmpolicy.compiled.CompiledSolver` passes)."""
    kv = [t for pair in (cache.prefix_kv or []) for t in pair]
    return [x0, valid, cache.state_token, cache.attn_mask, cache.cond, *kv]


def unflatten_solve_inputs(tensors: list[Tensor | None], layers: int) -> tuple[Tensor, Tensor | None, ExpertCache]:
    x0, valid, state_token, attn_mask, cond, *kv = tensors
    prefix_kv = [(kv[2 * i], kv[2 * i + 1]) for i in range(layers)] if layers else None
    return x0, valid, ExpertCache(state_token=state_token, prefix_kv=prefix_kv, attn_mask=attn_mask, cond=cond)


def solve_expert(net: nn.Module, x0: Tensor, valid: Tensor | None, cache: ExpertCache, method: str, num_steps: int,
                 step: Callable[..., Tensor] | None = None, grid: Tensor | None = None,
                 guide: Callable[[Velocity], Velocity] | None = None) -> Tensor:
    """The fixed-grid solve of an expert network from the noise `x0`: -> x1, in x0's dtype.

    `step(x, t, cache, valid[, time_cond])`: the network's `velocity` (default `net.velocity`, which
    `FlowPolicy.compile_velocity` may have replaced by a compiled one), run in the weights' dtype (the
    expert may compute in bf16 on float32 chunks). A network with `time_conditioning` (the
    transformer) gets it for every evaluation time of the solve from one projection, made here, and
    each step reads its row: the same values as computing it per step, up to float rounding. `guide`
    wraps the velocity (RTC's guidance: `fmpolicy.compiled.CompiledSolver.solve_guided`).
    """
    grid = fixed_grid(num_steps, x0) if grid is None else grid
    step = net.velocity if step is None else step
    compute = next(net.parameters()).dtype
    conditioning = getattr(net, "time_conditioning", None)
    if conditioning is None:
        def velocity(x: Tensor, t: Tensor) -> Tensor:
            return step(x.to(compute), t, cache, valid).to(x.dtype)
    else:
        table = conditioning(stage_times(method, grid))  # tensors (n, 1, d), row i for the i-th call
        calls = [0]

        def velocity(x: Tensor, t: Tensor) -> Tensor:
            i = calls[0]
            calls[0] += 1
            return step(x.to(compute), t, cache, valid, [m[i:i + 1] for m in table]).to(x.dtype)
    return solve_fixed_grid(velocity if guide is None else guide(velocity), x0, method, num_steps, grid)


def _signature(method: str, num_steps: int, tensors: list[Tensor | None]) -> tuple:
    return (method, num_steps, tuple(None if t is None else (tuple(t.shape), t.dtype, str(t.device))
                                     for t in tensors))


@dataclass
class _Entry:
    """One captured solve: its static inputs and output, and the graph (None with the eager backend)."""

    inputs: list[Tensor | None]
    output: Tensor
    run: Callable[[], Tensor]
    graph: "torch.cuda.CUDAGraph | None"


class GraphedSolver:
    """Fixed-grid solves of a velocity network captured as CUDA graphs, one per input signature (module
    docstring).

    `net.velocity(x_t, t, cache, valid[, time_cond])` is the step, looked up when a graph is captured
    (so a step replaced by `FlowPolicy.compile_velocity` is captured compiled); the solve is
    `solve_expert`'s (the time conditioning of every step in one projection, captured too). A deep
    copy (of the policy) gets the copied network and no graphs. `backend="eager"` keeps the same static
    tensors and copies but re-runs the solve on them instead of replaying a graph: what tests on a
    machine without CUDA check the bookkeeping with.
    """

    def __init__(self, net: nn.Module, max_graphs: int = 8, backend: str = "cuda"):
        if backend not in BACKENDS:
            raise ValueError(f"backend = {backend!r} is unknown: expected one of {list(BACKENDS)}")
        if max_graphs < 1:
            raise ValueError(f"max_graphs = {max_graphs} is invalid: expected a positive int")
        self.net, self.max_graphs, self.backend = net, max_graphs, backend
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.captures = 0  # graphs captured so far (a new signature, or one dropped and seen again)

    def __deepcopy__(self, memo: dict) -> "GraphedSolver":
        return GraphedSolver(copy.deepcopy(self.net, memo), self.max_graphs, self.backend)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Drop every graph (and the memory its pool holds)."""
        self._entries.clear()

    @torch.no_grad()
    def solve(self, cache: ExpertCache, valid: Tensor | None, x0: Tensor, method: str, num_steps: int) -> Tensor:
        """x1 (b, h, A) of the fixed-grid solve from the noise `x0`; a fresh tensor, never the graph's own."""
        if method not in NFE_PER_STEP:
            raise ValueError(f"sampler method {method!r} cannot be captured: CUDA graphs replay the "
                             f"fixed-grid methods {list(NFE_PER_STEP)} only")
        tensors = flatten_solve_inputs(x0, valid, cache)
        key = _signature(method, num_steps, tensors)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._capture(tensors, len(cache.prefix_kv or []), method, num_steps)
            self._entries[key] = entry
            while len(self._entries) > self.max_graphs:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        for static, new in zip(entry.inputs, tensors):
            if static is not None:
                static.copy_(new)
        if entry.graph is not None:
            entry.graph.replay()
            return entry.output.clone()
        return entry.run().clone()

    def _capture(self, tensors: list[Tensor | None], layers: int, method: str, num_steps: int) -> _Entry:
        inputs = [None if t is None else t.clone() for t in tensors]
        x0, valid, cache = unflatten_solve_inputs(inputs, layers)

        def run() -> Tensor:
            return solve_expert(self.net, x0, valid, cache, method, num_steps)

        self.captures += 1
        if self.backend == "eager":
            return _Entry(inputs=inputs, output=run(), run=run, graph=None)
        side = torch.cuda.Stream(device=x0.device)
        side.wait_stream(torch.cuda.current_stream(x0.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_SOLVES):
                run()
        torch.cuda.current_stream(x0.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = run()
        return _Entry(inputs=inputs, output=output, run=run, graph=graph)
