"""Write WebDataset tar shards (train/val) and index.json for a dataset.

    python -m data.make_shards --dataset digits --out shards/digits
    python -m data.make_shards --dataset imagenet --src /data/ILSVRC2012 --out shards/in1k --workers 8

Samples are shuffled with --seed before sharding, so every shard is an iid sample of its split;
a shard that already exists with exactly the planned keys is kept (re-running resumes).
With --workers N, N processes write shards concurrently. A shard's bytes depend only on its planned
members and index.json lists the shards in plan order, so the shards and index.json are
byte-identical whatever N. Every shard is written atomically (risgd_common.atomic), so an
interrupted run leaves complete shards only, and the re-run keeps them.
With --max-side N (data/presize.py), training images whose shorter side is above N are resized to N
on the shorter side and re-encoded at --quality; index.json records max_side and quality.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from tqdm import tqdm

from risgd_common.atomic import write_text_atomic
from risgd_common.cli import Parser
from risgd_common.install import MissingExtra, command

from .errors import EXIT_OK, DataError, cli_error
from .index import INDEX_VERSION
from .presize import check_args, presize, rule
from .sources import Sample, Source, open_source
from .stamps import Stamps
from .tario import ShardRecord, scan_shard, write_shard

DEFAULT_SHARD_SIZE = {"digits": 250, "cifar10": 2500, "cifar100": 2500, "imagefolder": 1000, "imagenet": 5000}
SPLITS = ("train", "val")
IMAGENET_IMAGES = 1_281_167 + 50_000  # ILSVRC-2012 train + val, for the time estimate


def shard_name(split: str, i: int) -> str:
    return f"{split}-{i:06d}.tar"


def _plan(source: Source, split: str, shard_size: int, seed: int) -> list[list[int]]:
    """Seeded shuffle of the split, cut into consecutive shards of `shard_size` samples."""
    n = len(source.splits[split])
    order = np.random.default_rng([seed, SPLITS.index(split)]).permutation(n)
    return [order[i:i + shard_size].tolist() for i in range(0, n, shard_size)]


CHECKED_MEMBERS = 8  # a shard is kept only if its first images are the bytes this run would write


def _existing(path: str, samples: list[Sample], num_classes: int, size: tuple[int, int] | None) -> ShardRecord | None:
    if not os.path.exists(path):
        return None
    try:
        rec = scan_shard(path, num_classes)
    except Exception:  # truncated or foreign file under our name: rewrite it
        return None
    if rec.keys != [sm.key for sm in samples]:
        return None
    # The same keys, but written from another source or with another --max-side/--quality? Its first
    # images must be the bytes this run writes for them (docs/data-imagenet.md#pre-sized-shards: what this
    # does not catch).
    with open(path, "rb") as f:
        for i, sm in enumerate(samples[:CHECKED_MEMBERS]):
            f.seek(rec.offsets[i])
            if f.read(rec.sizes[i]) != _load(sm, size)[0]:
                return None
    return rec


def _load(sm: Sample, size: tuple[int, int] | None) -> tuple[bytes, str, bool]:
    """(bytes, extension, re-encoded) of one sample as this run writes it; size = (max_side, quality)."""
    data, ext = sm.load()
    return (data, ext, False) if size is None else presize(data, ext, *size)


def _shard_job(path: str, samples: list[Sample], num_classes: int, on_sample=None,
               size: tuple[int, int] | None = None) -> tuple[dict, int, float, float, int]:
    """Keep the shard at `path` if it holds exactly these samples, else write it (atomically);
    `size` = (max_side, quality) pre-sizes its images (data/presize.py).
    Returns (the shard's index record, images written, start and end time, images re-encoded); runs
    in a worker process. Times are time.perf_counter(), CLOCK_MONOTONIC on Linux: comparable across
    processes."""
    t0 = time.perf_counter()
    rec = _existing(path, samples, num_classes, size)
    written = resized = 0
    if rec is None:
        def members():
            nonlocal resized
            for sm in samples:
                data, ext, re_encoded = _load(sm, size)
                resized += re_encoded
                yield sm.key, data, ext, sm.label

        rec = write_shard(path, members(), num_classes, on_sample=on_sample)
        written = len(samples)
    return rec.to_json(), written, t0, time.perf_counter(), resized


def make_shards(
    dataset: str, out: str, src: str | None = None, shard_size: int | None = None, seed: int = 0,
    progress: bool = True, workers: int = 1, report: dict | None = None, max_side: int | None = None,
    quality: int | None = None,
) -> dict:
    """Write the shards and index.json under `out`; return the index dict.

    `max_side` (imagenet/imagefolder): training images whose shorter side is above it are resized to
    it and re-encoded at JPEG `quality` (default 90), the rest kept byte-for-byte; val is never
    resized (data/presize.py). index.json records "max_side" and "quality" (null: full size).

    `workers` processes write shards concurrently (same bytes as 1). `report`, if given, is filled
    with {"images", "written", "kept", "bytes_written", "workers", "seconds" (end to end),
    "convert_seconds" (first shard started to last shard done: without process start-up and the
    source listing), "busy_seconds" (summed over the shards written), "resized" (train images re-encoded),
    "max_side", "quality"}.
    """
    if shard_size is not None and shard_size < 1:  # before reading the source; 0 is not "default"
        raise DataError(f"--shard-size {shard_size} is invalid: use a positive number of samples")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise DataError(f"--workers {workers} is invalid: use a positive number of processes")
    quality = check_args(max_side, quality, dataset)
    size = None if max_side is None else (max_side, quality)
    t_start = time.perf_counter()
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
        "max_side": max_side,  # null: full-size images (the recipe key data.max_side must match)
        "quality": quality,
        **({"max_side_rule": rule(max_side, quality)} if max_side is not None else {}),
        "splits": {},
    }
    jobs = []  # (split, path, samples) in plan order: the index lists shards in this order
    for split in SPLITS:
        samples = source.splits[split]
        for i, members in enumerate(_plan(source, split, shard_size, seed)):
            jobs.append((split, os.path.join(out, shard_name(split, i)), [samples[m] for m in members]))
    total = sum(len(v) for v in source.splits.values())
    results: list[tuple[dict, int, float, float, int]] = []
    sizes = {split: size if split == "train" else None for split in SPLITS}  # val: never resized
    with tqdm(total=total, desc=f"{dataset} shards", unit="img", disable=not progress) as bar:
        if workers == 1:
            for split, path, samples in jobs:
                done = bar.n
                results.append(_shard_job(path, samples, source.num_classes, on_sample=lambda: bar.update(1),
                                          size=sizes[split]))
                bar.update(len(samples) - (bar.n - done))  # a kept shard: all at once
        else:
            import multiprocessing as mp

            # spawn: a fresh interpreter per worker (no fork of this process's threads and locks).
            with ProcessPoolExecutor(max_workers=min(workers, max(1, len(jobs))),
                                     mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_shard_job, path, samples, source.num_classes, size=sizes[split])
                           for split, path, samples in jobs]
                try:
                    for fut, (_, _, samples) in zip(futures, jobs):
                        results.append(fut.result())
                        bar.update(len(samples))
                except BaseException:
                    for fut in futures:
                        fut.cancel()
                    raise
    for split in SPLITS:
        shards, start = [], 0
        for (job_split, _, _), (rec, *_) in zip(jobs, results):
            if job_split == split:
                shards.append({"start": start, **rec})
                start += rec["samples"]
        index["splits"][split] = {"samples": start, "shards": shards}
    write_index(index, out)
    # make_shards has just hashed every shard it wrote: stamp them (data/stamps.py), so that a
    # start on this directory does not hash them again
    stamps = Stamps(out, create=True)
    for (_, path, _), (rec, written, *_) in zip(jobs, results):
        if written:
            stamps.add_written(os.path.basename(path), rec["sha256"])
    stamps.save()
    if report is not None:
        done = [r for r in results if r[1]]
        report.update({
            "images": total, "written": sum(r[1] for r in done), "kept": total - sum(r[1] for r in done),
            "workers": workers, "bytes_written": sum(r[0]["bytes"] for r in done),
            "seconds": time.perf_counter() - t_start,
            "convert_seconds": max(r[3] for r in done) - min(r[2] for r in done) if done else 0.0,
            "busy_seconds": sum(r[3] - r[2] for r in done),
            "resized": sum(r[4] for r in done), "max_side": max_side, "quality": quality,
        })
    return index


def rate_lines(report: dict, dataset: str) -> list[str]:
    """Throughput lines for the CLI: img/s in total and per process, and for ImageNet the time the
    full 1.33M-image conversion takes at this rate."""
    if not report["written"]:
        return [f"nothing to convert: all {report['kept']} images are in complete shards kept from an earlier run"]
    n, k = report["written"], report["workers"]
    total = n / max(report["convert_seconds"], 1e-9)
    per = n / max(report["busy_seconds"], 1e-9)
    overhead = max(0.0, report["seconds"] - report["convert_seconds"])
    lines = [f"converted {n} images ({report['bytes_written'] / 1e6:.1f} MB of shards) with {k} worker "
             f"process(es): {total:,.0f} img/s total, {per:,.0f} img/s per process "
             f"({report['seconds']:.2f} s end to end, of which {overhead:.2f} s listing the source, starting "
             f"processes and writing index.json; {report['kept']} images in shards kept from an earlier run)"]
    if report.get("max_side") is not None:
        lines.append(f"pre-sized: {report['resized']} of the images written re-encoded to {report['max_side']} px on "
                     f"the shorter side at JPEG quality {report['quality']}; the others (already small enough, "
                     "undecodable, or val) kept byte-for-byte")
    if dataset == "imagenet":
        minutes = (overhead + IMAGENET_IMAGES / total) / 60
        lines.append(f"estimate for full ImageNet-1k ({IMAGENET_IMAGES:,} images, train + val) at {total:,.0f} "
                     f"img/s with {k} process(es): {minutes:.1f} min (the rate depends on the source disk; "
                     "images read from the page cache convert faster than from a cold disk)")
    return lines


def write_index(index: dict, out: str) -> None:
    """Write `out`/index.json atomically (risgd_common.atomic)."""
    write_text_atomic(os.path.join(out, "index.json"), json.dumps(index, separators=(",", ":")))


def main(argv: list[str] | None = None) -> int:
    ap = Parser(
        prog=command("data.make_shards"),
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
    ap.add_argument("--workers", type=int, default=1,
                    help="processes writing shards concurrently (default 1); the shards and index.json are "
                    "byte-identical whatever the number")
    ap.add_argument("--max-side", type=int, default=None, metavar="N",
                    help="imagenet/imagefolder: resize training images whose shorter side is above N px to N on "
                    "the shorter side and re-encode them (smaller ones kept byte-for-byte; val untouched); "
                    "index.json records it, and the recipe key data.max_side must match (default: full size)")
    ap.add_argument("--quality", type=int, default=None,
                    help="JPEG quality of the re-encoded images with --max-side (1..95, default 90)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = ap.parse_args(argv)
    report: dict = {}
    try:
        index = make_shards(args.dataset, args.out, args.src, args.shard_size, args.seed,
                            progress=not args.no_progress, workers=args.workers, report=report,
                            max_side=args.max_side, quality=args.quality)
    except (DataError, MissingExtra, OSError, BrokenProcessPool) as e:  # a worker killed: exit 1, one line
        return cli_error(e)
    for split, info in index["splits"].items():
        print(f"{split}: {info['samples']} samples in {len(info['shards'])} shards")
    print(f"wrote {os.path.join(args.out, 'index.json')}")
    for line in rate_lines(report, args.dataset):
        print(line)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
