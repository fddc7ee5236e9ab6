"""Small helpers shared by the tests."""

from __future__ import annotations

import copy

import torch


def randomized(net: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter random values: the zero-initialised gates of a fresh expert would
    otherwise hide the conditioning paths that the tests must see."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def in_float64(*items):
    """Float64 copies of the modules, float tensors and dicts of them in `items` (the rest passes through).

    For tests that two ways of computing the same value agree: another batch size, a sub-batch, a
    cached prefix against recomputing it, another kernel or thread count. In float32 such pairs sum
    in different orders and differ by a few ulps of the *intermediate* sums, which the float32
    defaults of `assert_close` (rtol 1.3e-6) do not bound: a per-sample loss of ~30 differed by 2.5e-6
    relative on an AMD EPYC, and a velocity entry of 0.12 in a row of magnitude ~40 by 1e-4 relative.
    In float64 that rounding is ~1e-15, so the float64 defaults (rtol 1e-7) leave room for every CPU
    and still catch any real difference (a padded entry or a masked token leaking in).
    """

    def convert(x):
        if isinstance(x, torch.nn.Module):
            return copy.deepcopy(x).double()
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return x.double()
        if isinstance(x, dict):  # a batch or an observation
            return {k: convert(v) for k, v in x.items()}
        return x

    out = tuple(convert(x) for x in items)
    return out[0] if len(out) == 1 else out


def load_script(name: str):
    """Import `scripts/<name>.py` as a module (scripts are not a package), to call its `main(argv)`."""
    from pathlib import Path

    from fmpolicy.scripting import load_script as load

    return load(name, Path(__file__).resolve().parents[1] / "scripts")


def cut_after_checkpoint(run, step: int, later: int) -> None:
    """Make the finished imitation run folder `run` look killed right after its step-`step` checkpoint:
    the step-`later` checkpoint and the final policy removed, `last.json` pointing at `step`."""
    import json
    import shutil

    shutil.rmtree(run / "checkpoints" / f"step_{later:08d}")
    shutil.rmtree(run / "policy")
    (run / "checkpoints" / "last.json").write_text(json.dumps({"step": step, "path": f"step_{step:08d}"}))
