"""What a velocity network computes once per chunk and reuses at every integration step."""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import Tensor


@dataclass
class ExpertCache:
    """Per-chunk conditioning, independent of (x_t, t).

    For the transformer: the state token and each layer's prefix keys/values. For the MLP: the
    conditioning vector. Fields that a network does not use stay None.
    """

    state_token: Tensor | None = None  # (b, 1, d) transformer state token
    prefix_kv: list[tuple[Tensor, Tensor]] | None = None  # per layer: keys, values (b, heads, p, d_head)
    attn_mask: Tensor | None = None  # (b, 1, 1 + h, p + 1 + h) bool, True = may attend
    cond: Tensor | None = None  # (b, c) MLP conditioning vector
    # set by the policy when it has a prefix: the masked mean of the prefix tokens (b, d_prefix), what a
    # critic that sees what the policy sees reads (fmpolicy.rl.value)
    prefix_pooled: Tensor | None = None
    # set by the policy: which robot each sample is, and its own action entries
    embodiment: Tensor | None = None  # (b,) long
    action_valid: Tensor | None = None  # (b, A) bool

    @property
    def batch_size(self) -> int:
        for f in (self.state_token, self.cond):
            if f is not None:
                return f.shape[0]
        raise ValueError("empty ExpertCache")

    def repeat_interleave(self, m: int, share_prefix: bool = False) -> "ExpertCache":
        """Repeat every sample m times along the batch axis (b -> b*m), e.g. for FPO's m (t, noise) pairs.

        `share_prefix`: keep the prefix keys/values and the attention mask at batch b; the transformer
        then lets each group of m consecutive samples attend to their one prefix
        (`shared_prefix_attention`) instead of to m copies of it (same result to float rounding;
        no copies to make, nor to sum the gradient of)."""

        def rep(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.repeat_interleave(m, 0)

        shared = share_prefix and self.prefix_kv is not None
        kv = self.prefix_kv if shared or self.prefix_kv is None else [(rep(k), rep(v)) for k, v in self.prefix_kv]
        # a mask of batch 1 is shared by every sample (it broadcasts) and stays as it is
        keep_mask = shared or self.attn_mask is None or self.attn_mask.shape[0] == 1
        mask = self.attn_mask if keep_mask else rep(self.attn_mask)
        return replace(self, state_token=rep(self.state_token), prefix_kv=kv, attn_mask=mask, cond=rep(self.cond),
                       prefix_pooled=rep(self.prefix_pooled), embodiment=rep(self.embodiment), action_valid=rep(self.action_valid))
