"""A small MLP velocity network for low-dimensional control (the kind the FPO paper uses)."""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from fmpolicy.config import ExpertConfig
from fmpolicy.model.cache import ExpertCache
from fmpolicy.model.layers import sinusoidal_time_features
from fmpolicy.model.transformer import state_features, zero_padded


class MLPVelocityNet(nn.Module):
    """v(x_t, t | state, pooled prefix) from one MLP over the flattened chunk.

    Input: [flattened zero-padded x_t (h*A), zero-padded state and its mask (2S), the pooled prefix (when
    configured: its masked mean, d_prefix, or `prefix_queries` attention reads of it, Q*d_prefix), time
    features]; output: the flattened velocity (h*A). The time features
    are `time_embed_dim` sinusoids (`time_input: sinusoidal`) or t itself, one input (`raw`: the FPO
    paper's GridWorld net, whose velocity is then a smooth function of t); hidden layers use `activation`.
    Same interface as `ActionExpert`: `encode` once per chunk, `velocity` per step.
    """

    def __init__(self, config: ExpertConfig, chunk_size: int):
        super().__init__()
        self.config = config
        self.chunk_size = chunk_size
        time_dim = 1 if config.time_input == "raw" else config.time_embed_dim
        pooled_dim = config.prefix_dim * (config.prefix_queries if config.prefix_pool == "attention" else 1)
        in_dim = chunk_size * config.max_action_dim + 2 * config.max_state_dim + pooled_dim + time_dim
        self.pooled_dim = pooled_dim
        if config.prefix_pool == "attention" and config.prefix_dim:
            d = config.prefix_dim
            self.pool_queries = nn.Parameter(torch.randn(config.prefix_queries, d) * d**-0.5)
            self.pool_keys = nn.Linear(d, d)
        activation = {"silu": nn.SiLU, "relu": nn.ReLU}[config.activation]
        layers: list[nn.Module] = []
        for i in range(config.depth):
            layers += [nn.Linear(in_dim if i == 0 else config.width, config.width), activation()]
            if config.dropout:
                layers.append(nn.Dropout(config.dropout))
        layers.append(nn.Linear(config.width, chunk_size * config.max_action_dim))
        self.net = nn.Sequential(*layers)

    def encode(self, state: Tensor, state_valid: Tensor | None = None, prefix: Tensor | None = None,
               prefix_mask: Tensor | None = None) -> ExpertCache:
        """Conditioning vector (b, 2S [+ pooled prefix]): state, its validity mask, the pooled prefix."""
        cond = [state_features(state, state_valid)]
        if self.config.prefix_dim:
            if prefix is None:
                cond.append(state.new_zeros(state.shape[0], self.pooled_dim))
            else:
                if prefix_mask is None:
                    prefix_mask = torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
                cond.append(self._pool(zero_padded(prefix, prefix_mask[..., None]), prefix_mask))
        return ExpertCache(cond=torch.cat(cond, dim=-1))

    def _pool(self, prefix: Tensor, mask: Tensor) -> Tensor:
        """prefix (b, p, d) with masked tokens zeroed, mask (b, p) bool -> (b, d) or (b, Q*d); a row whose
        tokens are all masked pools to zeros."""
        weights = mask.to(prefix.dtype)[..., None]  # (b, p, 1)
        if self.config.prefix_pool == "mean":
            return (prefix * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        scores = torch.einsum("qd,bpd->bqp", self.pool_queries.to(prefix.dtype), self.pool_keys(prefix))
        scores = (scores * prefix.shape[-1] ** -0.5).masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min)
        attn = torch.softmax(scores, dim=-1)  # (b, Q, p): masked tokens get 0 (or, all masked, read zeros)
        return rearrange(attn @ prefix, "b q d -> b (q d)")

    def velocity(self, x_t: Tensor, t: Tensor, cache: ExpertCache, action_valid: Tensor | None = None) -> Tensor:
        """x_t (b, h, A), t (b,) -> (b, h, A); padded entries are 0."""
        flat = rearrange(zero_padded(x_t, action_valid), "b h a -> b (h a)")
        if self.config.time_input == "raw":
            feats = t.to(flat.dtype)[:, None]  # (b, 1)
        else:
            feats = sinusoidal_time_features(t, self.config.time_embed_dim, self.config.time_min_period,
                                             self.config.time_max_period).to(flat.dtype)
        v = self.net(torch.cat([flat, cache.cond.to(flat.dtype), feats], dim=-1))
        return zero_padded(rearrange(v, "b (h a) -> b h a", h=self.chunk_size), action_valid)

    def forward(self, x_t: Tensor, t: Tensor, state: Tensor, state_valid: Tensor | None = None,
                prefix: Tensor | None = None, prefix_mask: Tensor | None = None,
                action_valid: Tensor | None = None) -> Tensor:
        return self.velocity(x_t, t, self.encode(state, state_valid, prefix, prefix_mask), action_valid)
