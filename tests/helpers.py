"""Small helpers shared by the tests."""

from __future__ import annotations

import torch


def randomized(net: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Give every parameter random values: the zero-initialised gates of a fresh expert would
    otherwise hide the conditioning paths that the tests must see."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net.eval()


def load_script(name: str):
    """Import `scripts/<name>.py` as a module (scripts are not a package), to call its `main(argv)`."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
