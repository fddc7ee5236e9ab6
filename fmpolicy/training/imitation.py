"""The imitation trainer: one readable function from a config and a dataset to a trained policy.

AdamW with linear warm-up and cosine decay, gradient clipping, EMA of the weights, bf16 autocast on
CUDA, JSON-lines logs (TensorBoard too when asked and installed), atomic checkpoints every
`save_every` steps, and `resume=True` continuing from the last checkpoint with the same result as a
run that was never interrupted (every random stream is seeded and checkpointed). Under torchrun the
same function runs DistributedDataParallel; only rank 0 writes.

Data: every window in memory (`combine_windows`, images decoded once) for small datasets, or
streamed from disk by DataLoader workers (`fmpolicy/training/stream.py`) for video and large ones
(`data.stream`): the same sampler draws the same global batches either way, so the results agree
bit for bit (docs/datasets.md, "Large datasets").
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from fmpolicy.batch import ENCODER_FEATURES
from fmpolicy.config import ImitationConfig, config_from_dict, config_to_dict, saved_run_dict
from fmpolicy.errors import CheckpointError, ConfigError
from fmpolicy.policy import FlowPolicy
from fmpolicy.run import RunFolder, open_run, progress, rng_state, seed_everything, set_rng_state
from fmpolicy.run.distributed import DistInfo, all_reduce_mean, barrier, init_distributed, local_rows, shutdown
from fmpolicy.sampling import sample_noise
from fmpolicy.training.augment import draw_shifts, shift_batch
from fmpolicy.training.ema import EMA
from fmpolicy.training.loop import warmup_cosine
from fmpolicy.training.stream import WindowBatches, should_stream, stream_batches


class EpochSampler:
    """Global batches of window indices: a fresh seeded permutation every epoch, resumable."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        out = []
        need = self.batch_size
        while need:
            if self.pos == self.n:
                self.perm, self.pos = torch.randperm(self.n, generator=self.generator), 0
            take = min(need, self.n - self.pos)
            out.append(self.perm[self.pos: self.pos + take])
            self.pos += take
            need -= take
        return torch.cat(out)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        if "perm" not in state:
            raise CheckpointError("the checkpoint balanced episodes or tasks (data.balance); this run draws every "
                                  "window equally: the result would differ from an uninterrupted run")
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], state["pos"]


class BalancedSampler:
    """Global batches of window indices drawn with replacement so that every group of windows (an
    episode, or a task) is drawn equally often whatever its size: window i's chance is
    1 / (number of groups * windows in its group). With `weights` (one per group, > 0) group g is drawn
    in proportion to weights[g] instead (`data.task_weights`). Resumable: its state is its generator's."""

    def __init__(self, groups: torch.Tensor, batch_size: int, seed: int, weights: torch.Tensor | None = None):
        groups = torch.unique(groups, return_inverse=True)[1]  # 0 .. G-1
        self.counts = torch.bincount(groups)
        self.groups = int(len(self.counts))
        self.order = torch.argsort(groups, stable=True)  # the windows, group after group
        self.starts = torch.cumsum(self.counts, 0) - self.counts  # where each group begins in `order`
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float64)
            if weights.shape != (self.groups,) or not bool(torch.all(torch.isfinite(weights) & (weights > 0))):
                raise ValueError(f"BalancedSampler weights: {weights.tolist()}; expected {self.groups} finite "
                                 "numbers > 0, one per group")
            if bool(torch.all(weights == weights[0])):
                weights = None  # equal weights: the uniform draw (the same batches as without weights)
        self.weights = weights

    def next(self) -> torch.Tensor:
        # a group (uniformly or by weight), then a window of it uniformly (any number of windows: no
        # multinomial table over the windows, only over the groups)
        if self.weights is None:
            g = torch.randint(self.groups, (self.batch_size,), generator=self.generator)
        else:
            g = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        u = torch.rand(self.batch_size, generator=self.generator, dtype=torch.float64)
        within = (u * self.counts[g]).long().clamp_max(self.counts[g] - 1)
        return self.order[self.starts[g] + within]

    def state_dict(self) -> dict:
        state = {"generator": self.generator.get_state(), "balanced_groups": self.groups}
        if self.weights is not None:
            state["group_weights"] = self.weights.tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "balanced_groups" not in state:
            raise CheckpointError(f"the checkpoint drew every window equally (data.balance: windows); this run "
                                  f"balances {self.groups} groups: the result would differ from an uninterrupted run")
        if state["balanced_groups"] != self.groups:
            raise CheckpointError(f"the checkpoint balanced {state['balanced_groups']} groups; this run balances "
                                  f"{self.groups}: the result would differ from an uninterrupted run")
        mine = None if self.weights is None else self.weights.tolist()
        if state.get("group_weights") != mine:
            raise CheckpointError(f"the checkpoint drew its groups with weights {state.get('group_weights')}; this "
                                  f"run with {mine} (data.task_weights): the result would differ from an "
                                  "uninterrupted run")
        self.generator.set_state(state["generator"])


def window_groups(datasets: dict[str, Any], balance: str) -> torch.Tensor | None:
    """(N,) the group of every window, numbered as `combine_windows` concatenates the datasets: its
    episode ("episodes", per dataset) or its task string ("tasks", across datasets); None for "windows"."""
    if balance == "windows":
        return None
    parts, names = [], task_numbers(datasets)
    for k, dataset in enumerate(datasets.values()):
        if balance == "episodes":
            parts.append(dataset.episode_index * len(datasets) + k)
        else:
            ids = torch.tensor([names[t] for t in dataset.tasks], dtype=torch.long)
            parts.append(ids[dataset.task_index])
    return torch.cat(parts)


def task_numbers(datasets: dict[str, Any]) -> dict[str, int]:
    """Every task string of the datasets -> its group number (in order of first appearance, across datasets)."""
    names: dict[str, int] = {}
    for dataset in datasets.values():
        for t in dataset.tasks:
            names.setdefault(t, len(names))
    return names


def task_group_weights(datasets: dict[str, Any], task_weights: dict) -> torch.Tensor:
    """(G,) the weight of every task group, numbered as `window_groups(datasets, "tasks")` numbers them:
    `task_weights[task string]`, 1 for a task it does not name; a name that is no task is an error."""
    names = task_numbers(datasets)
    unknown = [k for k in task_weights if k not in names]
    if unknown:
        raise ConfigError(f"DataConfig.task_weights names {unknown}, which no dataset holds; its tasks are "
                          f"{list(names)} (weight only those, or data.task_weights={{}} for none)")
    return torch.tensor([float(task_weights.get(t, 1.0)) for t in names], dtype=torch.float64)


def make_sampler(datasets: dict[str, Any], balance: str, batch_size: int, seed: int, task_weights: dict | None = None):
    """The trainer's sampler of global batches: `EpochSampler`, or `BalancedSampler` over episodes / tasks
    (the tasks in proportion to `task_weights`, {task string: weight}, with balance "tasks")."""
    groups = window_groups(datasets, balance)
    if groups is None:
        return EpochSampler(sum(len(d) for d in datasets.values()), batch_size, seed)
    weights = task_group_weights(datasets, task_weights) if task_weights and balance == "tasks" else None
    if weights is not None:  # window_groups numbers only the tasks that have windows: keep those
        present = torch.unique(groups)
        weights = weights[present]
    return BalancedSampler(groups, batch_size, seed, weights)


def make_policy(config: ImitationConfig, datasets: dict[str, Any], device: torch.device) -> FlowPolicy:
    """A fresh policy whose widths match the datasets (one per embodiment) and whose normalizers
    use their stored statistics."""
    policy = FlowPolicy(dataclasses.replace(config.policy, device=str(device)))
    for name, dataset in datasets.items():
        spec = policy.embodiments.specs[policy.embodiments.get(name)]
        for field_name, have in (("state_dim", dataset.state_dim), ("action_dim", dataset.action_dim)):
            if getattr(spec, field_name) != have:
                where = "policy" if len(datasets) == 1 else f"policy.embodiments[{name}]"
                raise ConfigError(f"{where}.{field_name} = {getattr(spec, field_name)} does not match the dataset "
                                  f"{dataset.root} ({field_name} {have})")
        stats = dataset.stats
        policy.set_normalization_stats(stats["observation.state"], stats["action"], name)
    key = config.policy.aux.key
    if key:  # the auxiliary target's units, from every dataset's column (it must be in each)
        lacking = [str(d.root) for d in datasets.values() if key not in d.extras]
        if lacking:
            raise ConfigError(f"policy.aux.key = {key!r} is not a feature of the dataset {lacking[0]} (collect it, "
                              "e.g. Meta-World's env kwarg environment_state: true)")
        policy.fit_aux_normalization(torch.cat([d.extras[key].reshape(len(d.extras[key]), -1).float()
                                                for d in datasets.values()]))
    return policy


def floored_state_notes(policy: FlowPolicy) -> list[str]:
    """One line per embodiment whose state normalizer divided some entries by `relative_min_scale` of
    their value rather than their spread (entries that barely varied: the normaliser trap)."""
    notes = []
    for name, n in zip(policy.embodiments.names, policy.embodiments.state):
        if n.floored:
            scales = ", ".join(f"{n.scale[i].item():.3g}" for i in n.floored)
            notes.append(f"normalization: observation.state entries {n.floored} of {name!r} varied by less than "
                         f"{100 * n.relative_min_scale:g}% of their value in the data: divided by that ({scales}) rather "
                         "than their spread (policy.normalization.relative_min_scale)")
    return notes


def combine_windows(datasets: dict[str, Any], policy: FlowPolicy, device: torch.device) -> dict[str, Any]:
    """Every window of every dataset in one batch-like dict: states and actions zero-padded to the
    policy's widths, and `embodiment` (N,) naming each window's robot."""
    parts = []
    for name, dataset in datasets.items():
        w = dataset.all_windows(device=device)
        w["observation.state"] = nn.functional.pad(w["observation.state"], (0, policy.config.state_dim - dataset.state_dim))
        w["action"] = nn.functional.pad(w["action"], (0, policy.config.action_dim - dataset.action_dim))
        w["embodiment"] = torch.full((len(dataset),), policy.embodiments.get(name), dtype=torch.long, device=device)
        parts.append(w)
    if len(parts) == 1:
        return parts[0]
    common = set.intersection(*(set(p) for p in parts))
    return {k: sum((p[k] for p in parts), []) if isinstance(parts[0][k], list) else torch.cat([p[k] for p in parts])
            for k in common}


@torch.no_grad()
def cache_encoder_features(policy: FlowPolicy, windows: dict[str, Any], chunk: int = 256) -> dict[str, Any]:
    """Run the frozen encoder backbone once over every window and keep its outputs in place of the
    images: each training step then runs only the encoder's trainable head (the projections)."""
    encoder = policy.encoder
    cameras = list(encoder.config.cameras)
    n = len(windows["action"])
    parts = []
    for i in range(0, n, chunk):
        sub = {k: windows[k][i: i + chunk] for k in cameras if k in windows}
        if "task" in windows:
            sub["task"] = windows["task"][i: i + chunk]
        parts.append(encoder.backbone(sub))
    features = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    out = {k: v for k, v in windows.items() if k not in cameras}
    out[ENCODER_FEATURES] = features
    return out


def _slice_batch(batch: dict[str, Any], rows: torch.Tensor | None, device: torch.device) -> dict[str, Any]:
    """Rows `rows` of a batch-like dict (None: all of it, as a streamed batch comes), on `device`,
    images converted from uint8 to floats in [0, 1] (the same operations either way: a streamed
    batch equals the in-memory one bit for bit)."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = _slice_batch(v, rows, device)
        elif isinstance(v, list):
            out[k] = list(v) if rows is None else [v[i] for i in rows.tolist()]
        else:
            v = v if rows is None else v[rows.to(v.device)]
            if v.dtype == torch.uint8:  # images stay uint8 in memory; the policy sees floats in [0, 1]
                out[k] = v.to(device, non_blocking=True).float() / 255.0
            else:
                out[k] = v.to(device, non_blocking=True)
    return out


LOSS_PARTS = ("aux_loss", "mean_loss")  # a loss's info entries logged as their own columns

# settings a resumed run may change: none of them changes the result (everything else must match)
RESUMABLE_CHANGES = ("policy.device", "train.out_dir", "train.progress", "train.log_every", "train.save_every",
                     "train.keep_checkpoints", "train.logger", "data.num_workers")


def train_imitation(config: ImitationConfig, datasets, resume: bool = False, overwrite: bool = False,
                    allow_changes: Iterable[str] = ()) -> FlowPolicy:
    """Train `config.policy` on `datasets` as `config.train` says; returns the policy with its EMA
    weights (when enabled), also saved to `<out_dir>/policy`.

    `datasets` is a `ChunkDataset`, or {embodiment name: ChunkDataset} for a policy that serves
    several robots (their windows are mixed in every batch).

    The run folder `train.out_dir` is held by this process alone for the run's life (see
    `fmpolicy.run.folder`). A folder that already holds a run is refused unless `resume` (continue from
    its last checkpoint, bit for bit as if never interrupted; any change of a setting that would alter
    the result is refused, except the fields named in `allow_changes`) or `overwrite` (move the old run
    aside to `<out_dir>.old-<time>`).
    """
    if not isinstance(datasets, dict):
        datasets = {config.policy.embodiment_list()[0].name: datasets}
    info: DistInfo = init_distributed(config.policy.device)
    seed_everything(config.train.seed)
    policy = make_policy(config, datasets, info.device)  # a config that does not fit the data fails here, first
    if info.is_main:
        for note in floored_state_notes(policy):
            print(note)
    if not info.is_main:
        barrier(info)  # rank 0 opens (locks, checks, tidies) the folder first; the others only read it
    with open_run(config.train.out_dir, resume=resume, overwrite=overwrite, writer=info.is_main,
                  keep_checkpoints=config.train.keep_checkpoints) as run:
        if info.is_main:
            if run.last_checkpoint is not None:
                run.check_resume(config_to_dict(config), RESUMABLE_CHANGES, allow_changes,
                                 complete=lambda saved: config_to_dict(config_from_dict(ImitationConfig, saved_run_dict(saved))))
            barrier(info)
        policy = _train(config, datasets, policy, info, run)
    shutdown(info)
    return policy


def _train(config: ImitationConfig, datasets: dict[str, Any], policy: FlowPolicy, info: DistInfo,
           run: RunFolder) -> FlowPolicy:
    tc = config.train

    # ---- model, optimiser, schedule, EMA ----
    model: nn.Module = policy
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            policy, device_ids=[info.device.index] if info.device.type == "cuda" else None,
            find_unused_parameters=True)  # prefix layers sit idle when a batch has no prefix
    decay, no_decay = [], []
    for name, p in policy.named_parameters():
        (no_decay if p.ndim < 2 or name.endswith("position") else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=tc.betas)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, tc.steps, tc.warmup_steps, tc.min_lr_ratio))
    ema = EMA(policy, tc.ema_decay) if tc.ema_decay > 0 else None
    amp = tc.amp == "bf16" or (tc.amp == "auto" and info.device.type == "cuda")

    # ---- data: every window in memory, or streamed from disk; global batches sliced per process ----
    stream, why = should_stream(config.data, datasets)
    data_windows = {name: len(dataset) for name, dataset in datasets.items()}  # checked on resume
    windows: dict[str, Any] = {}
    if stream:
        if info.is_main:
            print(f"streaming batches with {config.data.num_workers} DataLoader workers ({why})"
                  + ("; the frozen encoder runs every step (data.cache_encoder applies to in-memory data)"
                     if policy.encoder is not None and policy.encoder.backbone_frozen and config.data.cache_encoder
                     else ""))
    else:
        windows = combine_windows(datasets, policy, info.device)
        cacheable = policy.encoder is not None and policy.encoder.backbone_frozen and config.data.cache_encoder
        if cacheable and tc.image_shift > 0:  # its input moves every step: nothing to cache per frame
            if info.is_main:
                print(f"train.image_shift = {tc.image_shift}: the frozen encoder runs every step on the shifted "
                      "images (its outputs are not cached)")
        elif cacheable:
            start_cache = time.perf_counter()
            windows = cache_encoder_features(policy, windows)
            if info.is_main:
                print(f"cached the frozen encoder's outputs for {len(windows['action'])} windows "
                      f"in {time.perf_counter() - start_cache:.1f} s")
    sampler = make_sampler(datasets, config.data.balance, tc.batch_size, tc.seed, config.data.task_weights)
    rows = local_rows(tc.batch_size, info)
    flow_gen = torch.Generator().manual_seed(tc.seed + 1)  # flow times and noise (CPU: same on every device)
    shift_gen = torch.Generator().manual_seed(tc.seed + 2)  # image shifts (train.image_shift)

    # ---- resume ----
    start = 0
    if run.last_checkpoint is not None:
        ckpt = run.last_checkpoint
        state = run.load_state()
        saved_windows = state.get("data_windows")
        if saved_windows is not None and saved_windows != data_windows:
            raise CheckpointError(f"{ckpt}: the datasets changed since the checkpoint (windows per robot: saved "
                                  f"{saved_windows}, now {data_windows}): the result would differ from an "
                                  "uninterrupted run; start a new run to train on the changed data")
        try:
            policy.load_state_dict(state["model"])
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt}: weights do not match the model: {e}") from e
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        sampler.load_state_dict(state["sampler"])
        flow_gen.set_state(state["flow_generator"])
        if "shift_generator" in state:  # checkpoints from before train.image_shift have none (and no shifts)
            shift_gen.set_state(state["shift_generator"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        start = state["step"]
        if info.is_main:
            print(f"resumed from {ckpt} at step {start}")
    run.write_config(config_to_dict(config))
    logger = run.logger(tc.logger)

    def checkpoint(step: int) -> None:
        state = {"step": step, "model": policy.state_dict(), "optimizer": optimizer.state_dict(),
                 "schedule": schedule.state_dict(), "sampler": sampler.state_dict(),
                 "flow_generator": flow_gen.get_state(), "shift_generator": shift_gen.get_state(),
                 "ema": ema.state_dict() if ema else None,
                 "rng": rng_state(), "data_windows": data_windows}
        if info.is_main:
            run.save_checkpoint(step, _eval_copy(policy, ema), state)

    # ---- the loop ----
    if stream:  # the loader reads ahead from a copy of the sampler, now at the (resumed) start
        source = WindowBatches(datasets, policy.config.state_dim, policy.config.action_dim,
                               {name: policy.embodiments.get(name) for name in datasets})
        batches = stream_batches(source, sampler, rows, tc.steps - start, config.data.num_workers,
                                 pin_memory=info.device.type == "cuda", seed=tc.seed)
    steps = progress(range(start, tc.steps), tc.progress and info.is_main, "train")
    policy.train()
    tick, loss_sum, loss_n = time.perf_counter(), 0.0, 0
    parts = dict.fromkeys(LOSS_PARTS, 0.0)  # the shares logged beside the total, when the policy has them
    for step in steps:
        idx = sampler.next()  # (B,) the same global batch on every process
        if stream:
            read, streamed = next(batches)
            if not torch.equal(read, idx[rows]):  # the loader's copy of the sampler drifted: a bug, not bad data
                raise RuntimeError(f"step {step}: the streamed batch holds other windows than the sampler drew")
            batch = _slice_batch(streamed, None, info.device)
        else:
            batch = _slice_batch(windows, idx[rows], info.device)
        b = len(idx)
        if tc.image_shift > 0:  # drawn for the global batch: one process and several shift alike
            batch = shift_batch(batch, draw_shifts(b, tc.image_shift, shift_gen)[rows])
        t = policy.sample_time(b, flow_gen)[rows]
        noise = sample_noise((b, config.policy.chunk_size, config.policy.expert.max_action_dim), generator=flow_gen)[rows]
        with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=amp):
            loss, loss_info = model(batch, None, t.to(info.device), noise.to(info.device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {step}: stopping before the weights are corrupted")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(policy.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        optimizer.step()
        schedule.step()
        if ema is not None:
            ema.update(policy)
        loss_sum, loss_n = loss_sum + all_reduce_mean(loss, info).item(), loss_n + 1
        for name in LOSS_PARTS:  # policy.aux, flow.mean_loss_weight: their shares, logged beside the total
            if name in loss_info:
                parts[name] += all_reduce_mean(loss_info[name], info).item()

        done = step + 1
        if done % tc.log_every == 0 or done == tc.steps:
            now = time.perf_counter()
            values = {"loss": loss_sum / loss_n, "lr": schedule.get_last_lr()[0], "grad_norm": float(grad_norm),
                      "steps_per_s": loss_n / (now - tick), "local_batch": len(t)}
            if config.policy.aux.key:
                values["aux_loss"] = parts["aux_loss"] / loss_n
            if config.policy.head == "flow" and config.policy.flow.mean_loss_weight > 0:
                values["mean_loss"] = parts["mean_loss"] / loss_n
            logger.log(done, values)
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(loss=f"{values['loss']:.4f}")
            tick, loss_sum, loss_n = now, 0.0, 0
            parts = dict.fromkeys(LOSS_PARTS, 0.0)
        if done % tc.save_every == 0 or done == tc.steps:
            checkpoint(done)

    if stream:
        next(batches, None)  # the loader is spent: this ends its workers now rather than at garbage collection
    logger.close()
    final = _eval_copy(policy, ema)
    if info.is_main:
        final.save_pretrained(run.path / "policy")
    return final.eval()


def _eval_copy(policy: FlowPolicy, ema: EMA | None) -> FlowPolicy:
    """The policy to evaluate and save: the EMA weights when enabled (a copy), else the policy itself."""
    if ema is None:
        return policy
    # deepcopy rather than a new FlowPolicy: building one would draw initial weights from the
    # global RNG and shift the dropout stream of the run that continues after a checkpoint
    averaged = copy.deepcopy(policy)
    ema.copy_to(averaged)
    return averaged
