"""Atomic file writes: a temporary name in the same directory, then ``os.replace``, so a crash
leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import os
from typing import Any

import torch


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def torch_save_atomic(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
