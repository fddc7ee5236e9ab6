"""The folder of one training run, held by one writer for the run's whole life.

Both trainers (imitation and RL) open their folder through `open_run`, which:

1. takes the folder's writer lock (`fmpolicy.io.WriterLock`): a second process writing the same
   folder fails at once with `LockError`, naming the first one's PID;
2. refuses a folder that already holds a run (`config.yaml`, `log.jsonl`, `checkpoints/` or
   `policy/`) unless the run resumes it (`resume=True`) or replaces it (`overwrite=True`: the old run
   is renamed to `<folder>.old-<time>` beside it, never deleted);
3. on resume, finds the last complete checkpoint and, through `check_resume_config`, refuses any
   change of setting that would make the result differ from an uninterrupted run, naming the field
   and both values;
4. removes what a killed writer left (temporary files and directories, checkpoints that last.json
   never named) and, through `RunLogger`, the log lines written after the checkpoint it resumes from.

Under torchrun only rank 0 writes: the other ranks open the folder with `writer=False` after rank 0
did (they only read the checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from fmpolicy.errors import CheckpointError, ConfigError, FmPolicyError
from fmpolicy.io import WriterLock, atomic_write_text, remove_orphans
from fmpolicy.run.checkpoint import Checkpoints, find_last_checkpoint, load_training_state
from fmpolicy.run.logger import LOG_FILE, RunLogger

CONFIG_FILE = "config.yaml"
RUN_MARKERS = (CONFIG_FILE, LOG_FILE, "checkpoints", "policy")


class RunExistsError(ConfigError):
    """The run folder already holds a run, and neither resume nor overwrite was asked for."""


class RunFolder:
    """One run's folder: its lock, config, checkpoints and log. Made by `open_run`."""

    def __init__(self, path: Path, writer: bool, keep_checkpoints: int):
        self.path = Path(path)
        self.writer = writer
        self.checkpoints = Checkpoints(self.path, keep_checkpoints)
        self.last_checkpoint: Path | None = None  # set when resuming a run that has one
        self.moved_to: Path | None = None  # where overwrite put the old run
        self._lock = WriterLock(self.path, "training run")
        self._created = False

    # ---- opening ----
    def _open(self, resume: bool, overwrite: bool) -> None:
        if self.writer:
            self._created = not self.path.exists()
            self._lock.acquire()
            existing = self.holds_run()
            if existing and overwrite and not resume:
                self._move_aside()
            elif existing and not resume:
                raise RunExistsError(
                    f"{self.path} already holds a run ({', '.join(existing)}): pass --resume to continue it "
                    "(train.out_dir / rl.out_dir), --overwrite to move it aside and start again, or choose "
                    "another folder")
            remove_orphans(self.path)
        if resume:
            self.last_checkpoint = find_last_checkpoint(self.path)
        if self.writer:
            self.checkpoints.open(self.resume_step if resume else None)

    def holds_run(self) -> list[str]:
        return [m for m in RUN_MARKERS if (self.path / m).exists()]

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.old-{stamp}")
        n = 1
        while aside.exists():
            aside, n = self.path.with_name(f"{self.path.name}.old-{stamp}-{n}"), n + 1
        old_lock = self._lock
        os.rename(self.path, aside)  # the held lock moves with it: nobody can write the old run meanwhile
        self._lock = WriterLock(self.path, "training run").acquire()
        old_lock.release()
        self.moved_to = aside
        print(f"moved the earlier run in {self.path} to {aside}")

    @property
    def resume_step(self) -> int:
        """The step (iteration) of the checkpoint being resumed: 0 when starting afresh."""
        if self.last_checkpoint is None:
            return 0
        return int(self.last_checkpoint.name.split("_")[-1])

    # ---- config ----
    def saved_config(self) -> dict[str, Any]:
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: a checkpoint cannot be resumed without the run's config")
        try:
            saved = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise CheckpointError(f"{path} is not readable YAML: {e}") from e
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path} holds {type(saved).__name__}: expected the run's config mapping")
        return saved

    def check_resume(self, config: dict[str, Any], may_change: Iterable[str], accepted: Iterable[str] = (),
                     complete: Callable[[dict], dict] | None = None) -> None:
        """Refuse to resume when `config` differs from the saved one in a field outside `may_change`
        (settings that do not change the result) and `accepted` (changes the user asked for).

        `complete` maps the saved dict through the config classes, so that a field added since the run
        was saved counts as its default (an older run resumes); a saved config that no longer parses is
        compared as it is (the difference is then named)."""
        saved = self.saved_config()
        if complete is not None:
            try:
                saved = complete(saved)
            except FmPolicyError:
                pass
        check_resume_config(saved, config, (*may_change, *accepted), self.path / CONFIG_FILE)

    def write_config(self, config: dict[str, Any]) -> None:
        if self.writer:
            atomic_write_text(self.path / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))

    # ---- during the run ----
    def load_state(self) -> dict[str, Any]:
        return load_training_state(self.last_checkpoint)

    def logger(self, kind: str = "jsonl") -> RunLogger:
        return RunLogger(self.path, kind, self.writer, start_step=self.resume_step)

    def save_checkpoint(self, step: int, policy, training_state: dict[str, Any]) -> Path | None:
        if self.writer:
            return self.checkpoints.save(step, policy, training_state)
        return None

    def close(self) -> None:
        if self.writer and self._lock.held:
            self._lock.release()
            if self._created and not self.holds_run():  # failed before writing anything: leave no trace
                with contextlib.suppress(OSError):
                    (self.path / self._lock.path.name).unlink()
                    self.path.rmdir()


@contextlib.contextmanager
def open_run(path: str | os.PathLike, *, resume: bool, overwrite: bool = False, writer: bool = True,
             keep_checkpoints: int = 2) -> Iterator[RunFolder]:
    """Open a run folder for the life of the `with` block (see the module docstring)."""
    if resume and overwrite:
        raise ConfigError("resume and overwrite were both asked for: resume continues the run in the folder, "
                          "overwrite moves it aside; choose one")
    run = RunFolder(Path(path), writer, keep_checkpoints)
    try:
        run._open(resume, overwrite)
        yield run
    finally:
        run.close()


def diff_configs(saved: dict, current: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of every leaf that differs between two nested dicts."""
    out = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, name + ".")
        elif a != b:
            out.append((name, a, b))
    return out


def check_resume_config(saved: dict, current: dict, may_change: Iterable[str], where: Path | str) -> None:
    """Raise `CheckpointError` naming every field (with both values) that differs between the saved
    and the current config, other than those in `may_change` (a field or a whole section: "train.progress",
    "policy.device")."""
    allowed = tuple(may_change)
    covered = lambda name: any(name == a or name.startswith(a + ".") for a in allowed)  # noqa: E731
    changed = [(k, a, b) for k, a, b in diff_configs(saved, current) if not covered(k)]
    if changed:
        fields = "; ".join(f"{k}: saved {a!r}, now {b!r}" for k, a, b in changed)
        raise CheckpointError(
            f"{where}: cannot resume with a different config ({fields}): the result would differ from an "
            f"uninterrupted run. Resume with the saved values, start a new run in another folder, or accept the "
            f"change knowingly with --allow-change {','.join(k for k, _, _ in changed)}")
