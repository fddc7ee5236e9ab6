"""The RL trainer: FPO on a flow policy and Gaussian PPO (the baseline) in one readable loop.

Each iteration: collect n macro-steps in e envs (`RolloutCollector`) -> GAE over macro-steps ->
`update_epochs` passes over shuffled minibatches of the policy surrogate (`rl.surrogate`: PPO's clip,
or FPO++'s asymmetric "aspo") + value loss (no entropy term), with gradient clipping; the first `critic_warmup_iterations` train only the critic.
The only difference between the two methods is the actor's `log_ratio` (actors.py).

Built-in checks: at the first minibatch of every update the ratio must be 1 up to float32 rounding
(`ratio_check_tolerance`: 1e-6, or 16 ulps of the largest stored loss / log-prob; the policy has not
moved since the rollout: anything else means the stored pairs / log-probs do not reproduce the
rollout policy); a non-finite loss or gradient stops the run before the weights change.

Checkpoints (atomic, every `save_every` iterations and at the end) hold the actor, critic,
optimiser, every random stream (global, rollout, minibatch order) and the collector (current
observations, running returns, and the env's state when it can be captured: our torch envs and the
bandit). **Resume guarantee**: with such an env, on the same device, a resumed run reproduces the
uninterrupted run exactly (same weights; tested). With an env whose state cannot be captured
(gymnasium numpy envs such as Pendulum-v1) it resumes at the last checkpointed iteration boundary
with the same weights, optimiser and random streams, but the envs are re-seeded
(seed + 7919 * iteration) and reset, so the trajectories after the resume differ.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmpolicy.batch import STATE
from fmpolicy.config import config_from_dict, config_to_dict, saved_run_dict
from fmpolicy.errors import ConfigError
from fmpolicy.io import atomic_write, atomic_write_json
from fmpolicy.normalize import far_state_warning
from fmpolicy.policy import FlowPolicy
from fmpolicy.rl import observations
from fmpolicy.rl.actors import ROW_LOSSES, FlowActor, GaussianActor
from fmpolicy.rl.config import RLRunConfig
from fmpolicy.rl.evaluate import evaluate_actor
from fmpolicy.rl.gae import compute_gae
from fmpolicy.rl.objectives import (compute_policy_surrogate, compute_value_loss, explained_variance,
                                     normalize_advantages)
from fmpolicy.rl.rollout import RolloutCollector, make_vector_env
from fmpolicy.rl.value import ValueNet
from fmpolicy.run import RunFolder, open_run, progress, rng_state, seed_everything, set_rng_state
from fmpolicy.run.distributed import (DistInfo, all_finite, all_reduce_mean, average_gradients, barrier,
                                      gather_objects, init_distributed, reduce_max, shutdown)

RANK_SEED_STRIDE = 1_000_003  # process r of a torchrun seeds its envs and rollout noise with seed + r * this
RATIO_CHECK_TOL = 1e-6  # the least deviation of the first ratio from 1 that stops the run (see ratio_check_tolerance)
# config fields a resumed run may change: none of them changes the trained weights (everything else
# must match the checkpoint's config). The run's length may change too when the lr is not annealed
# over it (then the first iterations are the same whatever the length).
RESUMABLE_CHANGES = ("rl.progress", "rl.save_every", "rl.log_every", "rl.keep_checkpoints", "rl.out_dir", "rl.keep_best",
                     "rl.device", "policy.device", "rl.eval_every", "rl.eval_episodes")
EVAL_SEED_OFFSET = 10_000  # evaluation envs start from seed + this: states the rollouts' seeds do not give


class RatioCheckError(RuntimeError):
    """The ratio was not 1 before the first update step: the rollout policy cannot be reproduced."""


@dataclass
class RLResult:
    actor: nn.Module
    critic: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)  # one log record per iteration


def make_actor(config: RLRunConfig, device: torch.device):
    """The actor the config asks for, and the PolicyConfig that gives its shapes."""
    rc = config.rl
    if rc.policy_type == "gaussian":
        pc = config.policy
        return GaussianActor(pc.state_dim, pc.action_dim, config.n_action_steps(), rc.gaussian, device), pc
    overrides = rc.finetune.encoder_overrides()  # what of the encoder trains in this run (null: as saved)
    if config.init_from:
        policy = FlowPolicy.from_pretrained(config.init_from, device=str(device), encoder_overrides=overrides)
    else:
        norm = config.policy.normalization
        if norm.state != "identity" or norm.action != "identity":
            raise ConfigError(f"policy.normalization = {norm} cannot be fitted without data: use 'identity' for "
                              "state and action when training from scratch, or init_from an imitation checkpoint")
        pc = config.policy
        if overrides:
            if pc.encoder.kind == "none":
                raise ConfigError(f"rl.finetune sets {overrides}, but policy.encoder.kind = 'none': the policy has no "
                                  "encoder to freeze or adapt")
            pc = dataclasses.replace(pc, encoder=dataclasses.replace(pc.encoder, **overrides))
        policy = FlowPolicy(dataclasses.replace(pc, device=str(device)))
    if policy.config.head != "flow":
        raise ConfigError(f"policy.head = {policy.config.head!r}: FPO needs a 'flow' policy")
    return FlowActor(policy, rc.fpo, keep_noise=rc.ent_coef > 0, embodiment=rc.embodiment), policy.config


def parameter_groups(actor, actor_params: list[nn.Parameter], critic_params: list[nn.Parameter], rc) -> list[dict]:
    """Adam's parameter groups: the flow policy's encoder, the rest of the actor (the expert; the Gaussian's
    mean and log-std), the critic, each with its lr (`base_lr`, which anneal_lr scales). Empty groups are
    left out."""
    ft = rc.finetune
    encoder = getattr(getattr(actor, "policy", None), "encoder", None)
    in_encoder = {id(p) for p in encoder.parameters()} if encoder is not None else set()
    groups = [("encoder", [p for p in actor_params if id(p) in in_encoder], ft.lr_encoder),
              ("actor", [p for p in actor_params if id(p) not in in_encoder], ft.lr_expert),
              ("critic", critic_params, ft.lr_critic)]
    return [{"params": params, "lr": lr or rc.lr, "base_lr": lr or rc.lr, "name": name}
            for name, params, lr in groups if params]


def to_cpu(tree):
    """A copy of nested dicts / lists with every tensor on the CPU (to gather and save process states)."""
    if isinstance(tree, torch.Tensor):
        return tree.cpu()
    if isinstance(tree, dict):
        return {k: to_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(v) for v in tree)
    return tree


def ratio_check_tolerance(reference: torch.Tensor) -> float:
    """How far the ratio before the first update may sit from 1: float32 rounding, no more.

    The update recomputes the old losses (log-probs) on a minibatch, whose float32 sums run in another
    order than the rollout batch's on some CPUs and GPUs; each value can then move by a few units in
    the last place of its magnitude. 16 ulps of the largest stored value (>= RATIO_CHECK_TOL) allow
    that and nothing more: a dropout layer left on, or a weight that moved, gives 1e-2-ish.
    """
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    return max(RATIO_CHECK_TOL, 16 * torch.finfo(torch.float32).eps * scale)


def _slice(tree: dict[str, torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[idx] for k, v in tree.items()}


@dataclass
class UpdateBatch:
    """One rollout, flat (rows = chunks), as the update reads it (this process's rows under torchrun)."""

    obs: dict[str, Any]  # as the actor stores observations (fmpolicy.rl.observations)
    store: dict[str, torch.Tensor]  # the actor's per-chunk data
    chunks: torch.Tensor  # (b, h, a)
    executed: torch.Tensor  # (b, h) bool
    advantages: torch.Tensor  # (b,) raw GAE advantages
    returns: torch.Tensor  # (b,)
    values: torch.Tensor  # (b,) V at rollout time


def update_policy(actor, critic, optimizer, batch: UpdateBatch, minibatches: list[tuple[torch.Tensor, ...]], rc,
                  warmup: bool = False, iteration: int = 0, info: DistInfo | None = None) -> tuple[dict, float]:
    """The PPO-style update of one rollout: for each epoch, for each minibatch of row indices in
    `minibatches[epoch]`, the policy surrogate (`actor.log_ratio`) + value loss (+ regulariser, entropy),
    one clipped Adam step. Returns the per-minibatch diagnostics summed, and the first ratio's largest
    deviation from 1 (checked: `RatioCheckError`).

    Under torchrun (`info.enabled`) every process holds its own rollout and minibatches of equal size;
    advantages are standardised over all processes' rows and the gradients are averaged over the
    processes before clipping, so that the step equals one process's on the union of the minibatches
    (tests/test_rl_ddp.py). The checks (ratio, finite loss and gradient) stop every process together.
    """
    info = info or DistInfo()
    actor_params = [p for group in optimizer.param_groups if group["name"] != "critic" for p in group["params"]]
    critic_params = [p for group in optimizer.param_groups if group["name"] == "critic" for p in group["params"]]
    max_norm = rc.max_grad_norm if rc.max_grad_norm > 0 else math.inf
    per_minibatch = rc.normalize_advantages and rc.normalize_advantages_over == "minibatch"
    b_adv = batch.advantages
    if rc.normalize_advantages and not per_minibatch:  # the whole rollout at once (returns keep the raw ones)
        b_adv = normalize_advantages(b_adv, info)
    sums: dict[str, torch.Tensor] = {}  # per-minibatch diagnostics, summed on the device (one sync at the end)
    first_dev = math.nan
    updates = 0
    approx_kl = torch.zeros(())  # of the last minibatch (target_kl reads it after each epoch)
    for epoch, chunks in enumerate(minibatches):
        if epoch > 0 and rc.target_kl is not None and float(all_reduce_mean(approx_kl, info)) > rc.target_kl:
            break  # CleanRL's early stop: the last minibatch moved the policy past target_kl
        for mb_index, mb in enumerate(chunks):
            obs_mb, store_mb = observations.take(batch.obs, mb), _slice(batch.store, mb)
            inputs = actor.prepare(obs_mb)  # the policy's encoder / prefix cache: once for every term below
            log_ratio, actor_stats = actor.log_ratio(obs_mb, batch.chunks[mb], store_mb, inputs, batch.executed[mb])
            ratio = log_ratio.exp()
            if epoch == 0 and mb_index == 0:  # nothing has moved yet: the ratio must be exactly 1
                first_dev = float(reduce_max((ratio.detach() - 1.0).abs().max(), info))
                tol = ratio_check_tolerance(reduce_max(actor.ratio_reference(store_mb).detach().abs().max(), info))
                if not first_dev <= tol:
                    raise RatioCheckError(
                        f"iteration {iteration}: the ratio before the first update step deviates from 1 by "
                        f"{first_dev:.3g} (> {tol:.3g}): the stored rollout data do not reproduce the "
                        "rollout policy (dropout or another random layer in train mode, weights changed "
                        "between rollout and update, or pairs / log-probs not stored with their samples)")
            approx_kl = ((ratio.detach() - 1.0) - log_ratio.detach()).mean()  # k3 estimator (CleanRL's approx_kl)
            if rc.desired_kl is not None and not warmup and not (epoch == 0 and mb_index == 0):
                adapt_lr(optimizer, float(all_reduce_mean(approx_kl, info)), rc)  # before the step, as rsl_rl
            adv = b_adv[mb]
            if per_minibatch:
                adv = normalize_advantages(adv, info)
            pg_loss = compute_policy_surrogate(ratio, adv, rc.clip, rc.surrogate).mean()
            row_losses = actor_stats.pop(ROW_LOSSES, None)  # (b,) with their graph, when positive_imitation > 0
            v_loss = compute_value_loss(critic(obs_mb, actor.critic_features(inputs)), batch.returns[mb],
                                        batch.values[mb], rc.value_clip).mean()
            loss = rc.vf_coef * v_loss + (0.0 if warmup else pg_loss)
            if row_losses is not None:
                # advantage-weighted CFM on the better-than-expected chunks: not clipped, it keeps pulling
                imitation = (adv.clamp_min(0.0) * row_losses).mean()
                loss = loss + (0.0 if warmup else rc.fpo.positive_imitation * imitation)
                actor_stats = {**actor_stats, "positive_imitation_loss": imitation.detach()}
            reg = actor.regularizer(obs_mb, store_mb)
            if reg is not None:
                loss = loss + (0.0 if warmup else reg[0])
                actor_stats = {**actor_stats, **reg[1]}
            if rc.ent_coef > 0 and not warmup:
                entropy = actor.entropy(obs_mb, store_mb, inputs).mean()
                loss = loss - rc.ent_coef * entropy
                actor_stats = {**actor_stats, "entropy": entropy.detach()}
            if not all_finite(loss, info):
                raise FloatingPointError(
                    f"iteration {iteration}, epoch {epoch}, minibatch {mb_index}: non-finite loss "
                    f"(policy {pg_loss.item()}, value {v_loss.item()}): stopping before the weights change")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(actor_params + critic_params, info)
            # clipped separately: a large value gradient (early, or unscaled rewards) must not
            # shrink the policy's step to nothing
            grad_norm = nn.utils.clip_grad_norm_(actor_params, max_norm)
            value_grad_norm = nn.utils.clip_grad_norm_(critic_params, max_norm)
            if not bool(torch.isfinite(grad_norm) & torch.isfinite(value_grad_norm)):
                raise FloatingPointError(f"iteration {iteration}, epoch {epoch}, minibatch {mb_index}: "
                                         "non-finite gradient: stopping before the weights change")
            optimizer.step()
            updates += 1

            r = ratio.detach()
            mb_stats = {"policy_loss": pg_loss, "value_loss": v_loss, "grad_norm": grad_norm,
                        "value_grad_norm": value_grad_norm,
                        "clip_fraction": ((r - 1.0).abs() > rc.clip).float().mean(),
                        "approx_kl": approx_kl, **actor_stats}
            for key, v in mb_stats.items():
                sums[key] = sums.get(key, 0.0) + v.detach()
            sums["ratio_min"] = torch.minimum(sums.get("ratio_min", r.min()), r.min())
            sums["ratio_max"] = torch.maximum(sums.get("ratio_max", r.max()), r.max())
    sums["updates"] = torch.tensor(float(updates))  # minibatch steps taken (fewer when target_kl stopped early)
    return sums, first_dev


def adapt_lr(optimizer: torch.optim.Optimizer, kl: float, rc) -> None:
    """rsl_rl's adaptive schedule on the policy's parameter groups (the critic's lr stays): divide by 1.5
    when the KL is over 2x `rc.desired_kl`, multiply by 1.5 under half of it, within [lr_min, lr_max]."""
    if kl > 2.0 * rc.desired_kl:
        factor = 1.0 / 1.5
    elif kl < 0.5 * rc.desired_kl:
        factor = 1.5
    else:
        return
    for group in optimizer.param_groups:
        if group["name"] != "critic":
            group["lr"] = min(rc.lr_max, max(rc.lr_min, group["lr"] * factor))


def train_rl(config: RLRunConfig, resume: bool = False, overwrite: bool = False,
             allow_changes: Iterable[str] = ()) -> RLResult:
    """Run RL fine-tuning as `config` says; returns the trained actor, critic and the per-iteration log.

    The run folder `rl.out_dir` is held by this process alone (see `fmpolicy.run.folder`): a folder that
    holds a run is refused unless `resume` (continue from the last checkpoint; a change of a setting
    that alters the result is refused unless named in `allow_changes`) or `overwrite` (move it aside).
    """
    info = init_distributed(config.rl.device)
    if not info.is_main:
        barrier(info)  # rank 0 opens (locks, checks, tidies) the folder first; the others only read it
    with open_run(config.rl.out_dir, resume=resume, overwrite=overwrite, writer=info.is_main,
                  keep_checkpoints=config.rl.keep_checkpoints) as run:
        if info.is_main:
            if run.last_checkpoint is not None:
                may_change = RESUMABLE_CHANGES + (() if config.rl.anneal_lr else ("rl.total_env_steps",))
                run.check_resume(config_to_dict(config), may_change, allow_changes,
                                 complete=lambda saved: config_to_dict(config_from_dict(RLRunConfig, saved_run_dict(saved))))
            barrier(info)
        result = _train_rl(config, run, info)
    shutdown(info)
    return result


def _train_rl(config: RLRunConfig, run: RunFolder, info: DistInfo) -> RLResult:
    rc = config.rl
    device = info.device
    out = run.path
    seed_everything(rc.seed)  # the same initial weights in every process
    # each process its own envs and rollout noise (process 0: the single-process streams)
    rank_seed = rc.seed + RANK_SEED_STRIDE * info.rank

    # ---- actor, critic, optimiser ----
    actor, policy_config = make_actor(config, device)
    k = rc.n_action_steps or policy_config.n_action_steps  # env steps per chunk (macro-step)
    if k > policy_config.chunk_size:
        raise ConfigError(f"rl.n_action_steps = {k} is invalid: expected at most the policy's chunk_size "
                          f"= {policy_config.chunk_size}")
    if rc.policy_type == "flow" and k != policy_config.n_action_steps:
        # the tuned policy works as its rollouts executed it (docs/rl.md): the policy it saves executes k
        # steps a chunk too, in select_action, evaluate.py and the policy server
        policy_config = dataclasses.replace(policy_config, n_action_steps=k)
        actor.policy.config = policy_config
    # the inference delay of the rollouts (and the longest, what evaluations execute with)
    delay_range = (rc.rollout_delay, rc.rollout_delay if rc.rollout_delay_max is None else rc.rollout_delay_max)
    if delay_range[1]:
        field = "rollout_delay" if rc.rollout_delay_max is None else "rollout_delay_max"
        longest = delay_range[1]
        if rc.policy_type != "flow":
            raise ConfigError(f"rl.{field} = {longest} needs rl.policy_type 'flow' (the Gaussian actor's chunks "
                              f"hold only the n_action_steps = {k} executed steps), not {rc.policy_type!r}")
        if longest > k or k + longest > policy_config.chunk_size:
            raise ConfigError(f"rl.{field} = {longest} is invalid: expected at most n_action_steps = {k} "
                              f"and n_action_steps + {field} at most the policy's chunk_size = "
                              f"{policy_config.chunk_size} (the chunk runs from its step {field})")
    # the envs are one robot: with rl.embodiment, that one's widths (not the widest robot's), which the
    # critic reads and the envs must have
    robot = next((e for e in policy_config.embodiment_list() if e.name == rc.embodiment), None)
    if rc.embodiment and robot is not None:
        state_width, action_width, where = robot.state_dim, robot.action_dim, f"embodiment {robot.name!r}'s "
    else:
        state_width, action_width, where = policy_config.state_dim, policy_config.action_dim, "policy."
    critic = ValueNet(state_width, rc.value, policy_config.expert.prefix_dim, device)
    actor_params = [p for p in actor.parameters() if p.requires_grad]  # not FPO's frozen reference policy
    critic_params = list(critic.parameters())
    # one Adam for both nets: its state is per parameter and the gradients are clipped per net, so this is
    # exactly two separate Adams (the FPO paper code's), tested. One parameter group per part (expert,
    # encoder, critic), each with its own lr (rl.finetune.lr_*; rl.lr where unset)
    optimizer = torch.optim.Adam(parameter_groups(actor, actor_params, critic_params, rc), lr=rc.lr, eps=rc.adam_eps)

    # ---- environments and the rollout collector ----
    envs = make_vector_env(config.env.id, rc.num_envs, device, rank_seed, config.env.kwargs)
    env_action_dim = int(np.prod(envs.single_action_space.shape))
    if env_action_dim != action_width:
        raise ConfigError(f"{where}action_dim = {action_width} does not match {config.env.id}'s "
                          f"action space {envs.single_action_space.shape}")
    collector = RolloutCollector(envs, actor, critic, k, rc.gamma, device, rc.fresh_chunk_after_reset,
                                 rc.action_rate_penalty, delay_range)
    rollout_gen = torch.Generator(device=device).manual_seed(rank_seed + 1)  # flow noise, pairs, Gaussian samples
    minibatch_gen = torch.Generator().manual_seed(rc.seed + 2)  # minibatch order
    batch_size = rc.num_envs * rc.num_macro_steps  # chunks per rollout (of this process)
    steps_per_iteration = batch_size * k * info.world_size
    num_iterations = rc.total_env_steps // steps_per_iteration
    if num_iterations < 1:
        raise ConfigError(f"rl.total_env_steps = {rc.total_env_steps} is less than one rollout "
                          f"(num_envs * num_macro_steps * n_action_steps = {steps_per_iteration} env steps)")

    # ---- resume ----
    start, history = 0, []
    if run.last_checkpoint is not None:
        state = run.load_state()
        actor.load_state_dict(state["actor"])
        critic.load_state_dict(state["critic"])
        optimizer.load_state_dict(state["optimizer"])
        minibatch_gen.set_state(state["minibatch_generator"])
        set_rng_state(state["rng"])
        start, history = state["iteration"], state["history"]
        ranks = state.get("ranks") or [{"collector": state["collector"], "rollout_generator": state["rollout_generator"]}]
        if len(ranks) != info.world_size:
            raise ConfigError(f"{run.last_checkpoint} was written by {len(ranks)} process(es): resume it with as many "
                              f"(got {info.world_size}); each holds its own envs")
        mine = ranks[info.rank]
        rollout_gen.set_state(mine["rollout_generator"])
        if not collector.load_state_dict(mine["collector"]):
            collector.reset(seed=rank_seed + 7919 * start)  # the env state was not captured: re-seed
        if info.is_main:
            print(f"resumed from {run.last_checkpoint} at iteration {start}")
    else:
        collector.reset(seed=rank_seed)
    state_dim = collector.obs[STATE].shape[-1]
    if state_dim != state_width:
        raise ConfigError(f"{where}state_dim = {state_width} does not match {config.env.id}'s "
                          f"observation.state width {state_dim}")
    run.write_config(config_to_dict(config))
    logger = run.logger()

    eval_envs = (make_vector_env(config.env.id, rc.eval_episodes, device, rc.seed + EVAL_SEED_OFFSET,
                                 config.env.evaluation_kwargs) if rc.eval_every and info.is_main else None)  # process 0 evaluates

    def evaluate() -> dict[str, Any]:
        """Deterministic (zero initial noise / Gaussian mean) and sampled returns, successes and episode
        lengths on fixed start states, the chunks executed as in the rollouts (rl.rollout_delay); with several
        tasks (instructions) in the envs, the success rate of each too."""
        out: dict[str, Any] = {}
        was_training = actor.training
        actor.eval()
        for zero, suffix in ((True, ""), (False, "_sampled")):
            gen = torch.Generator(device=device).manual_seed(rc.seed + 3)  # own stream: rollouts are unaffected
            r = evaluate_actor(actor, eval_envs, k, zero, rc.seed + EVAL_SEED_OFFSET, gen,
                               inference_delay=delay_range[1])
            out[f"eval_return{suffix}"], out[f"eval_success{suffix}"] = r["return"], r["success"]
            out[f"eval_length{suffix}"] = r["length"]
            if "success_by_task" in r:  # several tasks (instructions): each one's rate
                out[f"eval_success_by_task{suffix}"] = r["success_by_task"]
        actor.train(was_training)
        return out

    def checkpoint(iteration: int) -> None:
        # each process's envs and rollout noise, gathered into process 0's checkpoint
        ranks = gather_objects({"collector": to_cpu(collector.state_dict()),
                                "rollout_generator": rollout_gen.get_state()}, info)
        state = {"iteration": iteration, "actor": actor.state_dict(), "critic": critic.state_dict(),
                 "optimizer": optimizer.state_dict(), "minibatch_generator": minibatch_gen.get_state(),
                 "rng": rng_state(), "ranks": ranks, "history": history}
        run.save_checkpoint(iteration, actor, state)

    # the best zero-noise evaluation so far (a resumed run recomputes it from its history)
    best_score = max((s for s in map(_eval_score, history) if s is not None), default=None)
    follow_best = rc.fpo.ref_policy == "best"  # flow only (RLConfig refuses it for the Gaussian)

    def keep_if_best(record: dict[str, Any], evaluated: bool) -> None:
        """On an evaluation that beats every earlier one: save it (rl.keep_best) and make it FPO's
        reference (fpo.ref_policy best). `evaluated`: an evaluation was due at this record (process 0
        ran it; the others learn of a new best through the reduction, so their references move too)."""
        nonlocal best_score
        score = _eval_score(record)
        better = score is not None and (best_score is None or score > best_score)
        if follow_best and evaluated:
            better = bool(reduce_max(torch.tensor(float(better), device=device), info) > 0)
        if not better:
            return
        if score is not None:
            best_score = score
        if follow_best:
            actor.set_reference_to_policy()
            record["reference_updated"] = True
        if rc.keep_best and info.is_main:
            actor.save_pretrained(out / "best_policy")
            atomic_write_json(out / "best_policy.json", {"iteration": record["iteration"],
                                                         "eval_success": record.get("eval_success"),
                                                         "eval_return": record["eval_return"]})

    # ---- the loop ----
    run_start = time.perf_counter()
    elapsed_before = history[-1].get("elapsed_s", 0.0) if history else 0.0  # a resumed run counts on
    elapsed = lambda: elapsed_before + time.perf_counter() - run_start  # noqa: E731
    if eval_envs is not None and start == 0:
        history.append({"iteration": 0, "env_steps": 0, **evaluate(), "elapsed_s": elapsed()})
        # the start's evaluation (process 0 alone): the best so far, and already the reference, so no reduction
        keep_if_best(history[-1], evaluated=False)
        history[-1].pop("reference_updated", None)
        logger.log(0, history[-1])
    iterations = progress(range(start, num_iterations), rc.progress, "rl")
    warned_far_states = False
    for iteration in iterations:
        tick = time.perf_counter()
        if rc.anneal_lr:  # linear decay to 0 over the run (CleanRL's anneal_lr); a function of the iteration
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * (1.0 - iteration / num_iterations)

        # -- rollout: n macro-steps in e envs with the current policy --
        rollout = collector.collect(rc.num_macro_steps, rollout_gen)
        rollout_s = _seconds_since(tick, device)

        # -- advantages: GAE over macro-steps, discount gamma^k per macro-step --
        advantages, returns = compute_gae(rollout.rewards * rc.reward_scale, rollout.values, rollout.terminated,
                                          rollout.truncated, rollout.next_value, rollout.final_values,
                                          gamma=rc.gamma**k, lam=rc.gae_lambda)

        # -- flatten (n, e, ...) -> (n*e, ...) --
        flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
        batch = UpdateBatch(obs=rollout.obs,  # already flat, as the actor stores observations
                            store={key: flat(v) for key, v in rollout.store.items()}, chunks=flat(rollout.chunks),
                            executed=flat(rollout.executed), advantages=flat(advantages), returns=flat(returns),
                            values=flat(rollout.values))

        # -- update: epochs over shuffled minibatches; critic only during the warm-up --
        warmup = iteration < rc.critic_warmup_iterations
        minibatches = [torch.randperm(batch_size, generator=minibatch_gen).to(device).chunk(rc.num_minibatches)
                       for _ in range(rc.update_epochs)]
        update_tick = time.perf_counter()
        sums, first_dev = update_policy(actor, critic, optimizer, batch, minibatches, rc, warmup=warmup,
                                        iteration=iteration, info=info)
        update_s = _seconds_since(update_tick, device)
        b_values, b_ret, b_chunks, b_obs = batch.values, batch.returns, batch.chunks, batch.obs

        # -- diagnostics (episodes: of every process; the rest: process 0's rollout) --
        ep_returns, ep_successes = (sum(x, []) for x in zip(*gather_objects(
            (rollout.episode_returns, rollout.episode_successes), info)))
        n_updates = int(sums.pop("updates"))
        done = iteration + 1
        record: dict[str, Any] = {
            "iteration": done, "env_steps": done * steps_per_iteration, "critic_warmup": warmup,
            **{key: float(v) / (1 if key.startswith("ratio_m") else n_updates) for key, v in sums.items()},
            "updates": n_updates,
            "ratio_first_max_dev": first_dev,
            "explained_variance": explained_variance(b_values, b_ret),
            "macro_reward_mean": float(rollout.rewards.mean()),
            "action_out_of_box": out_of_box_fraction(rollout.chunks, rollout.executed),
            **({"action_rate": rollout.action_rate} if rollout.action_rate is not None else {}),
            "episode_return": float(np.mean(ep_returns)) if ep_returns else None,
            "episodes": len(ep_returns),
            "success_rate": float(np.mean(ep_successes)) if ep_successes else None,
            "seconds": time.perf_counter() - tick, "rollout_s": rollout_s, "update_s": update_s,
            **{("lr" if g["name"] == "actor" else f"lr_{g['name']}"): g["lr"] for g in optimizer.param_groups},
        }
        evaluated = bool(rc.eval_every) and (done % rc.eval_every == 0 or done == num_iterations)
        if eval_envs is not None and evaluated:
            record.update(evaluate())
        record["elapsed_s"] = elapsed()  # wall time since the run began, evaluations included
        z = actor.state_z(b_obs)
        if z is not None:
            record["state_z_max"] = float(z.max())
            if not warned_far_states and info.is_main:
                warned_far_states = _warn_far_states(z, done)
        if hasattr(envs, "action_stats"):  # env-specific diagnostics of the executed actions (the bandit's modes)
            record.update(envs.action_stats(b_chunks[:, 0], b_obs[STATE]))
        keep_if_best(record, evaluated)
        history.append(record)
        if done % rc.log_every == 0 or done == num_iterations:
            logger.log(done, record)
        if hasattr(iterations, "set_postfix"):
            iterations.set_postfix(ret=record["episode_return"], clip=f"{record['clip_fraction']:.2f}")
        if done % rc.save_every == 0 or done == num_iterations:
            checkpoint(done)

    logger.close()
    if info.is_main:
        actor.save_pretrained(out / "policy")
        plot_learning_curve(history, out / "learning_curve.png", title=f"{rc.policy_type} on {config.env.id}")
    return RLResult(actor=actor, critic=critic, history=history)



def out_of_box_fraction(chunks: torch.Tensor, executed: torch.Tensor) -> float:
    """The fraction of executed action entries outside [-1, 1] (chunks (n, e, h, a), executed (n, e, h)).
    The envs clip them, so nothing pushes a flow's samples back: a policy that ends up far outside the box
    acts bang-bang and loses fine control (`fpo.clip_actions` stores the clipped chunk instead)."""
    entries = chunks[executed]
    return float((entries.abs() > 1.0).float().mean()) if entries.numel() else 0.0


def _eval_score(record: dict[str, Any]) -> tuple[float, float] | None:
    """A log record's zero-noise evaluation as (success rate, return), compared in that order (a missing
    success counts as -inf), None without an evaluation."""
    if record.get("eval_return") is None:
        return None
    success = record.get("eval_success")
    return (-math.inf if success is None else float(success), float(record["eval_return"]))


def _warn_far_states(z: torch.Tensor, iteration: int) -> bool:
    """Print one warning when some state entry's |normalized value| (`FlowActor.state_z`) is over
    STATE_Z_WARN; True when it did."""
    message = far_state_warning(z, f"at iteration {iteration}")
    if message:
        print(message)
    return message is not None


def _seconds_since(tick: float, device: torch.device) -> float:
    """Wall seconds since `tick`, after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - tick


def plot_learning_curve(history: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Mean episode return (and success rate when reported) against env steps, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["env_steps"], h["episode_return"]) for h in history if h.get("episode_return") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        ax.plot(*zip(*points), label="rollout episode return")
    for key, style in (("eval_return", "o-"), ("eval_return_sampled", "x--")):
        ev = [(h["env_steps"], h[key]) for h in history if h.get(key) is not None]
        if ev:
            ax.plot(*zip(*ev), style, markersize=3, label=key.replace("_", " ") + (" (zero noise)" if key == "eval_return" else ""))
    if len(ax.get_lines()) > 1:
        ax.legend(loc="lower right", fontsize=8)
    succ = [(h["env_steps"], h["success_rate"]) for h in history if h.get("success_rate") is not None]
    if succ:
        ax2 = ax.twinx()
        ax2.plot(*zip(*succ), color="tab:green", alpha=0.6, label="success rate")
        ev = [(h["env_steps"], h["eval_success"]) for h in history if h.get("eval_success") is not None]
        if ev:
            ax2.plot(*zip(*ev), "o-", color="tab:olive", markersize=3, label="eval success (zero noise)")
        ax2.set_ylabel("success rate")
    ax.set_xlabel("env steps")
    ax.set_ylabel("mean episode return")
    ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
