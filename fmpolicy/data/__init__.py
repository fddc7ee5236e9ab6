"""Demonstration datasets in LeRobot's v3.0 layout: `DatasetWriter` writes them, `ChunkDataset` serves
training windows from them (and from any LeRobot v3.0 dataset), `collect` fills a writer from an
environment and a scripted expert, `replay.replay` records a dataset's episodes again by replaying their
actions (other observations of the same demonstrations). See docs/datasets.md.

This package never imports `fmpolicy_envs`: the environment and the expert are passed in.
"""

from fmpolicy.data.collection import collect, run_seed
from fmpolicy.data.dataset import CODEBASE_VERSION, ChunkDataset, LeRobotV3Dataset
from fmpolicy.data.stats import compute_stats
from fmpolicy.data.writer import DatasetWriter

__all__ = ["CODEBASE_VERSION", "ChunkDataset", "DatasetWriter", "LeRobotV3Dataset", "collect", "compute_stats", "run_seed"]
