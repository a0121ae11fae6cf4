"""What a loader worker does per image on each decode path (recipe key data.decode), on the CPU.

    .venv/bin/python benchmarks/bench_decode_paths.py            # ~1 minute on 2 cores
    .venv/bin/python benchmarks/bench_decode_paths.py --images 600 --max-side 320 --rounds 7

Writes --images synthetic ImageNet-like JPEGs, shards them (make_shards, --max-side N when given)
and times one rank's train steps computed in this process (no DataLoader workers, one torch
thread), side by side in rounds (order alternated; median and min..max):

* decode=cpu: a worker's whole job (read, decode, crop/resize, flip, ColorJitter, normalize);
* decode=gpu, worker side: read, JPEG header, the draws, packing the encoded batch: what remains
  on the CPU when the device decodes;
* decode=gpu, the device part run on the CPU (DeviceDecode with device="cpu": libjpeg-turbo, for
  reference only: on a GPU it is nvJPEG and CUDA kernels, measured by benchmarks/gpu_check.py).

img/s per process; the worker cores one GPU needs follow from the worker-side rates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=400, help="synthetic training JPEGs (default 400)")
    ap.add_argument("--max-side", type=int, default=320, help="make_shards --max-side (0: full size; default 320)")
    ap.add_argument("--batch", type=int, default=32, help="batch of a step (default 32)")
    ap.add_argument("--steps", type=int, default=4, help="steps per timed block (default 4)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--work", default=None, help="directory for the data (default: a temporary one)")
    args = ap.parse_args(argv)

    import torch

    from risgd_data.index import load_index
    from risgd_data.loader import make_train_loader
    from risgd_data.make_shards import make_shards
    from risgd_data.manifest import build_manifest
    from risgd_data.synthetic import write_imagenet_tree

    torch.set_num_threads(1)
    work = args.work or tempfile.mkdtemp(prefix="bench_decode_")
    shards = os.path.join(work, f"shards-{args.max_side or 'full'}")
    if not os.path.exists(os.path.join(shards, "index.json")):
        if not os.path.exists(os.path.join(work, "src")):
            write_imagenet_tree(os.path.join(work, "src"), args.images, 8, classes=10, seed=0,
                                workers=os.cpu_count() or 1)
        make_shards("imagenet", shards, src=os.path.join(work, "src"), progress=False,
                    max_side=args.max_side or None)
    manifest = build_manifest(load_index(shards), 1, 0.0)
    kw = dict(base_batch=args.batch, seed=0, num_workers=0, verify=False)
    cpu = make_train_loader(manifest, shards, 0, **kw)
    gpu = make_train_loader(manifest, shards, 0, decode="gpu", device="cpu", **kw)
    sized = f"max_side {args.max_side}" if args.max_side else "full size"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"bench_decode_paths: {args.images} images, shards {sized}, batch {args.batch}, {args.steps} steps per "
          f"block, {args.rounds} rounds; load average {load}; {os.cpu_count()} CPUs", flush=True)

    encoded = {}

    def run_cpu(step):
        cpu._steps[step]

    def run_gpu_worker(step):
        encoded[step] = gpu._steps[step][0]

    def run_gpu_device(step):
        gpu.device_decode(encoded[step])

    paths = {"decode=cpu (worker: everything)": run_cpu, "decode=gpu, worker side": run_gpu_worker,
             "decode=gpu, device part on the CPU": run_gpu_device}
    rates = {k: [] for k in paths}
    for fn in paths.values():  # warm-up (and the encoded batches the device part decodes)
        for s in range(args.steps):
            fn(s)
    for r in range(args.rounds):
        names = list(paths) if r % 2 == 0 else [list(paths)[1], list(paths)[0], list(paths)[2]]
        for name in names:
            t0 = time.perf_counter()
            for s in range(args.steps):
                paths[name](s)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - t0))
    print(f"\n{'path':38s} {'img/s per process, median (min..max)':>38s}  {'ms/img':>7s}")
    for name, v in rates.items():
        m = statistics.median(v)
        print(f"{name:38s} {m:20.0f}  ({min(v):.0f}..{max(v):.0f})  {1e3 / m:7.3f}")
    ratio = [g / c for g, c in zip(rates["decode=gpu, worker side"], rates["decode=cpu (worker: everything)"])]
    print(f"worker side, gpu / cpu per round: median {statistics.median(ratio):.1f}x "
          f"({min(ratio):.1f}..{max(ratio):.1f}); load average at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
