"""Training-step time with the frozen backbone re-run every step vs read from `EncoderOutputCache`.

    python -m fmpolicy.encoders.bench --batch 8 --image-size 224 --cameras 2 --expert cpu

A step = encoder (or cache + head) -> the expert's CFM loss (`--expert` preset, or "none": a masked
mean square stands in) -> backward -> SGD step. Prints one JSON line (for scripts/bench.py).
"""

from __future__ import annotations

import argparse
import json

import torch

from fmpolicy.encoders import make_encoder
from fmpolicy.encoders.cache import benchmark_cache
from fmpolicy.encoders.config import EncoderConfig


def make_step_fn(expert: str, out_dim: int, batch_size: int):
    """A loss of (prefix, mask) through a FlowPolicy with the given expert preset; None for "none"."""
    if expert == "none":
        return None
    from fmpolicy import FlowPolicy, PolicyConfig, make_expert_config

    policy = FlowPolicy(PolicyConfig(state_dim=8, action_dim=7, chunk_size=50, n_action_steps=50, device="cpu",
                                     expert=make_expert_config(expert, prefix_dim=out_dim)))
    policy.fit_normalization(torch.randn(100, 8), torch.randn(100, 50, 7))
    g = torch.Generator().manual_seed(0)
    data = {"observation.state": torch.randn(batch_size, 8, generator=g),
            "action": torch.randn(batch_size, 50, 7, generator=g)}
    return lambda prefix, mask: policy.compute_loss(
        {**data, "observation.prefix": prefix, "observation.prefix_mask": mask}, generator=g)[0]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", default="vision_text", choices=["vision_text", "vlm"])
    ap.add_argument("--text-model", default="tiny", help="tiny, minilm or a local folder (vision_text)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--cameras", type=int, default=2)
    ap.add_argument("--width", type=int, default=384, help="hidden size of the vision tower and tiny text / LM (heads = width / 64)")
    ap.add_argument("--layers", type=int, default=6, help="layers of the vision tower and tiny text / LM")
    ap.add_argument("--out-dim", type=int, default=128, help="prefix width = the expert's width")
    ap.add_argument("--expert", default="cpu", help="expert preset for the loss (tiny, cpu, base, ...) or none")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cams = tuple(f"observation.images.cam{i}" for i in range(args.cameras))
    w, heads = args.width, max(1, args.width // 64)
    config = EncoderConfig(kind=args.kind, cameras=cams, image_size=args.image_size, text_model=args.text_model,
                           vision_hidden_size=w, vision_num_attention_heads=heads, vision_intermediate_size=4 * w,
                           vision_num_hidden_layers=args.layers, text_hidden_size=w, text_num_attention_heads=heads,
                           text_intermediate_size=4 * w, text_num_hidden_layers=args.layers, out_dim=args.out_dim)
    torch.manual_seed(0)
    encoder = make_encoder(config)
    batch = {c: torch.rand(args.batch, 3, args.image_size, args.image_size) for c in cams}
    batch["task"] = ["pick up the red block and put it in the bin"] * args.batch
    step_fn = make_step_fn(args.expert, args.out_dim, args.batch)
    result = benchmark_cache(encoder, batch, steps=args.steps, step_fn=step_fn)
    backbone = sum(p.numel() for p in encoder.parameters()) - sum(p.numel() for p in encoder.head_parameters())
    out = {"kind": args.kind, "text_model": args.text_model, "batch": args.batch, "image_size": args.image_size,
           "cameras": args.cameras, "width": w, "layers": args.layers, "expert": args.expert,
           "backbone_params": backbone, "prefix_tokens": encoder.num_tokens, "threads": torch.get_num_threads(),
           **{k: round(v, 5) for k, v in result.items()}}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
