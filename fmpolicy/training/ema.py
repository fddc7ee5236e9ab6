"""Exponential moving average of a module's parameters (and a copy of its buffers)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """`shadow = decay * shadow + (1 - decay) * param` after every optimiser step.

    The warm-up `min(decay, (1 + n) / (10 + n))` lets the average follow the fast early changes
    instead of being dominated by the random initialisation.
    """

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in module.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1.0 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, module: nn.Module) -> None:
        """Load the averaged weights into `module`."""
        module.load_state_dict(self.shadow)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.num_updates = state["decay"], state["num_updates"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
