"""What a run reports while it trains: `log.jsonl` (one JSON object per logged step, TensorBoard too
when asked) and a progress bar on a terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fmpolicy.io import atomic_write_text

LOG_FILE = "log.jsonl"


def truncate_log(path: Path, last_step: int) -> int:
    """Keep the lines of `path` whose step is <= `last_step` (a resumed run logs the later steps again)
    and drop a line cut short by a kill; returns the number of lines dropped. Atomic."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            dropped += 1
            continue
        if step <= last_step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        atomic_write_text(path, "".join(kept))
    return dropped


class RunLogger:
    """JSON lines in `<run>/log.jsonl`, optionally TensorBoard in `<run>/tb/`.

    Opened at `start_step`: lines of later steps (written after the checkpoint a run resumes from) are
    dropped first, so every step appears once however often the run was killed and resumed.
    """

    def __init__(self, run_dir: Path, kind: str = "jsonl", enabled: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / LOG_FILE
        self.tb = None
        if not enabled:
            return
        truncate_log(self.path, start_step)
        if kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except ImportError:
                print("tensorboard is not installed: logging to log.jsonl only")

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def progress(steps: range, enabled: bool, desc: str):
    """`steps` wrapped in a tqdm bar that starts at `steps.start`; the bare range when disabled or when
    stderr is not a terminal (a bar redrawn into a log file is noise: log.jsonl has it all)."""
    if not enabled or not sys.stderr.isatty():
        return steps
    from tqdm.auto import tqdm

    return tqdm(steps, initial=steps.start, total=steps.stop, desc=desc, dynamic_ncols=True)
