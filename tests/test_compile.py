"""Compiled sampling: the same chunks as the eager expert, to float rounding."""

from __future__ import annotations

import torch

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config
from tests.helpers import randomized


def test_a_compiled_expert_samples_the_chunks_of_the_eager_one_and_saves_the_same(tmp_path):
    cfg = PolicyConfig(state_dim=3, action_dim=2, chunk_size=4, n_action_steps=2, device="cpu",
                       expert=make_expert_config("tiny", prefix_dim=16),
                       normalization=NormalizationConfig(state="identity", action="identity"))
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0)
    policy.eval()
    g = torch.Generator().manual_seed(0)
    obs = {"observation.state": torch.randn(2, 3, generator=g), "observation.prefix": torch.randn(2, 5, 16, generator=g),
           "observation.prefix_mask": torch.tensor([[True] * 5, [True, True, False, False, False]])}
    noise = policy.sample_noise(2, g)
    eager = policy.predict_action_chunk(obs, noise=noise)
    policy.compile_velocity()
    compiled = policy.predict_action_chunk(obs, noise=noise)
    # fused float32 kernels sum in another order: relative 1e-4 after 10 steps leaves 100x headroom over
    # the differences measured (~1e-6); a wrong mask or time input moves the chunk by O(1)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    assert not torch.equal(policy.predict_action_chunk(obs, noise=noise + 1.0), compiled)
    policy.save_pretrained(tmp_path / "p")
    again = FlowPolicy.from_pretrained(tmp_path / "p", device="cpu").eval()
    assert torch.equal(again.predict_action_chunk(obs, noise=noise), eager)
