"""Demonstration datasets: an on-disk LeRobot-v2-style format (`format`) and training windows (`dataset`).

See docs/datasets.md. This package never imports `fmpolicy_envs`: collection lives in
scripts/collect_demos.py.
"""

from fmpolicy.data.dataset import ChunkDataset
from fmpolicy.data.format import FORMAT, DatasetWriter, compute_stats
from fmpolicy.data.lerobot import LeRobotV3Dataset

__all__ = ["FORMAT", "ChunkDataset", "DatasetWriter", "LeRobotV3Dataset", "compute_stats"]
