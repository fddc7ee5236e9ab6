#!/usr/bin/env python
"""RL fine-tuning: FPO on a flow policy, or Gaussian PPO (the baseline), in one loop.

    python scripts/train_fpo.py --config configs/fpo_bandit.yaml [key.sub=value ...] [--resume]

The YAML maps onto `fmpolicy.rl.config.RLRunConfig` (policy, rl, env, init_from); dotted overrides
change single fields, e.g. `rl.policy_type=gaussian rl.total_env_steps=20000 rl.out_dir=runs/ppo`.
An unknown key is an error. `init_from=<dir>` fine-tunes a policy saved by scripts/train.py
(`<out_dir>/policy`). `--resume` continues from the last checkpoint in rl.out_dir (see
fmpolicy/rl/trainer.py for the exact guarantee). The folder belongs to one process at a time; one that
already holds a run is refused unless --resume continues it or --overwrite moves it aside.
"""

from __future__ import annotations

import argparse
import sys

from fmpolicy.errors import FmPolicyError
from fmpolicy.rl.config import load_rl_config
from fmpolicy.rl.trainer import train_rl


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file mapping onto RLRunConfig")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in rl.out_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="rl.out_dir holds a run: move it aside to <out_dir>.old-<time> and start again")
    p.add_argument("--allow-change", default="", metavar="FIELDS",
                   help="with --resume: comma-separated config fields whose change you accept although the "
                        "result will differ from an uninterrupted run")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. rl.total_env_steps=10000")
    args = p.parse_intermixed_args(argv)  # options may come between the overrides
    try:
        config = load_rl_config(args.config, args.overrides)
        if config.env.id.startswith("fmpolicy/"):
            import fmpolicy_envs  # noqa: F401  (registers the fmpolicy/ envs)
        return train_rl(config, resume=args.resume, overwrite=args.overwrite,
                        allow_changes=[f for f in args.allow_change.split(",") if f])
    except FmPolicyError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
