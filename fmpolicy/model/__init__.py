"""Velocity networks. Both share one interface: `encode(...) -> ExpertCache`, `velocity(x_t, t, cache)`."""

from __future__ import annotations

from fmpolicy.config import ExpertConfig
from fmpolicy.model.cache import ExpertCache
from fmpolicy.model.mlp import MLPVelocityNet
from fmpolicy.model.transformer import ActionExpert


def make_velocity_net(config: ExpertConfig, chunk_size: int) -> ActionExpert | MLPVelocityNet:
    """The network named by `config.kind`."""
    if config.kind == "transformer":
        return ActionExpert(config, chunk_size)
    return MLPVelocityNet(config, chunk_size)


__all__ = ["ActionExpert", "ExpertCache", "MLPVelocityNet", "make_velocity_net"]
