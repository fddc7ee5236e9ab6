#!/usr/bin/env python
"""Train a flow policy (or the MSE baseline) on demonstrations.

    python scripts/train.py --config configs/point_obstacle.yaml [key.sub=value ...] [--resume | --overwrite]

The run folder (train.out_dir) belongs to one process at a time; a folder that already holds a run is
refused unless --resume continues it (any setting that would change the result must stay the same;
--allow-change names the ones you change knowingly) or --overwrite moves it aside (never deleted).

Datasets are LeRobot v3.0 directories (written by scripts/collect_demos.py, or LeRobot's own). Several
robots in one policy: list them under policy.embodiments and their datasets under data.roots
({embodiment name: directory}); every batch mixes their windows. data.episodes (or data.num_episodes)
selects episodes, data.rename_map renames a dataset's features to ours (LeRobot's `rename_map`).
Video and large datasets are streamed from disk by data.num_workers DataLoader workers (data.stream:
auto, true or false; docs/datasets.md, "Large datasets"), with the same batches as in memory.

Dotted overrides map onto the config dataclasses (`fmpolicy.config.ImitationConfig`), e.g.
`train.steps=500 policy.head=regression train.out_dir=runs/mse`. An unknown key is an error.
Under `torchrun --nproc_per_node=N scripts/train.py ...` it trains with DistributedDataParallel
(NCCL on GPUs, gloo on CPU); train.batch_size is the global batch. Only rank 0 writes.
"""

from __future__ import annotations

import argparse
import sys

from fmpolicy.config import DataConfig, ImitationConfig, load_config
from fmpolicy.data import ChunkDataset
from fmpolicy.errors import FmPolicyError
from fmpolicy.training.imitation import train_imitation


def open_dataset(data: DataConfig, root: str, chunk_size: int) -> ChunkDataset:
    """One robot's LeRobot v3.0 dataset as the data config selects it (episodes, renaming, cameras)."""
    episodes = list(data.episodes) or (list(range(data.num_episodes)) if data.num_episodes else None)
    return ChunkDataset(root, chunk_size, episodes=episodes, rename_map=dict(data.rename_map),
                        image_keys=list(data.image_keys))


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file mapping onto ImitationConfig")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.out_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="train.out_dir holds a run: move it aside to <out_dir>.old-<time> and start again")
    p.add_argument("--allow-change", default="", metavar="FIELDS",
                   help="with --resume: comma-separated config fields whose change you accept although the "
                        "result will differ from an uninterrupted run, e.g. train.steps")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    args = p.parse_args(argv)
    try:
        config = load_config(ImitationConfig, args.config, args.overrides)
        roots = dict(config.data.roots) or ({config.policy.embodiment_list()[0].name: config.data.root}
                                             if config.data.root else {})
        if not roots:
            raise FmPolicyError("data.root is empty: expected the dataset directory (scripts/collect_demos.py --out)")
        datasets = {name: open_dataset(config.data, root, config.policy.chunk_size) for name, root in roots.items()}
        return train_imitation(config, datasets, resume=args.resume, overwrite=args.overwrite,
                               allow_changes=[f for f in args.allow_change.split(",") if f])
    except FmPolicyError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
