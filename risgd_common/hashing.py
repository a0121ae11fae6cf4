"""sha256 digests: of files (shards, checkpoints) and of tensors (a model's state)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

_BLOCK = 1 << 20


def sha256_file(path: str) -> str:
    """sha256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(named: Iterable[tuple[str, Any]]) -> str:
    """sha256 over (name, tensor) pairs, in order: equal digests mean bitwise-equal tensors."""
    import torch

    h = hashlib.sha256()
    for name, tensor in named:
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
