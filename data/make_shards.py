"""Write WebDataset tar shards (train/val) and index.json for a dataset.

    python -m data.make_shards --dataset digits --out shards/digits

Samples are shuffled with --seed before sharding, so every shard is an iid sample of its split;
a shard that already exists with exactly the planned keys is kept (re-running resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from tqdm import tqdm

from risgd_common.atomic import write_text_atomic

from .errors import EXIT_OK, DataError, cli_error
from .index import INDEX_VERSION
from .sources import Source, open_source
from .tario import ShardRecord, scan_shard, write_shard

DEFAULT_SHARD_SIZE = {"digits": 250, "cifar10": 2500, "cifar100": 2500, "imagefolder": 1000, "imagenet": 5000}
SPLITS = ("train", "val")


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def _plan(source: Source, split: str, shard_size: int, seed: int) -> list[list[int]]:
    """Seeded shuffle of the split, cut into consecutive shards of `shard_size` samples."""
    n = len(source.splits[split])
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(n)
    return [order[i:i + shard_size].tolist() for i in range(0, n, shard_size)]


def _existing(path: str, keys: list[str], num_classes: int) -> ShardRecord | None:
    if not os.path.exists(path):
        return None
    try:
        rec = scan_shard(path, num_classes)
    except Exception:  # truncated or foreign file under our name: rewrite it
        return None
    return rec if rec.keys == keys else None


def make_shards(
    dataset: str, out: str, src: str | None = None, shard_size: int | None = None, seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write the shards and index.json under `out`; return the index dict."""
    if shard_size is not None and shard_size < 1:  # before reading the source; 0 is not "default"
        raise DataError(f"--shard-size {shard_size} is invalid: use a positive number of samples")
    source = open_source(dataset, src, seed)
    if shard_size is None:
        shard_size = DEFAULT_SHARD_SIZE[dataset]
    os.makedirs(out, exist_ok=True)
    index = {
        "version": INDEX_VERSION,
        "format": "webdataset",
        "dataset": dataset,
        "num_classes": source.num_classes,
        "image_shape": source.image_shape,
        "classes": source.classes,
        "seed": seed,
        "shard_size": shard_size,
        "split_rule": source.split_rule,
        "splits": {},
    }
    total = sum(len(v) for v in source.splits.values())
    with tqdm(total=total, desc=f"{dataset} shards", unit="img", disable=not progress) as bar:
        for split in SPLITS:
            samples = source.splits[split]
            shards, start = [], 0
            for i, members in enumerate(_plan(source, split, shard_size, seed)):
                name = shard_name(split, i)
                path = os.path.join(out, name)
                keys = [samples[m].key for m in members]
                rec = _existing(path, keys, source.num_classes)
                if rec is None:
                    rows = ((samples[m].key, *samples[m].load(), samples[m].label) for m in members)
                    rec = write_shard(path, rows, source.num_classes, on_sample=lambda: bar.update(1))
                else:
                    bar.update(len(members))
                shards.append({"start": start, **rec.to_json()})
                start += rec.samples
            index["splits"][split] = {"samples": start, "shards": shards}
    write_index(index, out)
    return index


def write_index(index: dict, out: str) -> None:
    """Write `out`/index.json atomically (risgd_common.atomic)."""
    write_text_atomic(os.path.join(out, "index.json"), json.dumps(index, separators=(",", ":")))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data.make_shards",
        description="Write WebDataset tar shards (KEY.png|jpg + KEY.cls) for the train and val splits, "
        "plus index.json (per shard: samples, bytes, sha256, label histogram, member offsets). "
        "Exit status: 0 done, 2 bad input (missing or malformed source, bad argument; one 'error:' "
        "line), 1 the work itself failed (e.g. an OS error while writing).",
    )
    ap.add_argument("--dataset", default="digits", choices=sorted(DEFAULT_SHARD_SIZE),
                    help="source kind (default: digits, embedded in scikit-learn, no download)")
    ap.add_argument("--src", default=None,
                    help="cifar10/100: the official *-python.tar.gz; imagenet: ILSVRC-2012 root with "
                    "train/ and val/ (val after valprep); "
                    "imagefolder: ROOT/[train|val]/CLASS/* or ROOT/CLASS/*")
    ap.add_argument("--out", required=True, help="output directory for the shards and index.json")
    ap.add_argument("--shard-size", type=int, default=None,
                    help=f"samples per shard (default per dataset: {DEFAULT_SHARD_SIZE})")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed for the sample shuffle and the digits val split")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    try:
        index = make_shards(args.dataset, args.out, args.src, args.shard_size, args.seed,
                            progress=not args.no_progress)
    except (DataError, OSError) as e:
        return cli_error(e)
    for split, info in index["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards")
    print(f"wrote {os.path.join(args.out, 'index.json')}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
