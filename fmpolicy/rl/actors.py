"""The two actors of the RL loop, behind one interface.

    obs = actor.storable(obs)                       # what the buffer keeps of an observation (see below)
    inputs = actor.prepare(obs)                     # the policy's per-observation work, once (or None)
    chunk, store = actor.act(obs, generator, inputs)          # rollout: a chunk (b, h, a) in [-1, 1] units
    log_ratio, stats = actor.log_ratio(obs, chunk, store, inputs, executed)  # update: (b,) or (b, m)
    old = actor.ratio_reference(store)              # the stored values log_ratio is a difference against
    reg = actor.regularizer(obs, store)              # update: a scalar added to the loss, or None
    ent = actor.entropy(obs, store, inputs)          # update: (b,) entropy (estimate), for rl.ent_coef
    pooled = actor.critic_features(inputs)          # what a critic that sees what the policy sees reads
    chunk = actor.eval_act(obs, zero_noise=True)     # evaluation
    actor.parameters(); actor.save_pretrained(directory)

`store` is a dict of tensors with the batch on the first axis, kept by the rollout buffer and sliced
into minibatches: whatever the actor needs to recompute its ratio exactly. `executed` (b, h) bool: the
chunk steps the rollout executed (the first n_action_steps, none past an episode's end).

The boundary to the policy is `FlowPolicy`'s public API: `encode(obs)` gives the per-observation cache
(the encoder's prefix, the expert's prefix keys / values, the robot's valid entries), computed once per
observation and passed to sampling and to the CFM losses (`cache=`); `frozen_features(obs)` replaces
images and instruction by a frozen encoder backbone's outputs, so that the buffer stores those and the
update runs only the trainable head. The policy runs in eval mode throughout RL (dropout off, in the
expert and in any text / vision model): a random layer would make the update's losses differ from the
rollout's and the ratio before the first update differ from 1.

- `FlowActor` (FPO): exploration comes from the flow's initial noise (plus an optional Gaussian
  perturbation of the chunk). At rollout time it draws m pairs (t_i, noise_i) per chunk and stores
  them with the old per-pair CFM losses; the update recomputes the losses at the *same* pairs, so an
  unmoved policy has a ratio of exactly 1. With `fpo.ref_coef > 0` it keeps a frozen copy of the
  starting policy and regularises towards it (`regularizer`). With `keep_noise` (set when
  `rl.ent_coef > 0`) it also stores each chunk's initial noise, and `entropy` re-integrates the flow
  from it, differentiably, with the log-volume change along the path (`integrate_divergence`).
- `GaussianActor` (PPO baseline): a state-independent log-std and an MLP mean of the executed part
  of the chunk (n_action_steps steps: entries never executed would only add noise to the ratio),
  squashed by tanh (the pre-squash sample is stored, so the log-prob, log-det included, is
  recomputed exactly) or clipped to [-1, 1].
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from fmpolicy.batch import STATE
from fmpolicy.embodiment import EMBODIMENT
from fmpolicy.errors import ConfigError
from fmpolicy.config import config_to_dict
from fmpolicy.io import atomic_directory
from fmpolicy.policy import FlowPolicy
from fmpolicy.rl.config import FPOConfig, GaussianConfig
from fmpolicy.model import ExpertCache
from fmpolicy.rl.objectives import compute_fpo_log_ratio, reduce_chunk_steps
from fmpolicy.sampling import integrate_divergence, sample_noise


ROW_LOSSES = "cfm_loss_rows"  # log_ratio's stats entry: each row's new CFM loss, for fpo.positive_imitation
ENTROPY_EXACT_MAX_DIM = 8  # more counted entries: Hutchinson's trace (one VJP a step instead of one an entry)
LOG_2PI_E = math.log(2 * math.pi * math.e)  # the entropy of N(0, 1) is 0.5 * LOG_2PI_E


class FlowActor(nn.Module):
    """FPO's actor around a `FlowPolicy` (shapes: b batch, h chunk, a action, A padded action, m pairs)."""

    def __init__(self, policy: FlowPolicy, fpo: FPOConfig, keep_noise: bool = False, embodiment: str = ""):
        super().__init__()
        self.policy, self.fpo, self.keep_noise = policy.eval(), fpo, keep_noise  # dropout off (module doc)
        names = policy.embodiments.names
        if embodiment and embodiment not in names:
            raise ConfigError(f"rl.embodiment = {embodiment!r} is not one of the policy's embodiments {names}")
        if not embodiment and len(names) > 1:
            raise ConfigError(f"rl.embodiment is '': the policy serves {names}; name the robot these envs are")
        # observations of these envs are this robot: named in every observation the policy reads
        self.embodiment = embodiment or None
        # the starting policy, frozen (its weights are in the actor's state dict, so a resumed run keeps it)
        self.reference = copy.deepcopy(policy).requires_grad_(False).eval() if fpo.ref_coef > 0 else None

    def train(self, mode: bool = True) -> "FlowActor":
        super().train(mode)
        self.policy.eval()  # dropout off at rollout and update alike (see the module doc)
        if self.reference is not None:
            self.reference.eval()  # always sampled as it was
        return self

    def storable(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """`obs` as the buffer keeps it: a frozen encoder backbone's outputs instead of images and
        instruction (computed here, once), else `obs` itself."""
        obs = self._named(obs)
        features = self.policy.frozen_features(obs)
        return dict(obs) if features is None else features

    def _named(self, obs: Mapping[str, Any]) -> Mapping[str, Any]:
        """`obs` with this run's robot named (`rl.embodiment`), where the policy serves several."""
        if self.embodiment is None or EMBODIMENT in obs:
            return obs
        return {**obs, EMBODIMENT: [self.embodiment] * obs[STATE].shape[0]}

    def prepare(self, obs: Mapping[str, Any]) -> ExpertCache:
        """The policy's per-observation cache (`FlowPolicy.encode`), differentiable when grad is on."""
        return self.policy.encode(obs)

    @torch.no_grad()
    def state_z(self, obs: Mapping[str, Any]) -> Tensor:
        """max |normalized state| over the batch, per padded state entry (S,): how many of the imitation
        data's standard deviations (the policy's state normalizer) the states RL reaches lie out."""
        return self.policy.state_z(self._named(obs))

    @staticmethod
    def critic_features(inputs: ExpertCache | None) -> Tensor | None:
        """The masked mean of the policy's prefix tokens (b, d_prefix), detached, or None without a prefix."""
        pooled = getattr(inputs, "prefix_pooled", None)
        return None if pooled is None else pooled.detach()

    @property
    def device(self) -> torch.device:
        return self.policy.device

    def sample_pairs(self, b: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """m Monte Carlo pairs per chunk: t (b, m) and noise (b, m, h, a) at the robot's own action width
        (the widest robot's, with several; the policy zero-pads it, and padded entries count in no loss)."""
        m, cfg = self.fpo.num_pairs, self.policy.config
        if self.fpo.time_sampling == "uniform":
            where = generator.device if generator is not None else self.device
            t = torch.rand(b, m, generator=generator, device=where).to(self.device)
        else:
            t = self.policy.sample_time(b * m, generator).reshape(b, m)
        noise = sample_noise((b, m, cfg.chunk_size, cfg.action_dim), generator=generator, device=self.device)
        return t, noise

    def _losses(self, obs: Mapping[str, Any], chunk: Tensor, t: Tensor, noise: Tensor,
                inputs: ExpertCache | None) -> Tensor:
        """CFM losses at the pairs: per step (b, m, h) when unexecuted steps are masked, else (b, m)."""
        return self.policy.compute_cfm_losses(obs, chunk, t, noise, cache=inputs, per_step=self.fpo.mask_unexecuted,
                                              huber_delta=self.fpo.huber_delta)

    def _per_pair(self, losses: Tensor, executed: Tensor | None) -> Tensor:
        if self.fpo.mask_unexecuted:
            return reduce_chunk_steps(losses, executed, self.fpo.loss_reduction)
        # every step has the same valid entries, so the sum of the steps' means is h x the chunk's mean:
        # no per-step losses to store for "sum_steps" unless steps are masked
        return losses * self.policy.config.chunk_size if self.fpo.loss_reduction == "sum_steps" else losses

    @torch.no_grad()
    def act(self, obs: Mapping[str, Any], generator: torch.Generator | None = None,
            inputs: ExpertCache | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Sample chunks (b, h, a) and the store {"t" (b, m), "noise" (b, m, h, a), "loss_old" (b, m) or,
        with `fpo.mask_unexecuted`, (b, m, h) per step}. `inputs`: `prepare(obs)`, when the caller has it
        (the observation is then encoded once for the chunk and its old losses)."""
        b = obs[STATE].shape[0]
        inputs = self.prepare(obs) if inputs is None else inputs
        x0 = self.policy.sample_noise(b, generator)
        chunk = self._sample(obs, x0, inputs, generator)
        t, noise = self.sample_pairs(b, generator)
        store = {"t": t, "noise": noise, "loss_old": self._losses(obs, chunk, t, noise, inputs)}
        if self.fpo.normalizer_samples:
            store.update(self._normalizer_samples(obs, inputs, b, generator))
        if self.keep_noise:  # for `entropy`: the initial noise, and a Hutchinson probe where the chunk is large
            store["x0"] = x0
            if self._counted_entries() > ENTROPY_EXACT_MAX_DIM:
                store["probe"] = sample_noise(x0.shape, generator=generator, device=self.device).sign()
        if self.reference is not None:  # a chunk of the starting policy and one (t, noise) pair for it
            ref = self.reference.predict_action_chunk(obs, noise=self.policy.sample_noise(b, generator))
            store["ref_chunk"] = ref.clamp(-1.0, 1.0) if self.fpo.clip_actions else ref
            store["ref_t"], store["ref_noise"] = (x[:, :1] for x in self.sample_pairs(b, generator))
        return chunk, store

    def _sample(self, obs: Mapping[str, Any], x0: Tensor, inputs: ExpertCache,
                generator: torch.Generator | None) -> Tensor:
        """The chunks (b, h, a) a rollout executes from initial noise x0: the flow's, plus
        `fpo.action_noise_std` and clipped with `fpo.clip_actions`."""
        chunk = self.policy.predict_action_chunk(obs, noise=x0, cache=inputs)
        if self.fpo.action_noise_std > 0:
            chunk = chunk + self.fpo.action_noise_std * sample_noise(chunk.shape, generator=generator, device=self.device)
        if self.fpo.clip_actions:
            # the envs clip actions to [-1, 1] anyway; storing the executed (clipped) chunk keeps the CFM
            # losses bounded. Unclipped, nothing stops the flow's samples from growing: on HalfCheetah the
            # stored actions and their losses grew to ~1e8 and the run ended on a non-finite gradient.
            # Off by default: on the bandit the point masses it puts on the box's faces slow learning.
            chunk = chunk.clamp(-1.0, 1.0)
        return chunk

    def _normalizer_samples(self, obs: Mapping[str, Any], inputs: ExpertCache, b: int,
                            generator: torch.Generator | None) -> dict[str, Tensor]:
        """k = `fpo.normalizer_samples` fresh chunks per observation, sampled as the executed one is, with
        their own pairs and old losses: {"norm_chunk" (b, k, h, a), "norm_t" (b, k, m), "norm_noise"
        (b, k, m, h, a), "norm_loss_old" (b, k, m) or (b, k, m, h)}."""
        k = self.fpo.normalizer_samples
        rep = inputs.repeat_interleave(k)
        chunk = self._sample(obs, self.policy.sample_noise(b * k, generator), rep, generator)
        t, noise = self.sample_pairs(b * k, generator)
        loss = self._losses(obs, chunk, t, noise, rep)
        return {name: x.reshape(b, k, *x.shape[1:])
                for name, x in (("norm_chunk", chunk), ("norm_t", t), ("norm_noise", noise), ("norm_loss_old", loss))}

    def _normalizer_shift(self, obs: Mapping[str, Any], store: Mapping[str, Tensor], inputs: ExpertCache | None,
                          executed: Tensor | None) -> Tensor:
        """(b,) the mean log ratio (mode "mean") of the stored fresh chunks: how much the update lowered
        the CFM losses of the policy's typical actions at each observation (the change of -L's normaliser)."""
        b, k = store["norm_chunk"].shape[:2]
        rep = (self.prepare(obs) if inputs is None else inputs).repeat_interleave(k)
        flat = {name: store[name].flatten(0, 1) for name in ("norm_chunk", "norm_t", "norm_noise", "norm_loss_old")}
        ex = None if executed is None else executed.repeat_interleave(k, 0)
        new = self._per_pair(self._losses(obs, flat["norm_chunk"], flat["norm_t"], flat["norm_noise"], rep), ex)
        old = self._per_pair(flat["norm_loss_old"], ex)
        diff = compute_fpo_log_ratio(old, new, "mean", self.fpo.clamp_old, None, self.fpo.clamp_pair_log_ratio,
                                     self.fpo.hard_clamps)  # (b k,)
        return diff.reshape(b, k).mean(1)

    def log_ratio(self, obs: Mapping[str, Any], chunk: Tensor, store: Mapping[str, Tensor],
                  inputs: ExpertCache | None = None, executed: Tensor | None = None) -> tuple[Tensor, dict]:
        """log ratio (b,) (mode "mean") or (b, m) ("per_pair") from the new losses at the stored pairs,
        over the `executed` (b, h) chunk steps (all of them when None or `fpo.mask_unexecuted` is off);
        with `fpo.normalizer_samples`, less the fresh chunks' mean log ratio at the same observation."""
        if self.fpo.normalizer_samples and inputs is None:
            inputs = self.prepare(obs)  # once for the chunk and its fresh samples
        loss_new = self._per_pair(self._losses(obs, chunk, store["t"], store["noise"], inputs), executed)
        loss_old = self._per_pair(store["loss_old"], executed)
        shift = self._normalizer_shift(obs, store, inputs, executed) if self.fpo.normalizer_samples else None
        log_ratio = compute_fpo_log_ratio(loss_old, loss_new, self.fpo.ratio_mode,
                                          self.fpo.clamp_old, self.fpo.clamp_log_ratio,
                                          self.fpo.clamp_pair_log_ratio, self.fpo.hard_clamps, shift)
        stats = {"cfm_loss_old": loss_old.mean().detach(), "cfm_loss_new": loss_new.mean().detach()}
        if self.fpo.positive_imitation > 0:  # with its graph: the update's self-imitation term (and popped there)
            stats[ROW_LOSSES] = loss_new.reshape(loss_new.shape[0], -1).mean(dim=1)
        if shift is not None:
            stats["normalizer_shift"] = shift.mean().detach()  # > 0: the update lowered typical actions' losses
        return log_ratio, stats

    def ratio_reference(self, store: Mapping[str, Tensor]) -> Tensor:
        return store["loss_old"]

    def regularizer(self, obs: Mapping[str, Any], store: Mapping[str, Tensor]) -> tuple[Tensor, dict] | None:
        """`ref_coef` x the policy's CFM loss on the starting policy's chunks (None when ref_coef is 0).

        Minimising the CFM loss of samples from the reference fits the policy to them (imitation of
        the starting policy, a mass-covering pull): where the reference puts mass, the policy must keep
        some. From scratch the reference is the broad initial flow, so this acts like an entropy bonus
        (on the bandit it delays the collapse into one optimum but does not stop it: docs/rl.md); from
        an imitation checkpoint it is a pull towards the demonstrated behaviour.
        """
        if self.reference is None:
            return None
        loss = self.policy.compute_cfm_losses(obs, store["ref_chunk"], store["ref_t"], store["ref_noise"]).mean()
        return self.fpo.ref_coef * loss, {"ref_cfm_loss": loss.detach()}

    @torch.no_grad()
    def set_reference_to_policy(self) -> None:
        """Make the reference the policy as it is now (`fpo.ref_policy: best`): its weights copied in place,
        so the actor's state dict (checkpoints, resume) carries the new reference."""
        if self.reference is None:
            raise RuntimeError("set_reference_to_policy needs fpo.ref_coef > 0 (the actor keeps no reference)")
        self.reference.load_state_dict(self.policy.state_dict())

    def _counted_entries(self) -> int:
        return self.policy.config.chunk_size * int(self.policy.action_valid.sum())

    def entropy(self, obs: Mapping[str, Any], store: Mapping[str, Tensor], inputs: ExpertCache | None = None) -> Tensor:
        """Entropy estimate (b,) of tanh(a), a the policy's chunk at `obs` in environment units, from the
        stored initial noise: H(N(0, I)) + the log-volume change along the Euler sampling path +
        sum log(1 - tanh(a)^2), up to the constant log-scale of the action normalizer.

        Why tanh: the envs clip actions to [-1, 1], so the flow's own entropy can grow without bound by
        moving mass outside the box at no cost in reward (measured on the bandit: the samples and their
        CFM losses grew to ~1e30). Squashed, the entropy is largest for samples that fill the box and
        falls for samples outside it. One sample per observation: the single-sample estimate of the
        conditional entropy; differentiable in the weights (the path is re-integrated with them).
        Chunks of at most ENTROPY_EXACT_MAX_DIM entries (the bandit, the GridWorld, MuJoCo): the exact
        log|det(I + dt J)| of every Euler step, so the density of the samples the sampler draws; above
        that, the first-order dt tr(J) with Hutchinson's trace estimate (the stored probe). Needs
        `keep_noise`.
        """
        if "x0" not in store:
            raise RuntimeError("FlowActor.entropy needs the chunks' initial noise: build the actor with "
                               "keep_noise=True (the trainer does when rl.ent_coef > 0)")
        cache = self.prepare(obs) if inputs is None else inputs
        valid = cache.action_valid if cache.action_valid is not None else self.policy.action_valid[None]
        x0 = store["x0"].to(self.device)
        valid = valid[:, None, :].expand_as(x0)
        # the bonus differentiates the velocity's Jacobian: second order through attention, which only
        # the math kernel of scaled_dot_product_attention supports (the fused CPU/flash ones raise)
        with sdpa_kernel([SDPBackend.MATH]):
            x1, div = integrate_divergence(self.policy.velocity_fn(cache), x0, self.policy.config.sampler.num_steps,
                                           valid=valid, probe=store.get("probe"),
                                           exact_max_dim=ENTROPY_EXACT_MAX_DIM, euler_log_det=True)
        embodiments, idx = self.policy.embodiments, cache.embodiment
        a = embodiments.unnormalize_action(x1, idx, embodiments.width(idx, "action"))  # padding -> 0: no term
        squash = tanh_log_det(a).reshape(a.shape[0], -1).sum(-1)
        return 0.5 * LOG_2PI_E * valid.reshape(valid.shape[0], -1).sum(-1) + div + squash

    @torch.no_grad()
    def eval_act(self, obs: Mapping[str, Any], zero_noise: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
        """Chunks (b, h, a) from zero initial noise (the flow's 'mode'), or from random noise."""
        b = obs[STATE].shape[0]
        noise = self.policy.sample_noise(b, generator)
        return self.policy.predict_action_chunk(self._named(obs), noise=torch.zeros_like(noise) if zero_noise else noise)

    def save_pretrained(self, directory) -> Path:
        return self.policy.save_pretrained(directory)


LOG_2 = math.log(2.0)


def tanh_log_det(u: Tensor) -> Tensor:
    """log |d tanh(u) / du| = log(1 - tanh(u)^2), computed stably: 2 (log 2 - u - softplus(-2u))."""
    return 2.0 * (LOG_2 - u - nn.functional.softplus(-2.0 * u))


class GaussianActor(nn.Module):
    """PPO's Gaussian actor over the executed chunk: u ~ N(mu(state), diag(exp(log_std))^2), a = squash(u)."""

    def __init__(self, state_dim: int, action_dim: int, n_action_steps: int, config: GaussianConfig,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.state_dim, self.action_dim, self.n_action_steps, self.config = state_dim, action_dim, n_action_steps, config
        out = n_action_steps * action_dim
        layers: list[nn.Module] = []
        width_in = state_dim
        for _ in range(config.depth):
            layers += [nn.Linear(width_in, config.width), nn.Tanh()]
            width_in = config.width
        last = nn.Linear(width_in, out)
        nn.init.normal_(last.weight, std=0.01)  # start near a zero mean (CleanRL: orthogonal, gain 0.01)
        nn.init.zeros_(last.bias)
        self.mean_net = nn.Sequential(*layers, last)
        self.log_std = nn.Parameter(torch.full((out,), float(config.init_log_std)))
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.log_std.device

    def mean(self, obs: Mapping[str, Any]) -> Tensor:
        """Pre-squash means (b, k*a) of the executed chunk."""
        return self.mean_net(obs[STATE].to(self.device, torch.float32))

    def log_prob(self, obs: Mapping[str, Any], u: Tensor) -> Tensor:
        """log density (b,) of the squashed action a = squash(u) given the pre-squash sample u (b, k*a).

        tanh: log N(u) - sum log(1 - tanh(u)^2) (change of variables). clip: log N(u) (the density of
        the stored pre-clip sample; the clip is part of the environment).
        """
        dist = torch.distributions.Normal(self.mean(obs), self.log_std.exp())
        logp = dist.log_prob(u).sum(-1)
        if self.config.squash == "tanh":
            logp = logp - tanh_log_det(u).sum(-1)
        return logp

    def squash(self, u: Tensor) -> Tensor:
        return torch.tanh(u) if self.config.squash == "tanh" else u.clamp(-1.0, 1.0)

    def _chunk(self, a: Tensor) -> Tensor:
        return a.reshape(a.shape[0], self.n_action_steps, self.action_dim)  # (b, k*a) -> (b, k, a)

    def storable(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        return dict(obs)

    def prepare(self, obs: Mapping[str, Any]) -> None:
        return None  # the mean MLP reads the state directly

    @staticmethod
    def state_z(obs: Mapping[str, Any]) -> None:
        """(FlowActor.state_z) No state normalizer here."""
        return None

    @staticmethod
    def critic_features(inputs: None) -> None:
        return None

    @torch.no_grad()
    def act(self, obs: Mapping[str, Any], generator: torch.Generator | None = None,
            inputs: None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Chunks (b, k, a) and the store {"pre_squash" (b, k*a), "logp_old" (b,)}."""
        mean = self.mean(obs)
        u = mean + self.log_std.exp() * sample_noise(mean.shape, generator=generator, device=self.device)
        return self._chunk(self.squash(u)), {"pre_squash": u, "logp_old": self.log_prob(obs, u)}

    def log_ratio(self, obs: Mapping[str, Any], chunk: Tensor, store: Mapping[str, Tensor], inputs: None = None,
                  executed: Tensor | None = None) -> tuple[Tensor, dict]:
        """log pi_new - log pi_old (b,) of the stored pre-squash sample (all k steps: the Gaussian models
        only the executed part of the chunk; `executed` is not used)."""
        logp = self.log_prob(obs, store["pre_squash"])
        return logp - store["logp_old"], {"log_std": self.log_std.mean().detach()}

    def ratio_reference(self, store: Mapping[str, Tensor]) -> Tensor:
        return store["logp_old"]

    def regularizer(self, obs: Mapping[str, Any], store: Mapping[str, Tensor]) -> None:
        return None

    def entropy(self, obs: Mapping[str, Any], store: Mapping[str, Tensor], inputs: None = None) -> Tensor:
        """(b,) entropy of the pre-squash Gaussian (CleanRL's choice: the tanh's correction left out);
        it depends on the log-std only."""
        per_entry = 0.5 * LOG_2PI_E + self.log_std
        return per_entry.sum().expand(store["logp_old"].shape[0])

    @torch.no_grad()
    def eval_act(self, obs: Mapping[str, Any], zero_noise: bool = True,
                 generator: torch.Generator | None = None) -> Tensor:
        """The squashed mean (zero_noise) or a random sample, (b, k, a)."""
        if zero_noise:
            return self._chunk(self.squash(self.mean(obs)))
        return self.act(obs, generator)[0]

    def save_pretrained(self, directory) -> Path:
        """`config.json` (widths + GaussianConfig) and `model.safetensors` in `directory`."""
        directory = Path(directory)
        meta = {"type": "GaussianActor", "state_dim": self.state_dim, "action_dim": self.action_dim,
                "n_action_steps": self.n_action_steps, "config": config_to_dict(self.config)}
        with atomic_directory(directory) as tmp:
            (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()},
                      str(tmp / "model.safetensors"))
        return directory
