"""Training checkpoints: written atomically, found again by `--resume`, pruned only among the run's own.

Layout under a run folder:

    run/checkpoints/step_00000500/
        policy/                           save_pretrained of the policy (EMA weights when enabled)
        training_state.pt                 raw weights, optimiser, scheduler, EMA, sampler and RNG states
    run/checkpoints/last.json             {"step": 500, "path": "step_00000500"}, replaced atomically

A checkpoint directory is assembled under a temporary name and renamed into place
(`fmpolicy.io.atomic_directory`), and `last.json` is replaced only afterwards: a run killed at any
moment resumes from the last complete checkpoint. What a kill can leave behind (a temporary
directory, a temporary `last.json`, a complete `step_*` that `last.json` does not name yet) is removed
when the run is next opened (`Checkpoints.open`).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from fmpolicy.errors import CheckpointError
from fmpolicy.io import atomic_directory, atomic_write_json

LAST = "last.json"
STATE_FILE = "training_state.pt"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_root: Path) -> dict[int, Path]:
    """{step: directory} of the complete-looking `step_*` directories under `ckpt_root`."""
    out = {}
    if ckpt_root.is_dir():
        for p in ckpt_root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                out[int(m.group(1))] = p
    return dict(sorted(out.items()))


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


class Checkpoints:
    """The checkpoints of one run lineage under `<run>/checkpoints`, at most `keep` of them kept.

    Pruning removes only checkpoints this run wrote (or inherited from the run it resumes), never
    anything else a folder might hold.
    """

    def __init__(self, run_dir: Path, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.written: list[Path] = []  # oldest first

    def open(self, resume_step: int | None) -> list[Path]:
        """Tidy what a killed writer left and adopt the lineage's checkpoints up to `resume_step`
        (None: a fresh run, which adopts nothing). Returns what was removed. Call under the run's lock."""
        removed: list[Path] = []
        if self.root.is_dir():  # every hidden entry here is a writer's temporary (older versions: no .tmp suffix)
            for p in self.root.glob(".*"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(p)
        if resume_step is not None:
            for step, path in list_checkpoints(self.root).items():
                if step <= resume_step:
                    self.written.append(path)
                else:  # renamed into place but never named by last.json: the resumed run writes it again
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed

    def save(self, step: int, policy, training_state: dict[str, Any]) -> Path:
        """Write `step_<step>/` (policy + training state), point last.json at it, prune old ones."""
        final = self.root / checkpoint_name(step)
        with atomic_directory(final) as tmp:
            policy.save_pretrained(tmp / "policy")
            torch.save(training_state, tmp / STATE_FILE)
        atomic_write_json(self.root / LAST, {"step": step, "path": final.name})
        self.written = [p for p in self.written if p != final] + [final]
        while len(self.written) > self.keep:
            shutil.rmtree(self.written.pop(0), ignore_errors=True)
        return final
