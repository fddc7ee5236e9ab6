"""Training checkpoints: written atomically, found again by `--resume`.

Layout under a run directory:

    run/config.yaml                       the whole run config (checked on resume)
    run/checkpoints/step_00000500/
        policy/                           save_pretrained of the policy (EMA weights when enabled)
        training_state.pt                 raw weights, optimiser, scheduler, EMA, sampler and RNG states
    run/checkpoints/last.json             {"step": 500, "path": "step_00000500"}, replaced atomically
    run/policy/                           the final policy

A checkpoint directory is assembled under a temporary name and renamed into place, and `last.json`
is replaced only afterwards: a run killed at any moment resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from fmpolicy.errors import CheckpointError

LAST = "last.json"
STATE_FILE = "training_state.pt"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, fsync it, and rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(run_dir: Path, step: int, policy, training_state: dict[str, Any], keep: int) -> Path:
    """Write `checkpoints/step_<step>/` (policy + training state), point last.json at it, prune old ones."""
    ckpt_root = Path(run_dir) / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ckpt_root))
    try:
        policy.save_pretrained(tmp / "policy")
        torch.save(training_state, tmp / STATE_FILE)
        final = ckpt_root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json_atomic(ckpt_root / LAST, {"step": step, "path": name})
    for old in sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def find_last_checkpoint(run_dir: Path) -> Path | None:
    """The directory that last.json names, or None when the run has no checkpoint yet."""
    last = Path(run_dir) / "checkpoints" / LAST
    if not last.is_file():
        return None
    try:
        info = json.loads(last.read_text())
        path = last.parent / info["path"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{last} is unreadable ({e}): expected {{'step': N, 'path': 'step_...'}}") from e
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{last} names {path}, which has no {STATE_FILE}")
    return path


def load_training_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path / STATE_FILE} cannot be read: {e}") from e


def diff_configs(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: saved {a!r}, now {b!r}")
    return out
