"""Loader throughput vs a plain in-memory decode+transform loop, and replication storage figures.

    .venv/bin/python benchmarks/bench_loader.py            # synthetic CIFAR-like PNG shards, ~1 minute
    .venv/bin/python benchmarks/bench_loader.py --dataset digits
    .venv/bin/python benchmarks/bench_loader.py --imagenet --images 1200   # ImageNet-like JPEGs, ~3 minutes

Writes a CIFAR-format tarball of random smooth 32x32 images (or uses scikit-learn digits), shards
it, builds a manifest, then measures
  1. loader samples/s (rank 0, per_chunk policy, --workers DataLoader workers, steady state after
     --warmup steps), against a plain loop decoding and transforming the same encoded images from
     memory in this process (goal: ratio >= 0.9 with one worker);
  2. replication: the storage each node gets (1 rank per node) over one full copy of the train
     shards, next to the manifest's gamma_j = 1/p + mu and sum_j gamma_j = 1 + p*mu.
Prints figures only; nothing is asserted.

--imagenet writes --images synthetic photo-like JPEGs of ImageNet's pixel and file sizes (seeded,
no download; risgd_data.synthetic.write_imagenet_tree) in the ILSVRC-2012 layout, then
  1. converts them with make_shards --dataset imagenet with 1 and 2 worker processes (--repeats
     times each, the source evicted from the page cache before each run unless --warm-source):
     img/s total and per process, the time for the full 1.33M images, and whether the two runs'
     shards and index.json are byte-identical;
  2. measures img/s per process, side by side in rounds (order rotated each round; median and
     min..max over --repeats rounds; one torch thread): torchvision ImageFolder + the same timm
     train transform (the peer), this loader with that transform (as is), this loader's fast path
     (FastTrainTransform) with the PIL decoder and with simplejpeg, and the fast loader with 1 and 2
     DataLoader workers; the ratios to the peer per round;
     Side by side with them in the same rounds: this loader's fast path on pre-sized shards
     (make_shards --max-side N, N=--max-side, default 320: shorter side <= N, re-encoded at
     --quality), against the same peer on the original JPEGs (goal: >= 3x per process at N=320);
     the conversion rate of make_shards --max-side (img/s, --repeats runs, source evicted);
  3. a per-image breakdown of the fast path (simplejpeg) on the full-size and the pre-sized shards:
     decode alone, crop + resize alone, the rest (header, draws, flip, ColorJitter, normalize);
  4. prints how many loader cores one GPU training ResNet-50 needs at the measured rate.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import random
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from risgd_data.index import load_index, split_arrays
from risgd_data.loader import make_train_loader
from risgd_data.make_shards import IMAGENET_IMAGES, make_shards
from risgd_data.manifest import build_manifest, write_manifest
from risgd_data.replicate import replicate
from risgd_data.stamps import STAMP_NAME
from risgd_data.synthetic import write_cifar_tarball, write_imagenet_tree
from risgd_data.transforms import FastTrainTransform, image_mode, train_transform


def _shards(args: argparse.Namespace, work: str) -> str:
    out = os.path.join(work, "shards")
    if args.dataset == "digits":
        make_shards("digits", out, progress=False)
    else:
        tgz = write_cifar_tarball(os.path.join(work, "cifar-10-python.tar.gz"), "cifar10",
                                  n_train=args.samples, n_test=200, seed=0)
        make_shards("cifar10", out, src=tgz, progress=False)
    return out


def _plain_loop(ids: list[int], blobs: dict[int, bytes], tf, mode: str, bsz: int) -> float:
    """Samples/s of decode + transform + stack over in-memory encoded images, in this process."""
    t0 = time.perf_counter()
    for s in range(0, len(ids), bsz):
        batch = []
        for i in ids[s:s + bsz]:
            with Image.open(io.BytesIO(blobs[i])) as im:
                batch.append(tf(im.convert(mode)))
        torch.stack(batch)
    return len(ids) / (time.perf_counter() - t0)


def bench_loader(args: argparse.Namespace, shard_dir: str, manifest: dict) -> None:
    index = load_index(shard_dir)
    a = split_arrays(index)
    blobs = {}  # every encoded train image, in memory, for the plain loop
    for k, name in enumerate(a.names):
        with open(os.path.join(shard_dir, name), "rb") as f:
            raw = f.read()
        for i in range(int(a.starts[k]), int(a.starts[k + 1])):
            blobs[i] = raw[a.offsets[i]:a.offsets[i] + a.sizes[i]]
    loader = make_train_loader(manifest, shard_dir, 0, args.batch, num_workers=args.workers, seed=0)
    tf, mode, bsz = train_transform(index["dataset"]), image_mode(index["dataset"]), loader.batch_size
    it = iter(loader)
    for _ in range(args.warmup):  # worker start-up and first permutations
        next(it)
    # Rounds alternate loader and plain loop over the same images, so that load from other
    # processes on the machine hits both alike; the best round of each is reported.
    loader_rates, plain_rates = [], []
    for _ in range(args.rounds):
        first = loader.step
        t0 = time.perf_counter()
        n = sum(next(it)[0].shape[0] for _ in range(args.steps))
        loader_rates.append(n / (time.perf_counter() - t0))
        ids = [i for s in range(first, loader.step) for i in loader.sample_ids(s)]
        plain_rates.append(_plain_loop(ids, blobs, tf, mode, bsz))
    best_l, best_p = max(loader_rates), max(plain_rates)
    print(f"loader: {best_l:,.0f} samples/s best of {args.rounds} rounds "
          f"{[round(r) for r in loader_rates]}  (rank 0, batch {bsz} = sub-batches "
          f"{loader.sub_batch_sizes}, {args.workers} worker(s), {args.steps} steps per round)")
    print(f"plain in-memory decode+transform loop: {best_p:,.0f} samples/s best of "
          f"{[round(r) for r in plain_rates]}")
    ratios = [lr / pr for lr, pr in zip(loader_rates, plain_rates)]
    print(f"ratio loader / plain = {best_l / best_p:.3f} (best vs best; per round "
          f"{[round(r, 3) for r in ratios]}; goal >= 0.9 with one worker)")
    print(f"samples skipped (corrupt): {loader.samples_skipped}")
    print(f"machine: {os.cpu_count()} cpus, load average {os.getloadavg()[0]:.2f} "
          "(other processes skew timings)")


def bench_replication(args: argparse.Namespace, shard_dir: str, work: str, partition: str) -> None:
    index = load_index(shard_dir)
    m = build_manifest(index, args.p, args.mu, partition, seed=0)
    path = os.path.join(work, f"manifest-{partition}.yaml")
    write_manifest(m, path)
    print(f"\nreplication, p={args.p} mu={args.mu} partition={partition}, 1 rank per node:")
    total = 0.0
    for k in range(args.p):
        rep = replicate(path, shard_dir, os.path.join(work, f"node{k}-{partition}"), k, 1, with_val=False,
                        log=lambda *_: None)
        total += rep["node_storage_over_full_copy"]
        print(f"  node {k}: storage / full copy = {rep['node_storage_over_full_copy']:.4f} "
              f"(manifest shard-level {rep['manifest_node_storage_over_full_copy']:.4f}; "
              f"gamma_j = 1/p + mu_j = {m['ranks'][k]['gamma']:.4f}, "
              f"samples held {m['ranks'][k]['gamma_actual']:.4f})")
    per_node = m["ranks"][0]["gamma"]
    print(f"  all nodes: storage / full copy = {total:.4f}; manifest sum_j gamma_j = "
          f"{m['summary']['sum_gamma']:.4f} = 1 + p*mu = {1 + args.p * args.mu:.4f}")
    print(f"  per node over the no-redundancy share 1/p: {per_node * args.p:.4f} = 1 + p*mu "
          f"(the '1 + mu' of the issue holds only if mu is read as p*mu = q-1 extra chunks per node)")
    print("  any excess of measured storage over gamma_j is shard granularity: a shard is copied whole "
          "if the node "
          "needs any sample in it" + (" (label_sorted chunks are scattered over all shards)"
                                      if partition != "iid" else ""))


# ---------------------------------------------------------------- ImageNet mode

def _spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}..{max(values):{fmt}})"


def _evict(root: str) -> None:
    """Drop the files under `root` from the page cache (posix_fadvise DONTNEED; our files only, no
    privileges), so that a conversion reads them from the disk as a first conversion would."""
    for d, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(d, name), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _same_tree(a: str, b: str) -> bool:
    """Every shard and index.json byte-identical (not the verification stamps: they hold inodes, mtimes)."""
    names = sorted(n for n in os.listdir(a) if n != STAMP_NAME)
    if names != sorted(n for n in os.listdir(b) if n != STAMP_NAME):
        return False
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            if fa.read() != fb.read():
                return False
    return True


def _tree_stats(root: str) -> str:
    sizes, dims = [], []
    for d, _, files in os.walk(os.path.join(root, "train")):
        for name in files:
            path = os.path.join(d, name)
            sizes.append(os.path.getsize(path))
            with Image.open(path) as im:
                dims.append(im.size)
    kb = sorted(x / 1e3 for x in sizes)
    w = statistics.mean(x for x, _ in dims)
    h = statistics.mean(y for _, y in dims)
    return (f"mean {statistics.mean(kb):.1f} KB (5%..95%: {kb[len(kb) // 20]:.0f}..{kb[-len(kb) // 20 - 1]:.0f} KB), "
            f"mean {w:.0f} x {h:.0f} px")


def bench_conversion(args: argparse.Namespace, tree: str, work: str) -> str:
    """make_shards --dataset imagenet with 1 and 2 worker processes, alternating, --repeats times."""
    rates: dict[int, dict[str, list[float]]] = {k: {"total": [], "per": [], "min": []} for k in (1, 2)}
    for _ in range(args.repeats):
        for k in (1, 2):
            out = os.path.join(work, f"shards-w{k}")
            shutil.rmtree(out, ignore_errors=True)
            if not args.warm_source:
                _evict(tree)
            report: dict = {}
            make_shards("imagenet", out, src=tree, shard_size=args.shard_size, progress=False, workers=k,
                        report=report)
            total = report["written"] / report["convert_seconds"]
            overhead = report["seconds"] - report["convert_seconds"]
            rates[k]["total"].append(total)
            rates[k]["per"].append(report["written"] / report["busy_seconds"])
            rates[k]["min"].append((overhead + IMAGENET_IMAGES / total) / 60)
    where = "from the page cache" if args.warm_source else "evicted from the page cache before each run"
    print(f"\nconversion: make_shards --dataset imagenet --shard-size {args.shard_size}, {args.repeats} repeats "
          f"(source {where}); median (min..max):")
    for k in (1, 2):
        print(f"  --workers {k}: {_spread(rates[k]['total'])} img/s total, {_spread(rates[k]['per'])} img/s per "
              f"process; full ImageNet-1k ({IMAGENET_IMAGES:,} images): {_spread(rates[k]['min'], '.1f')} min")
    same = _same_tree(os.path.join(work, "shards-w1"), os.path.join(work, "shards-w2"))
    print(f"  shards and index.json of --workers 1 and --workers 2 byte-identical: {'yes' if same else 'NO'}")
    return os.path.join(work, "shards-w1")


def bench_presize_conversion(args: argparse.Namespace, tree: str, work: str) -> str:
    """make_shards --max-side N with 1 worker process, --repeats times: img/s, what it wrote, determinism."""
    total, per, resized, outs = [], [], [], []
    for r in range(min(args.repeats, 2) if args.quick_presize else args.repeats):
        out = os.path.join(work, f"shards-max{args.max_side}-{r % 2}")
        shutil.rmtree(out, ignore_errors=True)
        if not args.warm_source:
            _evict(tree)
        report: dict = {}
        make_shards("imagenet", out, src=tree, shard_size=args.shard_size, progress=False, workers=1, report=report,
                    max_side=args.max_side, quality=args.quality)
        total.append(report["written"] / report["convert_seconds"])
        per.append(report["written"] / report["busy_seconds"])
        resized.append(report["resized"])
        outs.append(out)
    full, sized = _train_bytes(os.path.join(work, "shards-w1")), _train_bytes(outs[0])
    dims = [Image.open(io.BytesIO(b)).size for b in sized]
    same = len(outs) < 2 or _same_tree(outs[0], outs[1])
    where = "from the page cache" if args.warm_source else "evicted from the page cache before each run"
    print(f"\nconversion with pre-sizing: make_shards --dataset imagenet --max-side {args.max_side} --quality "
          f"{args.quality} --workers 1, {len(total)} repeats (source {where}); median (min..max):")
    print(f"  {_spread(total)} img/s total, {_spread(per)} img/s per process; full ImageNet-1k: "
          f"{_spread([IMAGENET_IMAGES / t / 60 for t in total], '.1f')} min at one process")
    print(f"  re-encoded {resized[0]} of {len(sized)} training images (the rest already <= {args.max_side} px on the "
          f"shorter side); train shards {sum(map(len, sized)) / 1e6:.1f} MB against {sum(map(len, full)) / 1e6:.1f} MB "
          f"full size; mean {statistics.mean(w for w, _ in dims):.0f} x {statistics.mean(h for _, h in dims):.0f} px, "
          f"{statistics.mean(map(len, sized)) / 1e3:.1f} KB; two runs byte-identical: {'yes' if same else 'NO'}")
    return outs[0]


def _train_bytes(shard_dir: str, limit: int | None = None) -> list[bytes]:
    """The encoded training images of a shard directory, in shard order."""
    a = split_arrays(load_index(shard_dir))
    out = []
    for k, name in enumerate(a.names):
        with open(os.path.join(shard_dir, name), "rb") as f:
            raw = f.read()
        out += [raw[a.offsets[i]:a.offsets[i] + a.sizes[i]] for i in range(int(a.starts[k]), int(a.starts[k + 1]))]
    return out[:limit]


def breakdown(blobs: list[bytes], tf: FastTrainTransform, repeats: int) -> dict[str, list[float]]:
    """Per-image ms of the fast path (simplejpeg), medians over `repeats` passes: the whole transform,
    the JPEG decode alone (at the reduction the crop allows), the crop + resize alone (on the decoded
    images), and the rest (total - decode - resize: header, draws, flip, ColorJitter, normalize)."""
    sj = tf._sj
    out = torch.empty((3, *tf.size))

    def params(i: int, raw: bytes):
        random.seed(i)
        torch.manual_seed(i)
        height, width = sj.decode_jpeg_header(raw)[:2]
        p = tf.sample_params(width, height)
        r = tf.reduction(p)
        return p, r, -(-height // r), -(-width // r)

    plan = [params(i, raw) for i, raw in enumerate(blobs)]
    decoded = [sj.decode_jpeg(raw, colorspace="RGB", min_factor=r, min_height=dh, min_width=dw)
               for raw, (_, r, dh, dw) in zip(blobs, plan)]
    times: dict[str, list[float]] = {"total": [], "decode": [], "resize": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i, raw in enumerate(blobs):
            random.seed(i)
            torch.manual_seed(i)
            tf.decode_bytes(raw, out)
        t1 = time.perf_counter()
        for raw, (_, r, dh, dw) in zip(blobs, plan):
            sj.decode_jpeg(raw, colorspace="RGB", min_factor=r, min_height=dh, min_width=dw)
        t2 = time.perf_counter()
        for arr, (p, r, _, _) in zip(decoded, plan):  # what FastTrainTransform._finish does first
            if r == 1:
                crop = np.ascontiguousarray(arr[p.top:p.top + p.height, p.left:p.left + p.width])
                torch.nn.functional.interpolate(torch.from_numpy(crop).permute(2, 0, 1)[None], size=tf.size,
                                                mode="bilinear", antialias=True, align_corners=False)
            else:
                box = (p.left / r, p.top / r, (p.left + p.width) / r, (p.top + p.height) / r)
                Image.fromarray(arr).resize(tf.size[::-1], Image.BILINEAR, box=box)
        t3 = time.perf_counter()
        n = len(blobs) / 1e3
        times["total"].append((t1 - t0) / n)
        times["decode"].append((t2 - t1) / n)
        times["resize"].append((t3 - t2) / n)
    times["rest"] = [t - d - z for t, d, z in zip(times["total"], times["decode"], times["resize"])]
    return times


def bench_breakdown(args: argparse.Namespace, shard_dirs: dict[str, str]) -> None:
    tf = train_transform("imagenet")
    if getattr(tf, "decoder", None) != "simplejpeg":
        print("\nper-image breakdown skipped: simplejpeg is not installed (pip install simplejpeg)")
        return
    print(f"\nper image, fast path (simplejpeg), {args.breakdown_images} training images, {args.repeats} passes; "
          "ms median (min..max) and share of the total:")
    for what, d in shard_dirs.items():
        t = breakdown(_train_bytes(d, args.breakdown_images), tf, args.repeats)
        total = statistics.median(t["total"])
        parts = ", ".join(f"{k} {_spread(t[k], '.3f')} ({100 * statistics.median(t[k]) / total:.0f}%)"
                          for k in ("decode", "resize", "rest"))
        print(f"  {what:24s} total {_spread(t['total'], '.3f')}: {parts}")
    print("  (decode: simplejpeg at the reduction the crop allows; resize: slice + antialiased bilinear to 224; "
          "rest: header, draws, flip, ColorJitter, normalize into the batch)")


class _Peer:
    """torchvision ImageFolder + the same timm transform, shuffled, endless (epoch after epoch)."""

    def __init__(self, root: str, transform, batch: int):
        from torchvision.datasets import ImageFolder

        ds = ImageFolder(root, transform=transform)
        gen = torch.Generator().manual_seed(0)
        self.dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0, generator=gen,
                                              drop_last=True)
        self.it = itertools.chain.from_iterable(itertools.repeat(self.dl))

    def next_batch(self) -> int:
        return next(self.it)[0].shape[0]


def bench_imagenet_loaders(args: argparse.Namespace, tree: str, shard_dir: str, sized_dir: str) -> None:
    load_start = os.getloadavg()[0]
    torch.set_num_threads(1)  # per process = one core; DataLoader workers run one thread each too
    index = load_index(shard_dir)
    manifest = build_manifest(index, 1, 0.0, "iid", seed=0)  # one rank holding the whole training set
    slow = train_transform("imagenet", fast=False)
    fast_pil = FastTrainTransform(slow, decoder="pil")
    fast_default = train_transform("imagenet")  # what training uses: simplejpeg if installed

    def rank_loader(tf, workers: int, shards: str = shard_dir):
        return make_train_loader(manifest if shards == shard_dir else sized_manifest, shards, 0, args.batch,
                                 transform=tf, seed=0, num_workers=workers)

    sized_manifest = build_manifest(load_index(sized_dir), 1, 0.0, "iid", seed=0)
    sized_name = f"loader, pre-sized shards (N={args.max_side}), fast path"

    peer = _Peer(os.path.join(tree, "train"), slow, args.batch)
    in_process = {
        "peer: torchvision ImageFolder + timm transform": peer.next_batch,
        "loader, timm transform (as is)": _next_of(rank_loader(slow, 0)),
        "loader, fast path, PIL decoder": _next_of(rank_loader(fast_pil, 0)),
        f"loader, fast path, {fast_default.decoder} decoder (default)": _next_of(rank_loader(fast_default, 0)),
        sized_name: _next_of(rank_loader(train_transform("imagenet"), 0, sized_dir)),
    }
    worker_loaders = {k: rank_loader(fast_default, k) for k in args.worker_counts}
    for fn in in_process.values():  # warm-up: first permutations, allocator, file descriptors
        fn()
    rates: dict[str, list[float]] = {name: [] for name in in_process}
    wrates: dict[int, list[float]] = {k: [] for k in worker_loaders}
    names = list(in_process)
    for r in range(args.repeats):
        # Batch by batch, competitors in turn (order rotated every batch), so that load from other
        # processes on the machine hits all of them alike; one rate per competitor per round.
        took = dict.fromkeys(names, 0.0)
        done = dict.fromkeys(names, 0)
        for s in range(args.steps):
            k = (r + s) % len(names)
            for name in names[k:] + names[:k]:
                t0 = time.perf_counter()
                done[name] += in_process[name]()
                took[name] += time.perf_counter() - t0
        for name in names:
            rates[name].append(done[name] / took[name])
        for k, ld in worker_loaders.items():  # workers run in the background: one loader at a time
            it = iter(ld)
            for _ in range(k):  # start-up: the workers' first batches
                next(it)
            t0 = time.perf_counter()
            n = sum(next(it)[0].shape[0] for _ in range(args.steps * k))
            wrates[k].append(n / (time.perf_counter() - t0))
            it.close()  # shuts the workers down
    peer_rates = rates[names[0]]
    print(f"\nloader throughput, img/s per process (one core): batch {args.batch}, {args.steps} batches per "
          f"competitor per round, taken in turn; {args.repeats} rounds; median (min..max) [per round]")
    for name in names:
        print(f"  {name:56s} {_spread(rates[name])}  {[round(x) for x in rates[name]]}")
    for k, v in wrates.items():
        per = [x / k for x in v]
        print(f"  {f'loader, fast path, {k} DataLoader worker(s)':56s} {_spread(per)} per process, "
              f"{_spread(v)} in total")
    print("ratio to the peer, per round (same round), median (min..max):")
    goals = {names[1]: "goal >= 1.0", names[3]: "goal >= 2",
             sized_name: "goal >= 3" if args.max_side == 320 else "(the goal, >= 3, is for N=320)"}
    for name in names[1:]:
        ratio = [a / b for a, b in zip(rates[name], peer_rates)]
        print(f"  {name:56s} {_spread(ratio, '.2f')}  {goals.get(name, '')}")
    sized = [a / b for a, b in zip(rates[sized_name], rates[names[3]])]
    print(f"  {'pre-sized over full-size shards (both fast path)':56s} {_spread(sized, '.2f')}")
    for k, v in wrates.items():
        ratio = [a / k / b for a, b in zip(v, peer_rates)]
        print(f"  {f'loader, fast path, {k} DataLoader worker(s), per process':56s} {_spread(ratio, '.2f')}")
    c = fast_default.counts
    print(f"fast path: {fast_default.decoder} decoder; {c['reduced']} of {c['decoded']} crops "
          f"({100 * c['reduced'] / max(1, c['decoded']):.1f}%) were decoded at a reduced scale (the crop >= 2x the "
          f"output in both sides); {c['pil']} went through PIL")
    per_process = statistics.median(rates[names[3]])
    print(f"\nloader cores per GPU for ResNet-50 at {per_process:,.0f} img/s per loader process (fast path, one "
          "core each; this machine's cores):")
    for rate, what in zip(args.gpu_rates, args.gpu_labels):
        print(f"  {what} at {rate:,.0f} img/s: {rate / per_process:.1f} cores (with the timm transform as is: "
              f"{rate / statistics.median(rates[names[1]]):.1f})")
    print(f"machine: {os.cpu_count()} cpus, load average {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} "
          "now (other processes skew absolute rates; the ratios are taken side by side)")


def _next_of(loader):
    it = iter(loader)
    return lambda: next(it)[0].shape[0]


def main_imagenet(args: argparse.Namespace) -> int:
    if not isinstance(train_transform("imagenet"), FastTrainTransform):
        return _error("the fast path is off (RISGD_FAST_DECODE=0?): unset it to benchmark it", 2)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        tree = os.path.join(work, "imagenet-synthetic")
        t0 = time.perf_counter()
        info = write_imagenet_tree(tree, args.images, args.val_images, classes=args.classes, seed=0,
                                   workers=os.cpu_count() or 1)
        print(f"ImageNet-like data: {args.images} train + {args.val_images} val synthetic JPEGs in {args.classes} "
              f"classes under {tree} ({time.perf_counter() - t0:.0f} s; existing files are kept); train "
              f"{_tree_stats(tree)}; {info['mean_kb']:.1f} KB mean over both splits")
        shard_dir = bench_conversion(args, tree, work)
        sized_dir = bench_presize_conversion(args, tree, work)
        bench_imagenet_loaders(args, tree, shard_dir, sized_dir)
        bench_breakdown(args, {"full-size shards": shard_dir, f"pre-sized (N={args.max_side})": sized_dir})
    return 0


def _error(msg: str, status: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return status


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["cifar", "digits"], default="cifar",
                    help="synthetic CIFAR-like PNG shards (default) or scikit-learn digits")
    ap.add_argument("--samples", type=int, default=10000, help="synthetic CIFAR training images")
    ap.add_argument("--batch", type=int, default=None, help="base batch per chunk (default 128; --imagenet: 32)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20; --imagenet: 8)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating loader / plain-loop rounds")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    ap.add_argument("--p", type=int, default=4, help="workers in the manifest")
    ap.add_argument("--mu", type=float, default=0.25, help="redundancy in the manifest")
    ap.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    im = ap.add_argument_group("ImageNet mode")
    im.add_argument("--imagenet", action="store_true",
                    help="synthetic ImageNet-like JPEGs: conversion and loader throughput against ImageFolder")
    im.add_argument("--images", type=int, default=1200, help="synthetic training JPEGs (default 1200)")
    im.add_argument("--val-images", type=int, default=100, help="synthetic validation JPEGs (default 100)")
    im.add_argument("--classes", type=int, default=10, help="classes (default 10)")
    im.add_argument("--shard-size", type=int, default=100, help="images per shard for the conversion (default 100)")
    im.add_argument("--repeats", type=int, default=5, help="rounds per measurement (median, min..max; default 5)")
    im.add_argument("--worker-counts", type=int, nargs="+", default=[1, 2],
                    help="DataLoader worker counts for the fast loader (default 1 2)")
    im.add_argument("--max-side", type=int, default=320,
                    help="pre-sized shards: make_shards --max-side N (default 320)")
    im.add_argument("--quality", type=int, default=90, help="JPEG quality of the pre-sized shards (default 90)")
    im.add_argument("--quick-presize", action="store_true",
                    help="convert with --max-side twice only (the determinism check), not --repeats times")
    im.add_argument("--breakdown-images", type=int, default=200,
                    help="training images in the per-image breakdown (default 200)")
    im.add_argument("--warm-source", action="store_true",
                    help="convert from the page cache (default: evict the source files before each run)")
    im.add_argument("--gpu-rates", type=float, nargs="+", default=[2500.0, 3000.0, 5000.0],
                    help="ResNet-50 training img/s of one GPU for the cores estimate")
    im.add_argument("--gpu-labels", nargs="+", default=["A100 (mixed precision, low end)",
                                                          "A100 (mixed precision, high end)",
                                                          "H100 (assumed, not measured here)"],
                    help="labels of --gpu-rates")
    args = ap.parse_args(argv)
    if args.imagenet:
        if args.steps is None:
            args.steps = 8
        if args.batch is None:
            args.batch = 32
        bad = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in ("images", "classes", "shard_size", "repeats",
                                                                         "steps", "batch", "max_side",
                                                                         "breakdown_images") if getattr(args, k) < 1]
        bad += [f"--quality {args.quality}"] if not 1 <= args.quality <= 95 else []
        bad += [f"--val-images {args.val_images}"] if args.val_images < 0 else []
        bad += [f"--worker-counts {k}" for k in args.worker_counts if k < 1]
        bad += [f"--gpu-rates {r:g}" for r in args.gpu_rates if not r > 0]
        if bad:
            return _error(f"{', '.join(bad)} invalid: use positive numbers", 2)
        if args.images < args.classes:
            return _error(f"--images {args.images} is fewer than --classes {args.classes}: give every class an "
                          "image", 2)
        if len(args.gpu_labels) != len(args.gpu_rates):
            return _error(f"{len(args.gpu_labels)} --gpu-labels for {len(args.gpu_rates)} --gpu-rates: give one "
                          "label per rate", 2)
        try:
            return main_imagenet(args)
        except Exception as e:  # the work itself failed: one line, exit 1
            return _error(f"{type(e).__name__}: {' '.join(str(e).split())}", 1)
    args.steps = 20 if args.steps is None else args.steps
    args.batch = 128 if args.batch is None else args.batch
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        t0 = time.perf_counter()
        shard_dir = _shards(args, work)
        print(f"shards written in {time.perf_counter() - t0:.1f}s under {shard_dir}")
        manifest = build_manifest(load_index(shard_dir), args.p, args.mu, "iid", seed=0)
        bench_loader(args, shard_dir, manifest)
        for partition in ("iid", "label_sorted"):
            bench_replication(args, shard_dir, work, partition)
    return 0


if __name__ == "__main__":
    sys.exit(main())
