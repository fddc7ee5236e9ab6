"""The whole fixed-grid solve as one `torch.compile` graph: every step, from the noise to the chunk.

`FlowPolicy.compile_velocity()` compiles the expert step: each of a chunk's steps is still one Python
call into the compiled step, through torchdiffeq's solver loop. `CompiledSolver` compiles the loop too
(`fmpolicy.sampling.solve_fixed_grid` over the expert's `velocity`, given the observation's
`ExpertCache`): the steps are unrolled into one graph, so that a chunk costs one call, with no Python
between the steps, and the time conditioning of every step computed in one projection
(`fmpolicy.cuda_graphs.solve_expert`). At batch 1, where a
small expert's step costs little more than its calls, that is the difference (`python
scripts/bench.py --only compile`, rows `compiled` and `compiled_solve`).

One compiled graph per method, step count, and shape / dtype / device of the solve's inputs (noise,
action mask, state token, attention mask, MLP conditioning, prefix keys / values: the same list that
`fmpolicy.cuda_graphs` copies into its static tensors), made by torch.compile's own guards: a new
batch size or prefix length compiles again (seconds to a minute) unless `dynamic=True` is passed.
The weights are read where they are, so updates in place (an optimizer step, `load_state_dict`) are
seen by the next call. Chunks agree with the eager solve to float rounding (fused kernels sum in
another order).

RTC's guided solve (`fmpolicy.rtc`: at every step a network pass and a vector-Jacobian product
through it) is compiled the same way by `solve_guided`, as a function of its own (its own graphs and
recompile limit): the product goes through `torch.func.vjp`, which dynamo traces into the graph, where
`torch.autograd.grad` would break it. On the 2-core CPU that makes an RTC chunk 2.8x faster than the
eager one at batch 1 and 1.5x at 64 (`scripts/bench.py --only rtc`).

Switched on by `FlowPolicy.compile_solve()` (CPU and CUDA); used by `sample_chunk` /
`predict_action_chunk` / `select_action` for the fixed-grid methods in eval mode. With
`enable_cuda_graphs()` on as well, the graphs replay the solve instead (combine those with
`compile_velocity()`). On CUDA, `compile_solve(mode="reduce-overhead")` asks torch.compile for its own
CUDA graphs of the solve (not yet run on a GPU here: tests/test_compile.py has the CUDA test).

torch.compile keeps at most `torch._dynamo.config.recompile_limit` graphs of one function (8 by
default) across the policies of a process; past that it runs the solve uncompiled (the same chunks,
eager speed) and logs a warning.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from fmpolicy.cuda_graphs import flatten_solve_inputs, solve_expert, unflatten_solve_inputs
from fmpolicy.model import ExpertCache
from fmpolicy.rtc import PrefixGuidance
from fmpolicy.sampling import NFE_PER_STEP, fixed_grid


class CompiledSolver:
    """Fixed-grid solves of a velocity network through one `torch.compile`d function (module docstring).

    The step is the network class's own `velocity` (not an instance attribute that
    `compile_velocity` may have set: the whole solve is compiled here, the step inside it too). A
    deep copy (of the policy) gets the copied network and compiles its own graphs.
    """

    def __init__(self, net: nn.Module, **compile_kwargs: Any):
        compile_kwargs.setdefault("dynamic", False)
        self.net, self.compile_kwargs = net, compile_kwargs
        self._solve = torch.compile(self._run, **compile_kwargs)
        self._guided = torch.compile(self._run_guided, **compile_kwargs)  # its own graphs (and recompile limit)

    def __deepcopy__(self, memo: dict) -> "CompiledSolver":
        return CompiledSolver(copy.deepcopy(self.net, memo), **self.compile_kwargs)

    def _run(self, tensors: list[Tensor | None], grid: Tensor, layers: int, method: str, num_steps: int) -> Tensor:
        x0, valid, cache = unflatten_solve_inputs(tensors, layers)
        step = type(self.net).velocity.__get__(self.net)  # the class's own step: compiled here, with the rest
        return solve_expert(self.net, x0, valid, cache, method, num_steps, step, grid)

    def _run_guided(self, tensors: list[Tensor | None], grid: Tensor, layers: int, method: str, num_steps: int,
                    target: Tensor, weights: Tensor, max_weight: float) -> Tensor:
        x0, valid, cache = unflatten_solve_inputs(tensors, layers)
        step = type(self.net).velocity.__get__(self.net)
        guide = PrefixGuidance(target, weights, max_weight)
        return solve_expert(self.net, x0, valid, cache, method, num_steps, step, grid,
                            guide=lambda velocity: guide.wrap(velocity, functional=True))

    @torch.no_grad()
    def solve(self, cache: ExpertCache, valid: Tensor | None, x0: Tensor, method: str, num_steps: int) -> Tensor:
        """x1 (b, h, A) of the fixed-grid solve from the noise `x0`."""
        _check(method, num_steps)
        # the grid comes from outside the graph: a compiled linspace may round its points otherwise
        grid = fixed_grid(num_steps, x0)
        return self._solve(flatten_solve_inputs(x0, valid, cache), grid, len(cache.prefix_kv or []), method, num_steps)

    @torch.no_grad()
    def solve_guided(self, cache: ExpertCache, valid: Tensor | None, x0: Tensor, method: str, num_steps: int,
                     guidance: PrefixGuidance) -> Tensor:
        """x1 (b, h, A) of the fixed-grid solve from `x0` with RTC's guidance (`fmpolicy.rtc`): every step's
        network pass and vector-Jacobian product (`torch.func.vjp`) in the one compiled graph. beta
        (`guidance.max_weight`) is a constant of the graph: another value compiles again."""
        _check(method, num_steps)
        grid = fixed_grid(num_steps, x0)
        return self._guided(flatten_solve_inputs(x0, valid, cache), grid, len(cache.prefix_kv or []), method,
                            num_steps, guidance.target, guidance.weights, float(guidance.max_weight))


def _check(method: str, num_steps: int) -> None:
    if method not in NFE_PER_STEP:
        raise ValueError(f"sampler method {method!r} cannot be compiled as a whole solve: expected one of "
                         f"the fixed-grid methods {list(NFE_PER_STEP)}")
    if num_steps < 1:
        raise ValueError(f"num_steps = {num_steps} is invalid: expected a positive int")
