"""A real learning test: a flow policy reproduces a multimodal distribution of action chunks,
where a mean-squared-error regressor with the same backbone lands between the modes."""

from __future__ import annotations

import pytest
import torch

from fmpolicy import FlowPolicy, PolicyConfig, make_expert_config
from fmpolicy.toy import ToyChunks
from fmpolicy.training import train_steps

STEPS, BATCH = 400, 128


def train_on_toy(head: str, toy: ToyChunks, data: dict, seed: int = 0, time_input: str = "sinusoidal") -> FlowPolicy:
    torch.manual_seed(seed)
    cfg = PolicyConfig(state_dim=toy.state_dim, action_dim=toy.action_dim, chunk_size=toy.chunk_size,
                       n_action_steps=4, head=head, expert=make_expert_config("tiny", time_input=time_input),
                       device="cpu")
    policy = FlowPolicy(cfg).fit_normalization(data["observation.state"], data["action"])
    g = torch.Generator().manual_seed(seed)
    n = data["action"].shape[0]

    def next_batch(_step):
        idx = torch.randint(0, n, (BATCH,), generator=g)
        return {k: v[idx] for k, v in data.items()}

    losses = train_steps(policy, next_batch, STEPS, lr=2e-3, generator=g)
    assert sum(losses[-20:]) < sum(losses[:20])
    return policy


@pytest.mark.slow
@pytest.mark.parametrize("time_input", ["sinusoidal", "raw"])  # the transformer's time MLP fed features or t itself
def test_flow_policy_samples_every_mode_where_regression_averages(time_input):
    toy = ToyChunks(weights=(0.5, 0.3, 0.2))
    data = toy.sample(20000, torch.Generator().manual_seed(0))
    flow = train_on_toy("flow", toy, data, time_input=time_input)
    assert flow.net.time_embed.mlp[0].in_features == (1 if time_input == "raw" else flow.config.expert.time_embed_dim)
    regression = train_on_toy("regression", toy, data, time_input=time_input)

    n = 1000
    probe = toy.sample(3, torch.Generator().manual_seed(1))["observation.state"]
    for state in probe:  # three different conditioning states
        states = state.expand(n, -1)
        chunks = flow.predict_action_chunk({"observation.state": states}, generator=torch.Generator().manual_seed(2))
        mode, dist = toy.nearest_mode(states, chunks)
        fractions = torch.bincount(mode, minlength=3).float() / n
        # every mode in roughly its proportion (binomial std at n=1000 is <= 0.016)
        torch.testing.assert_close(fractions, torch.tensor(toy.weights), atol=0.06, rtol=0)
        # samples land on the modes: modes are ~1.3 apart (RMS), the data's own noise is 0.03
        assert (dist < 0.15).float().mean() > 0.9, dist.median()

        pred = regression.predict_action_chunk({"observation.state": states[:1]})
        _, reg_dist = toy.nearest_mode(states[:1], pred)
        assert reg_dist.item() > 0.3  # between the modes, on none of them
        # ... close to the probability-weighted mean chunk, as MSE regression must be
        mean_chunk = (toy.modes(states[:1]) * torch.tensor(toy.weights)[None, :, None, None]).sum(1)
        assert (pred - mean_chunk).pow(2).mean().sqrt() < 0.15
