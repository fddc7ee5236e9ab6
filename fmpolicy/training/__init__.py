"""Imitation training: the compact loop (`train_steps`) and the full trainer (`train_imitation`)."""

from fmpolicy.training.ema import EMA
from fmpolicy.training.loop import train_steps, warmup_cosine

__all__ = ["EMA", "train_steps", "warmup_cosine"]
