"""Tokenizers with one small interface: `tokenize(texts, max_length) -> (input_ids, attention_mask)`.

`ByteTokenizer` needs no files (UTF-8 bytes are the vocabulary), so tiny models can be built and
tested offline; `HFTokenizer` wraps any `transformers` tokenizer loaded from a local folder.
Both pad (on the right) and truncate to exactly `max_length` tokens, so that the prefix length is
fixed: static shapes for the expert and for the output cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


class ByteTokenizer:
    """[BOS] + UTF-8 bytes of the text + [EOS], padded with [PAD]. Ids: PAD 0, BOS 1, EOS 2, byte v -> 3 + v."""

    pad_id, bos_id, eos_id, offset = 0, 1, 2, 3
    vocab_size = 3 + 256

    def tokenize(self, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        """-> input_ids (b, n) long, attention_mask (b, n) bool, n = max_length."""
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        for i, text in enumerate(texts):
            row = [self.bos_id, *(self.offset + v for v in text.encode("utf-8")), self.eos_id][:max_length]
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids, ids != self.pad_id

    def identity(self) -> dict[str, Any]:
        return {"kind": "bytes", "vocab_size": self.vocab_size, "pad_id": self.pad_id, "bos_id": self.bos_id,
                "eos_id": self.eos_id, "padding": "right", "truncation": True}


class HFTokenizer:
    """A `transformers` tokenizer read from a local folder (offline)."""

    def __init__(self, folder: str | Path, suffix: str = ""):
        from transformers import AutoTokenizer

        self.folder = str(folder)
        self.suffix = suffix  # appended to every text (PaliGemma prompts end in "\n")
        self.tok = AutoTokenizer.from_pretrained(self.folder)
        self.vocab_size = len(self.tok)

    def tokenize(self, texts: list[str], max_length: int) -> tuple[Tensor, Tensor]:
        """-> input_ids (b, n) long, attention_mask (b, n) bool, n = max_length."""
        out = self.tok([t + self.suffix for t in texts], padding="max_length", truncation=True,
                       max_length=max_length, return_tensors="pt")
        return out["input_ids"].long(), out["attention_mask"].bool()

    def identity(self) -> dict[str, Any]:
        files = sorted(p for p in Path(self.folder).glob("*") if p.name.startswith(("tokenizer", "vocab", "special")))
        digest = hashlib.sha256()
        for p in files:
            digest.update(p.name.encode())
            digest.update(p.read_bytes())
        return {"kind": "hf", "folder": self.folder, "class": type(self.tok).__name__, "vocab_size": self.vocab_size,
                "padding": "right", "truncation": True, "suffix": self.suffix, "files_sha256": digest.hexdigest()}
