"""The transformer action expert: a state token and h action tokens, attending to prefix tokens.

Token layout of the expert's own sequence (the "suffix" in pi0's words): [state, a_1 ... a_h].
Attention (pi0's block mask): the state token attends to itself; action tokens attend to the state
token and to each other; every token also attends to the valid prefix tokens, in one joint softmax
over [prefix keys, suffix keys]. The prefix keys/values of every layer depend only on the
observation, so `encode` computes them once per chunk and `velocity` reuses them at every step.

Time enters every block through adaLN-Zero modulation (pi0.5's adaRMSNorm): scale, shift and a
zero-initialised gate per residual branch, computed from the time embedding.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor, nn

from fmpolicy.config import ExpertConfig
from fmpolicy.model.cache import ExpertCache
from fmpolicy.model.layers import AdaptiveModulation, FeedForward, RMSNorm, TimeEmbedding, modulate


def zero_padded(x: Tensor, valid: Tensor | None) -> Tensor:
    """Zero the entries where `valid` is False, so that padded values cannot reach the network.

    `valid` broadcasts against `x` from the right, except that a per-sample mask (b, A) of a chunk
    (b, h, A) applies to every step.
    """
    if valid is None:
        return x
    if valid.dim() == 2 and x.dim() == 3:
        valid = valid[:, None, :]
    return torch.where(valid, x, torch.zeros((), dtype=x.dtype, device=x.device))


def state_features(state: Tensor, valid: Tensor | None) -> Tensor:
    """[zero-padded state, validity mask]: (b, S) -> (b, 2S). The mask tells the network which
    entries are the robot's own, so a real 0 and a padded slot differ (robots of several widths)."""
    mask = torch.ones_like(state, dtype=torch.bool) if valid is None else valid.expand_as(state)
    return torch.cat([zero_padded(state, mask), mask.to(state.dtype)], dim=-1)


def shared_prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_kv: tuple[Tensor, Tensor], mask: Tensor,
                            dropout: float = 0.0) -> Tensor:
    """The joint softmax over [prefix keys, suffix keys] where g consecutive samples share one prefix.

    q, k, v (b*g, n, q, e): the suffix's own; prefix_kv: keys, values (b, n, p, e), computed once for
    the g samples (FPO's m (t, noise) pairs of one observation); mask (b|1, 1, q, p + q) bool, the
    prefix's entries first. -> (b*g, n, q, e): what scaled_dot_product_attention gives on keys/values
    repeated g times, without the g copies. The g samples' queries form one sequence of g*q tokens
    attending to [prefix, the g suffixes], with a block-diagonal mask over the suffixes (each sample
    sees its own); the backward pass then sums the prefix's gradient inside the attention instead of
    over g copies (what `scripts/bench.py --only rl_vl` measures: docs/rl.md, "Cost").
    """
    pk, pv = prefix_kv
    b, p, g = pk.shape[0], pk.shape[2], q.shape[0] // pk.shape[0]
    if g * b != q.shape[0]:
        raise ValueError(f"{q.shape[0]} samples' queries do not split into groups over {b} prefixes")
    q, k, v = (rearrange(x, "(b g) n q e -> b n (g q) e", g=g) for x in (q, k, v))
    keys, values = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (b, n, p + g*q, e)
    own = mask[..., p:]  # (b|1, 1, q, q)
    same = torch.eye(g, dtype=torch.bool, device=mask.device)[:, None, :, None]  # (g, 1, g, 1)
    own = (same & own[:, :, None, :, None, :]).flatten(4, 5).flatten(2, 3)  # (b|1, 1, g*q, g*q)
    grouped = torch.cat([mask[..., :p].repeat(1, 1, g, 1), own], dim=-1)  # (b|1, 1, g*q, p + g*q)
    out = nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=grouped, dropout_p=dropout)
    return rearrange(out, "b n (g q) e -> (b g) n q e", g=g)


class ExpertBlock(nn.Module):
    """One pre-norm transformer block with time modulation and joint attention to prefix keys/values."""

    def __init__(self, config: ExpertConfig):
        super().__init__()
        d = config.width
        self.num_heads = config.num_heads
        self.norm_attn = RMSNorm(d, affine=False)
        self.norm_ff = RMSNorm(d, affine=False)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ff = FeedForward(d, int(config.mlp_ratio * d), config.dropout)
        self.attn_dropout = config.dropout
        # the prefix has its own norm and key/value projection in every layer (pi0's VLM layers play
        # this part; here the prefix arrives as embeddings from an encoder)
        self.prefix_norm = RMSNorm(d) if config.prefix_dim else None
        self.prefix_kv = nn.Linear(d, 2 * d) if config.prefix_dim else None

    def prefix_keys_values(self, prefix: Tensor) -> tuple[Tensor, Tensor]:
        """(b, p, d) -> keys, values (b, heads, p, d_head)."""
        kv = self.prefix_kv(self.prefix_norm(prefix))
        k, v = rearrange(kv, "b p (two n e) -> two b n p e", two=2, n=self.num_heads)
        return k, v

    def forward(self, x: Tensor, modulation: tuple[Tensor, ...], prefix_kv: tuple[Tensor, Tensor] | None,
                mask: Tensor) -> Tensor:
        """x (b, q, d), modulation: 6 x (b, 1, d), mask (b|1, 1, q, p + q) -> (b, q, d)"""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation
        h = modulate(self.norm_attn(x), shift1, scale1)
        q, k, v = rearrange(self.qkv(h), "b q (three n e) -> three b n q e", three=3, n=self.num_heads)
        dropout = self.attn_dropout if self.training else 0.0
        if prefix_kv is not None and prefix_kv[0].shape[0] != x.shape[0]:  # several samples per prefix
            attn = shared_prefix_attention(q, k, v, prefix_kv, mask, dropout)
        else:
            if prefix_kv is not None:
                k = torch.cat([prefix_kv[0], k], dim=2)
                v = torch.cat([prefix_kv[1], v], dim=2)
            attn = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        x = x + gate1 * self.out(rearrange(attn, "b n q e -> b q (n e)"))
        x = x + gate2 * self.ff(modulate(self.norm_ff(x), shift2, scale2))
        return x


class ActionExpert(nn.Module):
    """Velocity network v(x_t, t | state, prefix) over zero-padded action chunks.

    `encode(state, ...)` -> ExpertCache (once per chunk); `velocity(x_t, t, cache)` -> v (every step);
    `forward` does both (no cache reuse).
    """

    def __init__(self, config: ExpertConfig, chunk_size: int):
        super().__init__()
        d = config.width
        self.config = config
        self.chunk_size = chunk_size
        self.state_in = nn.Linear(2 * config.max_state_dim, d)
        self.action_in = nn.Linear(config.max_action_dim, d)
        self.position = nn.Parameter(torch.randn(chunk_size, d) * 0.02)
        self.time_embed = TimeEmbedding(config.time_embed_dim, d, config.time_min_period, config.time_max_period,
                                        raw=config.time_input == "raw")
        self.prefix_in = nn.Linear(config.prefix_dim, d) if config.prefix_dim else None
        self.blocks = nn.ModuleList(ExpertBlock(config) for _ in range(config.depth))
        self.final_norm = RMSNorm(d, affine=False)
        # every block's (shift, scale, gate) pairs and the final norm's, from one projection of the
        # time embedding per step: one matmul instead of depth + 1 small ones
        self.modulation = AdaptiveModulation(d, n_triples=2 * config.depth + 1)
        self.action_out = nn.Linear(d, config.max_action_dim)
        # zero-initialised, as DiT's final layer: the untrained expert's velocity is 0, so it samples the
        # noise distribution itself, N(0, I), the same at every state and unbiased. PyTorch's default init
        # gave a velocity of ~0.5 in a random direction (from action_in's bias through the norm), which
        # tilts every state one way before FPO from scratch starts (docs/rl.md, "a tilted start")
        nn.init.zeros_(self.action_out.weight)
        nn.init.zeros_(self.action_out.bias)
        # suffix block mask: the state token (row 0) sees only itself, action tokens see everything
        q = 1 + chunk_size
        suffix_mask = torch.ones(q, q, dtype=torch.bool)
        suffix_mask[0, 1:] = False
        self.register_buffer("suffix_mask", suffix_mask, persistent=False)

    def encode(
        self,
        state: Tensor,
        state_valid: Tensor | None = None,
        prefix: Tensor | None = None,
        prefix_mask: Tensor | None = None,
    ) -> ExpertCache:
        """Everything that does not depend on (x_t, t), computed once per chunk.

        state (b, S) zero-padded to max_state_dim; state_valid (b, S) or (S,) bool (per-sample masks
        for batches that mix robots of several widths);
        prefix (b, p, d_prefix) and prefix_mask (b, p) bool (True = a real token), both optional.
        """
        state_token = self.state_in(state_features(state, state_valid))[:, None, :]  # (b, 1, d)
        b, q = state.shape[0], 1 + self.chunk_size
        if prefix is None or self.prefix_in is None:
            return ExpertCache(state_token=state_token, attn_mask=self.suffix_mask[None, None])
        if prefix_mask is None:
            prefix_mask = torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)
        # zero masked tokens too: a NaN there would otherwise survive the -inf of the attention mask
        tokens = self.prefix_in(zero_padded(prefix, prefix_mask[..., None]))  # (b, p, d)
        prefix_kv = [block.prefix_keys_values(tokens) for block in self.blocks]
        mask = torch.cat([prefix_mask[:, None, :].expand(b, q, -1), self.suffix_mask.expand(b, q, q)], dim=-1)
        return ExpertCache(state_token=state_token, prefix_kv=prefix_kv, attn_mask=mask[:, None])

    def time_conditioning(self, t: Tensor) -> tuple[Tensor, ...]:
        """Every block's (shift, scale, gate) triples and the final norm's for the times t (n,): 3 * (2 * depth
        + 1) tensors (n, 1, d). A function of t and the weights only, so a fixed-grid solve computes it for
        all its evaluation times in one projection (`fmpolicy.cuda_graphs.solve_expert`) instead of
        reading the modulation's weights (a quarter of a pi0-sized expert's) at every step."""
        return self.modulation(self.time_embed(t))

    def velocity(self, x_t: Tensor, t: Tensor, cache: ExpertCache, action_valid: Tensor | None = None,
                 time_cond: tuple[Tensor, ...] | list[Tensor] | None = None) -> Tensor:
        """v(x_t, t) for a cached observation. x_t (b, h, A), t (b,), action_valid (A,) or (b, A)
        -> (b, h, A); padded entries are 0. `time_cond`: `time_conditioning(t)` computed by the caller
        (tensors (b or 1, 1, d)), in place of computing it here."""
        tokens = self.action_in(zero_padded(x_t, action_valid)) + self.position
        x = torch.cat([cache.state_token.to(tokens.dtype), tokens], dim=1)  # (b, 1 + h, d)
        mods = self.time_conditioning(t) if time_cond is None else time_cond  # 3 * (2 * depth + 1) x (b, 1, d)
        prefix_kv = cache.prefix_kv or [None] * len(self.blocks)
        for i, (block, kv) in enumerate(zip(self.blocks, prefix_kv)):
            x = block(x, mods[6 * i: 6 * i + 6], kv, cache.attn_mask)
        shift, scale, _ = mods[-3:]
        v = self.action_out(modulate(self.final_norm(x[:, 1:]), shift, scale))
        return zero_padded(v, action_valid)

    def forward(self, x_t: Tensor, t: Tensor, state: Tensor, state_valid: Tensor | None = None,
                prefix: Tensor | None = None, prefix_mask: Tensor | None = None,
                action_valid: Tensor | None = None) -> Tensor:
        """Uncached velocity: encode the observation and evaluate once. -> (b, h, A)"""
        return self.velocity(x_t, t, self.encode(state, state_valid, prefix, prefix_mask), action_valid)
