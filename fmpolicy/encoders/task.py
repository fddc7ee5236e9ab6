"""kind="task": a learned embedding of the instruction as one prefix token, for multi-task policies
without images or a text model (Meta-World's MT10 from the state, say).

The instruction (`task`, one string per sample, as datasets and environments give it) must be one of
`EncoderConfig.tasks`; its index picks a row of an embedding table (`out_dim` wide, the expert's
prefix width), trained with the policy. Unlike one-hot ids appended to the state by hand, the task
list is saved with the policy, an unknown instruction is an error that names the known ones, and
nothing about the state's normalization or width changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fmpolicy.encoders.base import PrefixEncoder
from fmpolicy.encoders.config import EncoderConfig
from fmpolicy.encoders.inputs import TASK, batch_size_of, read_tasks
from fmpolicy.errors import InputError

TASK_INDEX = "task_index"  # the backbone's output: each sample's row of the table


class TaskEncoder(PrefixEncoder):
    """`task` (b strings, each one of `config.tasks`) -> prefix (b, 1, out_dim), mask (b, 1)."""

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.index = {task: i for i, task in enumerate(config.tasks)}
        self.embedding = nn.Embedding(len(config.tasks), config.out_dim)
        nn.init.normal_(self.embedding.weight, std=1.0)  # unit-scale tokens, as normalized features are

    def backbone(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The table rows of the batch's instructions (nothing to learn here: the "backbone" is a lookup)."""
        if TASK not in batch:
            raise InputError(f"the batch is missing the key {TASK!r}: this policy's encoder (kind='task') is told its "
                             f"task by name, one of {list(self.index)} per sample")
        tasks = read_tasks(batch, batch_size_of(batch, ()), require_task=True)
        unknown = sorted({t for t in tasks if t not in self.index})
        if unknown:
            raise InputError(f"'task' holds {unknown}, which this policy was not trained on: expected one of "
                             f"{list(self.index)} (EncoderConfig.tasks)")
        return {TASK_INDEX: torch.tensor([self.index[t] for t in tasks], dtype=torch.long, device=self.device)}

    def head(self, features: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        index = features[TASK_INDEX].to(self.device)
        prefix = self.embedding(index)[:, None, :]
        return prefix, torch.ones(prefix.shape[:2], dtype=torch.bool, device=prefix.device)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.embedding.parameters())

    def preprocessing_config(self) -> dict[str, Any]:
        return {"kind": "task", "tasks": list(self.config.tasks), "prefix_tokens": 1, "out_dim": self.config.out_dim}

    @property
    def num_tokens(self) -> int:
        return 1
