"""Run bookkeeping shared by both trainers: the run folder (lock, refuse/overwrite, resume checks,
orphan clean-up), checkpoints, the log, the progress bar and the random-stream state."""

from fmpolicy.run.checkpoint import Checkpoints, find_last_checkpoint, load_training_state
from fmpolicy.run.folder import RunExistsError, RunFolder, check_resume_config, diff_configs, open_run
from fmpolicy.run.logger import RunLogger, progress, truncate_log
from fmpolicy.run.rng import rng_state, seed_everything, set_rng_state

__all__ = [
    "Checkpoints", "RunExistsError", "RunFolder", "RunLogger", "check_resume_config", "diff_configs",
    "find_last_checkpoint", "load_training_state", "open_run", "progress", "rng_state", "seed_everything",
    "set_rng_state", "truncate_log",
]
