"""What the namespace-host sweeps (bench_bandwidth.py, bench_nodes.py) share: the embedded digits
shards, label-sorted redundancy manifests, and link units."""

from __future__ import annotations

import os

from risgd_data.index import load_index
from risgd_data.make_shards import make_shards
from risgd_data.manifest import build_manifest, write_manifest


def mbytes_s(mbit: float) -> float:
    """A link's Mbit/s in bytes/s."""
    return mbit * 1e6 / 8


def digits_shards(out: str) -> tuple[str, dict]:
    """OUT/shards (made once) and its index."""
    shards = os.path.join(out, "shards")
    if not os.path.exists(os.path.join(shards, "index.json")):
        make_shards("digits", shards, seed=0, progress=False)
    return shards, load_index(shards)


def label_sorted_manifest(index: dict, path: str, workers: int, mu: float) -> str:
    """A label-sorted manifest for ``workers`` at redundancy ``mu`` (seed 0), written once to ``path``."""
    if not os.path.exists(path):
        write_manifest(build_manifest(index, workers, mu, partition="label_sorted", seed=0), path)
    return path
