"""Start-up cost of a rank: verifying its shards by full sha256 vs by verification stamp.

    .venv/bin/python benchmarks/bench_startup.py                 # 2 GiB synthetic set, ~1-2 minutes
    .venv/bin/python benchmarks/bench_startup.py --launch        # + deepspeed launch-to-first-step (~5 min)

Writes a synthetic shard set of random bytes (tar shards with per-member offsets and an index.json,
the way data/make_shards does, through data.tario) under a temporary directory, builds a manifest
(p=4, mu=0.25, label_sorted: a rank's chunks have samples in nearly every shard), copies the set to
a node directory with data.replicate (sha256-verified and stamped) and deletes the source. Then it
times what a rank does at start in train.py's load_data: `risgd_data.index.verify_shards` over the
rank's train shards and the val shards, each run in a fresh process (the in-process cache is cold),
`full=True` (every shard hashed: the old behaviour, `data.verify: full`) against the default (the
stamp vouches for unchanged shards), alternating, --repeats times each. Prints medians and spread
side by side with the ratio. The shards sit in the page cache (just written), so the full figure
is hashing speed, a lower bound: from a cold disk it is the read time of the same bytes.

--launch also times a real `deepspeed --num_gpus 2 train.py --recipe recipes/digits.yaml` from
launch to the first training step, on the digits shards padded to --gb with one extra tar member
each (the loader reads samples by offset, so training is unchanged), without a stamp file (both
ranks hash every shard they read) and with one. Digits with gigabytes of padding is not a natural
data set, and the launch carries seconds of process-group and model set-up, so the fresh-process
verify timing is the primary figure. Everything is deleted at the end. Prints figures only.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

import numpy as np

from risgd_common.hashing import sha256_file
from risgd_data.index import INDEX_VERSION, load_index
from risgd_data.make_shards import shard_name, write_index
from risgd_data.manifest import build_manifest, check_manifest, write_manifest
from risgd_data.replicate import replicate
from risgd_data.stamps import STAMP_NAME
from risgd_data.tario import write_shard
from risgd_tools.launch import command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20

# One rank's start in a fresh process: train.py's load_data verification, timed inside the process.
_RANK_START = """
import json, sys, time
t0 = time.perf_counter()
from risgd_data.index import load_index, verify_shards
from risgd_data.manifest import load_manifest
d, manifest, rank, full = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
index, m = load_index(d), load_manifest(manifest)
t1 = time.perf_counter()
train = verify_shards(index, d, m["ranks"][rank]["shards"], full=full)
val = verify_shards(index, d, [s["name"] for s in index["splits"]["val"]["shards"]], split="val", full=full)
t2 = time.perf_counter()
out = {k: train[k] + val[k] for k in ("shards", "hashed", "hashed_bytes")}
print(json.dumps(dict(out, verify_s=t2 - t1, setup_s=t1 - t0)))
"""


def synthetic_set(out: str, gib: float, shard_mib: int, sample_kib: int, classes: int, seed: int) -> dict:
    """Train shards of about `shard_mib` each adding up to `gib` (one of them val), random payloads."""
    rng = np.random.default_rng(seed)
    per_shard = max(1, shard_mib * 1024 // sample_kib)
    n_shards = max(2, round(gib * 1024 / shard_mib))
    index = {"version": INDEX_VERSION, "format": "webdataset", "dataset": "synthetic", "num_classes": classes,
             "image_shape": [3, 224, 224], "classes": [str(c) for c in range(classes)], "seed": seed,
             "shard_size": per_shard, "split_rule": f"synthetic: random bytes, {sample_kib} KiB per sample",
             "splits": {}}
    plan = {"train": n_shards - 1, "val": 1}
    key = 0
    for split, count in plan.items():
        shards, start = [], 0
        for i in range(count):
            rows = []
            for _ in range(per_shard):
                rows.append((f"synthetic_{split}_{key:08d}", rng.bytes(sample_kib * 1024), "jpg",
                             int(rng.integers(classes))))
                key += 1
            rec = write_shard(os.path.join(out, shard_name(split, i)), iter(rows), classes)
            shards.append({"start": start, **rec.to_json()})
            start += rec.samples
        index["splits"][split] = {"samples": start, "shards": shards}
    write_index(index, out)
    return index


def rank_start(node: str, manifest: str, rank: int, full: bool) -> dict:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _RANK_START, node, manifest, str(rank), "1" if full else "0"],
                       capture_output=True, text=True, cwd=REPO, check=True)
    out = json.loads(r.stdout)
    out["process_s"] = time.perf_counter() - t0
    return out


def _spread(xs: list[float], unit: float = 1e-3, name: str = "ms") -> str:
    m, lo, hi = (x / unit for x in (statistics.median(xs), min(xs), max(xs)))
    return f"{m:9.1f} {name} [{lo:.1f} .. {hi:.1f}]"


def bench_verify(args: argparse.Namespace, work: str) -> None:
    src, node = os.path.join(work, "src"), os.path.join(work, "node")
    os.makedirs(src)
    t = time.perf_counter()
    index = synthetic_set(src, args.gb, args.shard_mb, args.sample_kb, args.classes, args.seed)
    total = sum(s["bytes"] for sp in index["splits"].values() for s in sp["shards"])
    print(f"synthetic set: {sum(len(sp['shards']) for sp in index['splits'].values())} shards, "
          f"{total / MiB:.0f} MiB, written in {time.perf_counter() - t:.1f} s")
    manifest = os.path.join(work, "m.yaml")
    write_manifest(build_manifest(index, args.workers, args.mu, partition="label_sorted", seed=args.seed), manifest)
    t = time.perf_counter()
    rep = replicate(manifest, src, node, node_rank=args.rank, ranks_per_node=1, log=lambda *_: None)
    print(f"replicate (copy + sha256 + stamp) of rank {args.rank}'s shards: {rep['files_copied']} files, "
          f"{rep['bytes_copied'] / MiB:.0f} MiB in {time.perf_counter() - t:.1f} s")
    shutil.rmtree(src)
    runs: dict[str, list[dict]] = {"full": [], "stamp": []}
    for _ in range(args.repeats):  # alternate, so both see the same machine load
        for mode in ("full", "stamp"):
            runs[mode].append(rank_start(node, manifest, args.rank, full=mode == "full"))
    f, s = runs["full"], runs["stamp"]
    print(f"\nrank {args.rank} start, fresh process each (p={args.workers}, mu={args.mu}, label_sorted): "
          f"{f[0]['shards']} shards (train + val), {f[0]['hashed_bytes'] / MiB:.0f} MiB; "
          f"median [min .. max] of {args.repeats}")
    print(f"{'':28s}{'before: full sha256':>34s}{'after: stamp':>34s}{'ratio':>9s}")
    for label, key in (("verify_shards (in process)", "verify_s"), ("process, launch to verified", "process_s")):
        a, b = [r[key] for r in f], [r[key] for r in s]
        print(f"{label:28s}{_spread(a):>34s}{_spread(b):>34s}{statistics.median(a) / statistics.median(b):8.1f}x")
    print(f"{'shards hashed':28s}{f[0]['hashed']:>34d}{s[0]['hashed']:>34d}")
    print(f"{'hash throughput':28s}{f[0]['hashed_bytes'] / MiB / statistics.median(r['verify_s'] for r in f):>28.0f}"
          " MiB/s")


# -- launch to first step -----------------------------------------------------------------------------

def _pad_shards(digits: str, out: str, gib: float) -> None:
    """Copy the digits shards, each with one extra random member so the set adds up to `gib`."""
    index = load_index(digits)
    shards = [s for sp in index["splits"].values() for s in sp["shards"]]
    pad = int(gib * 1024 * MiB / len(shards))
    rng = np.random.default_rng(0)
    os.makedirs(out)
    for s in shards:
        raw = open(os.path.join(digits, s["name"]), "rb").read()
        with tarfile.open(fileobj=io.BytesIO(raw)) as t:
            last = t.getmembers()[-1]
        end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
            info = tarfile.TarInfo("zzpadding.bin")
            info.size = pad
            t.addfile(info, io.BytesIO(rng.bytes(pad)))
        path = os.path.join(out, s["name"])
        with open(path, "wb") as f:  # a benchmark's scratch copy, not data/ output
            f.write(raw[:end])  # the samples keep their offsets
            f.write(buf.getvalue())
        s["bytes"], s["sha256"] = os.path.getsize(path), sha256_file(path)
    write_index(index, out)


def _first_step_seconds(cmd: list[str], timeout: float) -> tuple[float, float]:
    """Seconds from launch to the progress bar's first step, and to the end of the run."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    first, tail = [None], []
    step = re.compile(rb"\|\s*([1-9]\d*)/\d+")

    def read() -> None:
        buf = b""
        while chunk := proc.stdout.read1(65536):
            buf = (buf + chunk)[-4096:]
            tail.append(chunk)
            if first[0] is None and step.search(buf):
                first[0] = time.perf_counter() - t0

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rc = proc.wait(timeout)
    reader.join(10)
    if rc != 0 or first[0] is None:
        raise RuntimeError(f"launch failed (exit {rc}): {b''.join(tail)[-2000:].decode(errors='replace')}")
    return first[0], time.perf_counter() - t0


def bench_launch(args: argparse.Namespace, work: str) -> None:
    from risgd_data.make_shards import make_shards

    digits, shards = os.path.join(work, "digits"), os.path.join(work, "padded")
    make_shards("digits", digits, progress=False)
    _pad_shards(digits, shards, args.gb)
    index = load_index(shards)
    m = build_manifest(index, 2, 0.5, partition="label_sorted")
    check_manifest(m, index, shard_dir=shards)  # hashes all once: page cache as warm for both modes
    total = sum(s["bytes"] for sp in index["splits"].values() for s in sp["shards"])
    times: dict[str, list[tuple[float, float]]] = {"full": [], "stamp": []}
    for i in range(args.repeats):
        for mode in ("full", "stamp"):
            stamp = os.path.join(shards, STAMP_NAME)
            if mode == "full" and os.path.exists(stamp):
                os.remove(stamp)  # an unstamped directory: every rank hashes every shard it reads
            if mode == "stamp" and not os.path.exists(stamp):
                check_manifest(m, index, shard_dir=shards, stamp=True)
            cmd = command("recipes/digits.yaml", 2, [f"data.shards={shards}", f"runs_dir={os.path.join(work, 'runs')}",
                                                     f"run_name={mode}{i}", "steps=50", "tau=50", "eval_every=50",
                                                     "checkpoint_every=0", "wandb.enabled=false"],
                          trainer="train.py")  # the one launcher's command line
            times[mode].append(_first_step_seconds(cmd, 600))
    print(f"\ndeepspeed --num_gpus 2 train.py --recipe recipes/digits.yaml (CPU), digits padded to "
          f"{total / MiB:.0f} MiB ({sum(len(sp['shards']) for sp in index['splits'].values())} shards; each "
          f"rank reads {len(m['ranks'][0]['shards'])} train + all val shards); median [min .. max] of {args.repeats}")
    print(f"{'':28s}{'before: no stamp file':>34s}{'after: stamped':>34s}{'diff':>9s}")
    for label, k in (("launch to first step", 0), ("launch to end (50 steps)", 1)):
        a, b = [t[k] for t in times["full"]], [t[k] for t in times["stamp"]]
        print(f"{label:28s}{_spread(a, 1.0, 's'):>34s}{_spread(b, 1.0, 's'):>34s}"
              f"{statistics.median(a) - statistics.median(b):7.1f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/bench_startup.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0, help="GiB of shards (default 2)")
    ap.add_argument("--shard-mb", type=int, default=128, help="MiB per shard (default 128)")
    ap.add_argument("--sample-kb", type=int, default=128, help="KiB per sample (default 128, ~ an ImageNet JPEG)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--workers", type=int, default=4, help="ranks p of the manifest (default 4)")
    ap.add_argument("--mu", type=float, default=0.25)
    ap.add_argument("--rank", type=int, default=0, help="the rank whose start is timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--launch", action="store_true", help="also time deepspeed launch to first step (digits)")
    ap.add_argument("--tmp", default=None, help="where the temporary directory goes (default: the system's)")
    args = ap.parse_args(argv)
    bad = [f"--{k.replace('_', '-')} {v}" for k, v in (("gb", args.gb), ("shard_mb", args.shard_mb),
                                                       ("sample_kb", args.sample_kb), ("repeats", args.repeats))
           if not v > 0]
    if bad or args.tmp is not None and not os.path.isdir(args.tmp):
        print(f"error: {bad[0] + ' must be positive' if bad else f'--tmp {args.tmp} is not a directory'}",
              file=sys.stderr)
        return 2
    try:
        with tempfile.TemporaryDirectory(prefix="risgd-bench-startup-", dir=args.tmp) as work:
            bench_verify(args, work)
            if args.launch:
                bench_launch(args, work)
    except (OSError, RuntimeError, subprocess.SubprocessError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
