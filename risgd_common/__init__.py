"""Helpers every part of risgd shares, one of each: atomic file writes and sha256 digests.

A leaf package: it imports nothing of the engine, the data tools or the trainer, so each of them
(and a node that runs only the data tools) can use it.
"""

from .atomic import atomic_write, write_bytes_atomic, write_text_atomic
from .hashing import sha256_file, sha256_tensors

__all__ = ["atomic_write", "sha256_file", "sha256_tensors", "write_bytes_atomic", "write_text_atomic"]
