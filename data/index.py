"""Reading index.json: validation, per-split label / offset arrays, shard verification."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from risgd_common.install import command

from .errors import DataError, safe_name, verify_shard
from .stamps import Stamps

INDEX_VERSION = 1


def load_index(path: str) -> dict:
    """Load index.json (a path to the file or to the shard directory) and validate its shape."""
    if os.path.isdir(path):
        path = os.path.join(path, "index.json")
    try:
        with open(path) as f:
            index = json.load(f)
    except FileNotFoundError:
        raise DataError(f"index {path} missing: run {command('data.make_shards')} --out DIR first") from None
    except json.JSONDecodeError as e:
        raise DataError(f"index {path} is not valid JSON ({e}): re-run {command('data.make_shards')}") from None
    if not isinstance(index, dict) or index.get("version") != INDEX_VERSION:
        version = index.get("version") if isinstance(index, dict) else None
        raise DataError(f"index {path} has version {version!r}, expected {INDEX_VERSION}: "
                        f"re-run {command('data.make_shards')}")
    try:
        if "train" not in index["splits"]:
            raise KeyError("splits.train")
        for split in index["splits"].values():
            for shard in split["shards"]:
                safe_name(shard["name"])
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"index {path} is malformed ({type(e).__name__}: {e}): "
                        f"re-run {command('data.make_shards')}") from None
    return index


@dataclass
class SplitArrays:
    """Flat per-sample arrays of one split; global sample id = position in shard order."""

    names: list[str]
    starts: np.ndarray  # first global id of each shard, plus the total at the end
    labels: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    shard_of: np.ndarray

    @property
    def samples(self) -> int:
        return int(self.starts[-1])


def split_arrays(index: dict, split: str = "train") -> SplitArrays:
    if split not in index["splits"]:
        raise DataError(f"split {split!r} not in the index: re-run {command('data.make_shards')}")
    shards = index["splits"][split]["shards"]
    counts = [s["samples"] for s in shards]
    return SplitArrays(
        names=[s["name"] for s in shards],
        starts=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        labels=np.asarray([lab for s in shards for lab in s["labels"]], dtype=np.int64),
        offsets=np.asarray([o for s in shards for o in s["offsets"]], dtype=np.int64),
        sizes=np.asarray([o for s in shards for o in s["sizes"]], dtype=np.int64),
        shard_of=np.repeat(np.arange(len(shards)), counts).astype(np.int64),
    )


def shard_map(index: dict, split: str = "train") -> dict[str, dict]:
    return {s["name"]: s for s in index["splits"][split]["shards"]}


def verify_shards(index: dict, shard_dir: str, names: list[str], split: str = "train", fix: str = "",
                  full: bool = False, stamps: Stamps | None = None) -> dict:
    """Fail fast (DataError, one line) if any named shard is missing or has the wrong sha256.

    A shard whose verification stamp still matches the file (data/stamps.py) is not hashed; with
    `full=True` every shard is hashed. Shards that hash correctly refresh their stamps (in a directory
    that has a stamp file), also when a later one fails. Returns the counts: {"shards", "by_stamp",
    "by_cache", "hashed", "hashed_bytes"} (cumulative over a shared `stamps`).
    """
    by_name = shard_map(index, split)
    fix = fix or (f"copy it with {command('data.replicate')} --dest {shard_dir} ... "
                  f"or rebuild with {command('data.make_shards')} --out {shard_dir}")
    own = stamps is None
    if own:
        stamps = Stamps(shard_dir)
    try:
        for name in names:
            verify_shard(shard_dir, name, by_name[name]["sha256"], fix, full=full, stamps=stamps)
    finally:
        if own:
            stamps.save()
    return stamps.report()
