"""Deterministic WebDataset tar shards with per-member byte offsets, and random-access reads.

Shards are plain POSIX tars (readable by `tar` and `webdataset.WebDataset`): for each sample
`KEY.EXT` (the encoded image) followed by `KEY.cls` (decimal label). Header fields are fixed
(mtime, owner, mode) so that the same samples always give the same bytes and the same sha256.
The byte offset of every image member is recorded at write time so the loader can read any
sample with one pread instead of streaming the tar.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from risgd_common.atomic import atomic_write
from risgd_common.hashing import sha256_file

from .errors import DataError

BLOCK = tarfile.BLOCKSIZE
_MTIME = 946684800  # 2000-01-01: fixed so shard bytes depend only on their content


@dataclass
class ShardRecord:
    """What index.json stores about one shard."""

    name: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    label_hist: list[int] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)  # byte offset of each image member's data
    sizes: list[int] = field(default_factory=list)  # byte size of each image member

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "label_hist": self.label_hist,
            "first_key": self.keys[0] if self.keys else None,
            "last_key": self.keys[-1] if self.keys else None,
            "labels": self.labels,
            "offsets": self.offsets,
            "sizes": self.sizes,
        }


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = _MTIME
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def write_shard(
    path: str, samples: Iterable[tuple[str, bytes, str, int]], num_classes: int, on_sample=None
) -> ShardRecord:
    """Write (key, image_bytes, ext, label) samples to `path` atomically; return the shard record.

    The tar goes through risgd_common.atomic.atomic_write (hidden temporary name in the same
    directory, synced to disk, renamed), so an interrupted run never leaves a truncated shard
    under the real name. Member offsets are recorded while writing.
    """
    name = os.path.basename(path)
    rec = ShardRecord(name=name, label_hist=[0] * num_classes)

    def writer(raw: BinaryIO) -> None:
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, data, ext, label in samples:
                if "." in key or "/" in key:
                    raise DataError(f"sample key {key!r} must not contain '.' or '/'")
                tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
                # tar.offset now points past the padded data of the member just written.
                rec.offsets.append(tar.offset - _padded(len(data)))
                rec.sizes.append(len(data))
                cls = str(int(label)).encode()
                tar.addfile(_tarinfo(f"{key}.cls", len(cls)), io.BytesIO(cls))
                rec.keys.append(key)
                rec.labels.append(int(label))
                rec.label_hist[int(label)] += 1
                if on_sample is not None:
                    on_sample()

    atomic_write(path, writer)
    return _finish(rec, path)


def scan_shard(path: str, num_classes: int) -> ShardRecord:
    """Rebuild the record of an existing shard from its tar headers (used to skip finished shards)."""
    rec = ShardRecord(name=os.path.basename(path), label_hist=[0] * num_classes)
    pending: dict[str, tuple[int, int]] = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext == "cls":
                label = int(tar.extractfile(member).read().decode())
                offset, size = pending.pop(key)
                rec.keys.append(key)
                rec.labels.append(label)
                rec.offsets.append(offset)
                rec.sizes.append(size)
                rec.label_hist[label] += 1
            else:
                pending[key] = (member.offset_data, member.size)
    return _finish(rec, path)


def _finish(rec: ShardRecord, path: str) -> ShardRecord:
    rec.sha256 = sha256_file(path)
    rec.bytes = os.path.getsize(path)
    rec.samples = len(rec.keys)
    return rec


class ShardFiles:
    """Random access to image members by (shard path, offset, size), one fd per shard per process.

    File descriptors are opened lazily and re-opened after a fork (DataLoader workers), because a
    descriptor shared across processes would share its file position; pread avoids that anyway,
    but lazily opening keeps the parent from holding thousands of fds it never reads.
    """

    def __init__(self, paths: list[str]):
        self.paths = paths
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def read(self, shard: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return os.pread(fd, size, offset)

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict:
        return {"paths": self.paths}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["paths"])
