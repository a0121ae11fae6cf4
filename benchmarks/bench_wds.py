"""webdataset's own parts against the repo's: the shard writer and the indexed reader.

    .venv/bin/python benchmarks/bench_wds.py                 # ~1-2 minutes on 2 cores
    .venv/bin/python benchmarks/bench_wds.py --images 1200 --repeats 7

Writes --images synthetic ImageNet-like JPEGs (seeded, no download) in the ILSVRC-2012 layout,
converts them with make_shards (--shard-size samples per shard) and builds a 2-worker manifest, then

1. writer: the same samples (key, JPEG bytes, ext, label) written by tario.write_shard (what
   make_shards uses) and by webdataset.TarWriter with make_shards' header fields (mtime fixed,
   uid/gid 0, empty uname/gname, mode 0644, USTAR), both through the same atomic write (temporary
   name, fsync, rename) and sha256: whether TarWriter's bytes are make_shards' bytes, whether two
   TarWriter runs are identical, and MB/s of each (median of --repeats);
2. reader, side by side in rounds (order alternated; median and min..max over --repeats rounds):
   random access by index within rank 0's chunk (a seeded permutation of its global ids, as the
   loader draws them), samples/s of reading the image bytes and the label, by
   * own: index.json's offsets, one pread per sample (tario.ShardFiles, what the loader does),
   * wids: wids.ShardListDataset over the same shards (local files, raw bytes, LRU of every shard),
   and the same with the fast-path decode (FastTrainTransform.decode_bytes, the same seeds and so
   the same crops for both readers) after the read: img/s;
3. resume: the time from nothing to the first batch (--batch samples, read only) at a given
   position of the chunk's sequence: own = load index.json + the chunk's ids + the permutation of
   that pass + the reads; wids = ShardListDataset + the reads (each shard it touches is opened,
   mmapped and its tar headers scanned on first use). And wids' sampler: ChunkedSampler has no
   start position, so a resume at position n iterates n indices (measured at --resume-at).

Prints figures only; nothing is asserted (a mismatch of the bytes the two readers return exits 1).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _med(xs: list[float]) -> str:
    return f"{statistics.median(xs):10.0f}  ({min(xs):.0f}..{max(xs):.0f})"


def _load_wids():
    try:
        import wids
    except ImportError:
        sys.exit("bench_wds: the 'wids' package (webdataset's indexed reader, separate since webdataset 1.0) is not "
                 "installed: .venv/bin/pip install wids")
    return wids


def bench_writer(samples: list[tuple[str, bytes, str, int]], work: str, repeats: int, num_classes: int) -> dict:
    import webdataset

    from risgd_common.atomic import atomic_write
    from risgd_common.hashing import sha256_file
    from risgd_data.tario import _MTIME, write_shard

    def own(path):
        write_shard(path, samples, num_classes)

    def wds(path):  # through the same atomic write (temporary, fsync, rename) and sha256 as write_shard
        def writer(raw):
            with webdataset.TarWriter(raw, user="", group="", mode=0o644, mtime=_MTIME, encoder=False) as tw:
                for key, data, ext, label in samples:
                    tw.write({"__key__": key, ext: data, "cls": str(int(label)).encode()})
        atomic_write(path, writer)
        sha256_file(path)

    out, mb = {}, sum(len(s[1]) for s in samples) / 1e6
    for name, fn in (("own", own), ("wds", wds)):
        times, digests = [], []
        for r in range(repeats):
            path = os.path.join(work, f"w_{name}_{r}.tar")
            t0 = time.perf_counter()
            fn(path)
            times.append(time.perf_counter() - t0)
            with open(path, "rb") as f:
                digests.append(hashlib.sha256(f.read()).hexdigest())
            os.remove(path)
        out[name] = {"mb_s": [mb / t for t in times], "digests": digests}
    import tarfile

    path = os.path.join(work, "w_order.tar")
    wds(path)
    with tarfile.open(path) as t:
        out["wds_order"] = [m.name for m in t.getmembers()[:2]]
    os.remove(path)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=800, help="synthetic ImageNet-like training JPEGs (default 800)")
    ap.add_argument("--shard-size", type=int, default=40, help="samples per shard (default 40)")
    ap.add_argument("--accesses", type=int, default=2000, help="random reads per timed block (default 2000)")
    ap.add_argument("--decoded", type=int, default=200, help="random reads + decodes per timed block (default 200)")
    ap.add_argument("--writer-samples", type=int, default=400, help="samples of the writer's shard (default 400)")
    ap.add_argument("--batch", type=int, default=64, help="samples of the first batch after a resume (default 64)")
    ap.add_argument("--resume-at", type=int, default=1_000_000,
                    help="position for wids' sampler skip (default 1e6: ~ one epoch of a 4-way ImageNet chunk)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--work", default=None, help="directory for the data (default: a temporary one)")
    args = ap.parse_args(argv)
    wids = _load_wids()

    import numpy as np
    import torch

    from risgd_data.index import load_index, split_arrays
    from risgd_data.make_shards import make_shards
    from risgd_data.manifest import build_manifest, rank_chunk_ids
    from risgd_data.synthetic import write_imagenet_tree
    from risgd_data.tario import ShardFiles
    from risgd_data.transforms import train_transform

    torch.set_num_threads(1)
    work = args.work or tempfile.mkdtemp(prefix="bench_wds_")
    src, shards = os.path.join(work, "src"), os.path.join(work, "shards")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(shards, "index.json")):
        write_imagenet_tree(src, args.images, 8, classes=10, seed=0, workers=os.cpu_count() or 1)
        make_shards("imagenet", shards, src=src, shard_size=args.shard_size, progress=False)
    index = load_index(shards)
    a = split_arrays(index, "train")
    paths = [os.path.join(shards, n) for n in a.names]
    manifest = build_manifest(index, 2, 0.0)
    chunk = np.asarray(rank_chunk_ids(manifest, index, 0)[0])
    print(f"bench_wds: {len(a.labels)} train images in {len(paths)} shards ({work}, made in "
          f"{time.perf_counter() - t0:.0f} s); rank 0's chunk: {len(chunk)} samples; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs", flush=True)

    # -- 1. writer
    own_files = ShardFiles(paths)
    n0 = min(args.writer_samples, len(a.labels))
    samples = [(f"s{g:06d}", own_files.read(int(a.shard_of[g]), int(a.offsets[g]), int(a.sizes[g])), "jpg",
                int(a.labels[g])) for g in range(n0)]
    w = bench_writer(samples, work, args.repeats, index["num_classes"])
    same = w["own"]["digests"][0] == w["wds"]["digests"][0]
    print(f"\n1. writer, one shard of {n0} samples ({sum(len(s[1]) for s in samples) / 1e6:.1f} MB), "
          f"{args.repeats} runs each:")
    print(f"   {'writer':28s} {'MB/s median (min..max)':>26s}  deterministic  bytes = make_shards'")
    print(f"   {'tario.write_shard (own)':28s} {_med(w['own']['mb_s']):>26s}  "
          f"{len(set(w['own']['digests'])) == 1!s:13s}  True")
    print(f"   {'webdataset.TarWriter':28s} {_med(w['wds']['mb_s']):>26s}  "
          f"{len(set(w['wds']['digests'])) == 1!s:13s}  {same}")
    print(f"   TarWriter writes a sample's members in sorted key order: {w['wds_order']} (make_shards: KEY.jpg, "
          "KEY.cls); it records no member offsets; ShardWriter opens each shard under its final name (no "
          "temporary + rename) and has no skip-finished-shards resume.")

    # -- 2. reader
    rng = np.random.default_rng(0)
    order = chunk[rng.permutation(len(chunk))]
    reads = np.resize(order, args.accesses)
    decoded = reads[: args.decoded]
    specs = [{"url": p, "nsamples": int(a.starts[i + 1] - a.starts[i])} for i, p in enumerate(paths)]

    def own_reader():
        files = ShardFiles(paths)
        offsets, sizes, shard_of, labels = a.offsets, a.sizes, a.shard_of, a.labels

        def get(g):
            return files.read(int(shard_of[g]), int(offsets[g]), int(sizes[g])), int(labels[g])
        return get

    def wids_reader():
        ds = wids.ShardListDataset(specs, localname=lambda url: url, transformations=[],
                                   lru_size=min(200, len(paths)))

        def get(g):
            s = ds[int(g)]  # values are io.BytesIO
            return s[".jpg"].getvalue(), int(s[".cls"].getvalue())
        return get

    import contextlib

    quiet = contextlib.redirect_stderr(io.StringIO())  # ShardListDataset prints a line per construction
    own_get = own_reader()
    with quiet:
        wids_get = wids_reader()
    for g in chunk[:50]:  # the same bytes and labels
        if own_get(g) != wids_get(g):
            print(f"error: sample {int(g)} differs between the readers", file=sys.stderr)
            return 1
    fast = train_transform("imagenet", fast=True)
    rates = {k: [] for k in ("own read", "wids read", "own read+decode", "wids read+decode")}
    resume = {k: [] for k in ("own", "wids")}
    pos = len(chunk) // 2  # the first batch at the middle of a pass
    for r in range(args.repeats):
        for name in (("own", "wids") if r % 2 == 0 else ("wids", "own")):
            with quiet:
                get = own_reader() if name == "own" else wids_reader()
            for g in reads[:200]:  # warm: every shard opened (wids: indexed) before timing
                get(g)
            t0 = time.perf_counter()
            for g in reads:
                get(g)
            rates[f"{name} read"].append(len(reads) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for i, g in enumerate(decoded):  # the same draws for both readers (crop sizes change the cost)
                random.seed(i)
                torch.default_generator.manual_seed(i)
                fast.decode_bytes(get(g)[0])
            rates[f"{name} read+decode"].append(len(decoded) / (time.perf_counter() - t0))
            # 3. resume: from nothing to the first batch at position pos of the chunk's pass
            t0 = time.perf_counter()
            if name == "own":
                idx = load_index(shards)
                arrays = split_arrays(idx, "train")
                ids = np.asarray(rank_chunk_ids(manifest, idx, 0)[0])
                perm = ids[np.random.default_rng([0, 0, 0, 0, 0x9E]).permutation(len(ids))]
                files = ShardFiles([os.path.join(shards, n) for n in arrays.names])
                for g in perm[pos:pos + args.batch]:
                    files.read(int(arrays.shard_of[g]), int(arrays.offsets[g]), int(arrays.sizes[g]))
            else:
                with quiet:
                    ds = wids.ShardListDataset(specs, localname=lambda url: url, transformations=[],
                                               lru_size=min(200, len(paths)))
                perm = chunk[np.random.default_rng([0, 0, 0, 0, 0x9E]).permutation(len(chunk))]
                for g in perm[pos:pos + args.batch]:
                    ds[int(g)][".jpg"].getvalue()
            resume[name].append((time.perf_counter() - t0) * 1e3)
    print(f"\n2. random access by index within rank 0's chunk ({len(chunk)} samples, {len(paths)} shards), "
          f"{args.repeats} rounds, order alternated, one torch thread:")
    print(f"   {'reader':24s} {'per second, median (min..max)':>32s}")
    for k, v in rates.items():
        unit = "img/s" if "decode" in k else "samples/s"
        print(f"   {k:24s} {_med(v):>26s} {unit}")
    ratio = [o / w_ for o, w_ in zip(rates["own read"], rates["wids read"])]
    print(f"   own / wids, read only, per round: median {statistics.median(ratio):.2f}x "
          f"({min(ratio):.2f}..{max(ratio):.2f})")
    print(f"\n3. resume: from nothing to the first batch of {args.batch} samples (read only) at position {pos}:")
    for k, v in resume.items():
        print(f"   {k:6s} {statistics.median(v):8.1f} ms  ({min(v):.1f}..{max(v):.1f})")
    scan = []
    for _ in range(args.repeats):  # what wids pays per shard on first use (and on every LRU miss)
        t0 = time.perf_counter()
        wids.wids.IndexedTarSamples(path=paths[0]).close()
        scan.append((time.perf_counter() - t0) * 1e3)
    print(f"   wids opens, mmaps and scans a shard's tar headers on first use: {statistics.median(scan):.2f} ms for "
          f"{specs[0]['nsamples']} samples ({min(scan):.2f}..{max(scan):.2f}); its LRU holds lru_size shards "
          "(it warns above 200); the own reader takes the offsets from index.json (hashed with the shards)")
    with quiet:
        ds = wids.ShardListDataset(specs, localname=lambda url: url, transformations=[],
                                   lru_size=min(200, len(paths)))
    sampler = wids.ChunkedSampler(ds, num_samples=args.resume_at + 1, chunksize=2000, seed=0, shuffle=True)
    t0 = time.perf_counter()
    it = iter(sampler)
    for _ in range(args.resume_at):
        next(it)
    skip = time.perf_counter() - t0
    print(f"   wids.ChunkedSampler has no start position: skipping to position {args.resume_at} took {skip:.2f} s "
          "(its shuffle is within windows of chunksize indices, not a permutation of the rank's chunk); the own "
          "loader's sample ids are a pure function of (seed, rank, step): O(1) at any step")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
