"""Redundancy manifest: which chunks (and which shards) each rank holds.

    python -m data.manifest build --index DIR/index.json --workers 4 --mu 0.25 --partition label_sorted \\
        --seed 0 --out M.yaml
    python -m data.manifest check M.yaml --index DIR/index.json [--shard-dir DIR]

RI-SGD (Haddadpour et al. 2019): with p workers and mu = (q-1)/p, rank j holds its own chunk D_j,
the cyclic chunks D_{j+1}..D_{j+q-1}, and for a fractional mu*p a seeded random subset of the next
chunk, so that it holds gamma_j = 1/p + mu_j of the training set. `--mode coop` is cooperative
SGD: every rank samples from the whole set (gamma_j = 1).
"""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import sys
from collections import Counter
from collections.abc import Callable

import numpy as np
import yaml

from risgd_common.atomic import write_text_atomic
from risgd_common.cli import Parser
from risgd_common.install import command

from .errors import EXIT_BAD_INPUT, EXIT_OK, DataError, cli_error, safe_name
from .index import load_index, split_arrays, verify_shards
from .partition import parse_scheme, resolve_chunks
from .partition import partition as make_partition
from .stamps import Stamps

MANIFEST_VERSION = 1
MODES = ("risgd", "coop")
_EPS = 1e-9


# ---------------------------------------------------------------- sample-level helpers

def subset_ids(chunk_ids: np.ndarray, seed: int, rank: int, chunk: int, count: int) -> np.ndarray:
    """The seeded random subset of a partial chunk: the first `count` of a rank-keyed permutation."""
    perm = np.random.default_rng([seed, rank, chunk, 0x5B]).permutation(len(chunk_ids))
    return np.sort(chunk_ids[perm[:count]])


def ids_digest(ids: np.ndarray) -> str:
    # Recorded so `check` notices if a numpy upgrade ever changed the subset stream.
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()


def rank_chunk_ids(manifest: dict, index: dict, rank: int) -> list[np.ndarray]:
    """Sorted global train ids of each of `rank`'s chunks, in manifest order (own chunk first)."""
    arrays = split_arrays(index, "train")
    all_chunks = resolve_chunks(manifest["chunks"], arrays.labels)
    out = []
    for c in manifest["ranks"][rank]["chunks"]:
        ids = all_chunks[c["chunk"]]
        if "subset" in c:
            ids = subset_ids(ids, manifest["seed"], rank, c["chunk"], c["subset"]["count"])
        out.append(ids)
    return out


def live_coverage(manifest: dict, index: dict, live_ranks: list[int] | set[int] | frozenset[int]) -> float:
    """Fraction of the training samples held by at least one of `live_ranks` (failed workers'
    data survives on the ranks that hold redundant copies of it)."""
    held = [ids for r in live_ranks for ids in rank_chunk_ids(manifest, index, r)]
    if not held:
        return 0.0
    return len(np.unique(np.concatenate(held))) / index["splits"]["train"]["samples"]


def chunk_draw_scales(manifest: dict, live: list[int] | set[int] | frozenset[int]) -> dict[int, list[float]]:
    """Held and drawn: per live worker, one factor per chunk it holds (manifest order) by which it scales
    its sub-batch of that chunk, so that every chunk a live worker still holds is drawn at its full share
    of a step (the sum of all p workers' fractions of it), however many of its holders are lost.

    With every worker live all factors are 1. At p=4, mu=0.5 every chunk is held in full by 3 workers
    (cyclic); after worker 3 is lost chunk 2 keeps its 3 holders and chunks 0, 1 and 3 have 2 each: 3/9
    of a step against 2/9 (a class skew on label-sorted data). With the factors the holders of chunks 0,
    1 and 3 draw 1.5x of them, and every chunk is again a quarter of the step. The survivors' batches
    grow by what the lost worker drew. A chunk no live worker holds is not drawn at all (its data is
    lost: the coverage says so)."""
    full: dict[int, float] = {}
    held: dict[int, float] = {}
    for w, r in enumerate(manifest["ranks"]):
        for c in r["chunks"]:
            full[c["chunk"]] = full.get(c["chunk"], 0.0) + c["fraction"]
            if w in live:
                held[c["chunk"]] = held.get(c["chunk"], 0.0) + c["fraction"]
    return {w: [full[c["chunk"]] / held[c["chunk"]] for c in manifest["ranks"][w]["chunks"]] for w in sorted(live)}


def _shards_of(ids: np.ndarray, starts: np.ndarray, names: list[str]) -> list[str]:
    pos = np.unique(np.searchsorted(starts, ids, side="right") - 1)
    return [names[i] for i in pos]


# ---------------------------------------------------------------- build

def _rank_mus(p: int, mu: float, hetero_std: float, seed: int) -> np.ndarray:
    if hetero_std <= 0:
        return np.full(p, mu)
    # The paper's heterogeneous setting: mu_j ~ N(mu, std), clipped to the feasible range.
    draw = np.random.default_rng([seed, 0x4E7]).normal(mu, hetero_std, size=p)
    return np.clip(draw, 0.0, (p - 1) / p)


def _cyclic(j: int, p: int, mu_j: float) -> list[tuple[int, float]]:
    """[(chunk, fraction)] for rank j: own chunk, floor(mu_j*p) full cyclic ones, one partial."""
    extra = mu_j * p
    k = min(int(math.floor(extra + _EPS)), p - 1)
    r = extra - k if extra - k > 1e-6 else 0.0
    out = [((j + i) % p, 1.0) for i in range(k + 1)]
    if r > 0 and k < p - 1:
        out.append(((j + k + 1) % p, r))
    return out


def _is_number(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _flag(param: str, value: object) -> str:
    """How the data commands name a parameter and its value: their flag (``--mu 0.9``)."""
    return f"--{param.replace('_', '-')} {value}"


def validate_manifest_params(workers: int, mu: float, partition: str, hetero_std: float = 0.0,
                             mode: str = "risgd", spell: Callable[[str, object], str] = _flag) -> None:
    """Check the manifest parameters before any data work; raise DataError (one line) if one is bad.

    Needs no shards and no index, so the trainer can call it first. build_manifest calls this same
    function (one rule per key), then checks what needs the index: workers <= training samples.
      mode        risgd | coop
      workers     an integer >= 1 (p)
      mu          in [0, (p-1)/p] (mode risgd; coop ignores it: every rank holds everything)
      hetero_std  a finite number >= 0
      partition   iid | label_sorted | dirichlet:ALPHA with ALPHA > 0 (data.partition.parse_scheme),
                  checked in both modes
    ``spell(param, value)`` names a parameter in the caller's words: the data commands' flags by
    default (``--mu 0.9``); the trainer names its recipe keys and where they were written.
    """
    if mode not in MODES:
        raise DataError(f"{spell('mode', repr(mode))} is invalid: use risgd or coop")
    if not isinstance(workers, numbers.Integral) or isinstance(workers, bool) or workers < 1:
        raise DataError(f"{spell('workers', workers)} is invalid: must be an integer >= 1 (the number of ranks p)")
    hi = (workers - 1) / workers
    if mode == "risgd" and not (_is_number(mu) and -_EPS <= mu <= hi + _EPS):
        raise DataError(
            f"{spell('mu', mu)} is out of range: must be in [0, {hi:g}] = [0, (p-1)/p] for {spell('workers', workers)}"
        )
    if not (_is_number(hetero_std) and math.isfinite(hetero_std) and hetero_std >= 0):
        raise DataError(f"{spell('hetero_std', hetero_std)} is invalid: must be a finite number >= 0")
    parse_scheme(partition, spelled=spell("partition", repr(partition)))


def steps_per_epoch(manifest: dict, base_batch: int) -> int:
    """Optimizer steps in one epoch, the same for every rank: max(1, epoch_samples // base_batch).

    `epoch_samples` is |D_j| for risgd (one pass over a rank's own chunk) and N // p for coop, so
    an epoch means one pass over the data whatever mu; the loader and the trainer both use this.
    Raises DataError if base_batch < 1.
    """
    if isinstance(base_batch, bool) or not isinstance(base_batch, numbers.Integral) or base_batch < 1:
        raise DataError(f"base_batch {base_batch} is invalid: must be an integer >= 1")
    return max(1, int(manifest["epoch_samples"]) // int(base_batch))


def build_manifest(index: dict, workers: int, mu: float, partition: str = "iid", seed: int = 0,
                   hetero_std: float = 0.0, mode: str = "risgd") -> dict:
    """Build the manifest dict (see module doc; schema in docs/data.md)."""
    validate_manifest_params(workers, mu, partition, hetero_std, mode)
    arrays = split_arrays(index, "train")
    n, p = arrays.samples, workers
    if p > n:
        raise DataError(f"--workers {p} is invalid: must be between 1 and the {n} training samples")
    train_shards = index["splits"]["train"]["shards"]
    total_bytes = sum(s["bytes"] for s in train_shards)
    if mode == "coop":
        chunks = [{"id": 0, "samples": n, "runs": [[0, n]]}]
        mus = np.full(p, (p - 1) / p)
        plan = [[(0, 1.0)] for _ in range(p)]
        epoch_samples = n // p  # one pass over the data shared by all ranks
        mu = (p - 1) / p
    else:
        chunks = make_partition(arrays.labels, p, partition, seed, index["num_classes"])
        mus = _rank_mus(p, mu, hetero_std, seed)
        plan = [_cyclic(j, p, float(mus[j])) for j in range(p)]
        epoch_samples = min(c["samples"] for c in chunks)  # |D_j|: one pass over the own chunk
    chunk_ids = resolve_chunks(chunks, arrays.labels)
    for c, ids in zip(chunks, chunk_ids):
        c["shards"] = _shards_of(ids, arrays.starts, arrays.names)
    coverage = np.zeros(n, dtype=np.int64)
    ranks = []
    for j in range(p):
        entries, held = [], []
        for c, frac in plan[j]:
            ids = chunk_ids[c]
            entry = {"chunk": c, "fraction": round(frac, 9), "samples": len(ids)}
            if frac < 1.0:
                count = int(round(frac * len(ids)))
                ids = subset_ids(ids, seed, j, c, count)
                entry["samples"] = count
                entry["subset"] = {"count": count, "seed": [seed, j, c], "sha256": ids_digest(ids)}
            entries.append(entry)
            held.append(ids)
        held_ids = np.unique(np.concatenate(held))
        coverage[held_ids] += 1
        shards = _shards_of(held_ids, arrays.starts, arrays.names)
        shard_bytes = sum(s["bytes"] for s in train_shards if s["name"] in set(shards))
        ranks.append({
            "rank": j,
            "mu": round(float(mus[j]), 9),
            "gamma": round(1.0 / p + float(mus[j]), 9),
            "samples": int(len(held_ids)),
            "gamma_actual": round(len(held_ids) / n, 9),
            "chunks": entries,
            "shards": shards,
            "shard_bytes": int(shard_bytes),
            "storage_fraction": round(shard_bytes / total_bytes, 9),
        })
    return {
        "version": MANIFEST_VERSION,
        "kind": "risgd-redundancy-manifest",
        "index": _index_identity(index),
        "workers": p,
        "mu": round(float(mu), 9),
        "mode": mode,
        "partition": partition if mode == "risgd" else "all",
        "seed": seed,
        "hetero_std": hetero_std,
        "epoch_samples": int(epoch_samples),
        "steps_per_epoch_rule": "epoch_samples // base_batch (same for every rank)",
        "summary": _summary(ranks, coverage, p),
        "chunks": chunks,
        "ranks": ranks,
    }


def _index_identity(index: dict) -> dict:
    return {
        "dataset": index["dataset"],
        "num_classes": index["num_classes"],
        "train_samples": index["splits"]["train"]["samples"],
        "val_samples": index["splits"].get("val", {}).get("samples", 0),
        "shards": {
            split: [{"name": s["name"], "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"]}
                    for s in info["shards"]]
            for split, info in index["splits"].items()
        },
    }


def _summary(ranks: list[dict], coverage: np.ndarray, p: int) -> dict:
    hist = Counter(coverage.tolist())
    return {
        "sum_gamma": round(sum(r["gamma"] for r in ranks), 9),
        "sum_gamma_actual": round(sum(r["samples"] for r in ranks) / len(coverage), 9),
        "replication_histogram": {int(k): int(v) for k, v in sorted(hist.items())},
        "storage_total_over_full_copy": round(sum(r["storage_fraction"] for r in ranks), 9),
        "storage_max_rank_over_full_copy": round(max(r["storage_fraction"] for r in ranks), 9),
    }


# ---------------------------------------------------------------- io

_MANIFEST_HEADER = (
    "# RI-SGD redundancy manifest (python -m data.manifest). Global sample id = position\n"
    "# in train shard order; runs are [start, end) id ranges; segments are\n"
    "# [label, from, to): ids from..to-1 among the ascending ids with that label.\n"
)


def write_manifest(manifest: dict, path: str) -> None:
    """Write YAML atomically (risgd_common.atomic: temporary name, synced to disk, renamed)."""
    body = yaml.safe_dump(manifest, sort_keys=False, default_flow_style=None, width=110)
    write_text_atomic(path, _MANIFEST_HEADER + body)


def load_manifest(path: str) -> dict:
    try:
        with open(path) as f:
            manifest = yaml.safe_load(f)
    except FileNotFoundError:
        raise DataError(
            f"manifest {path} missing: run {command('data.manifest')} build ... --out {path}"
        ) from None
    except yaml.YAMLError as e:
        raise DataError(f"manifest {path} is not valid YAML ({e}): rebuild it") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise DataError(f"manifest {path} is not a version-{MANIFEST_VERSION} risgd manifest: rebuild it")
    try:
        for split in manifest["index"]["shards"].values():
            for s in split:
                safe_name(s["name"])
        for r in manifest["ranks"]:
            for name in r["shards"]:
                safe_name(name)
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"manifest {path} is malformed ({type(e).__name__}: {e}): rebuild it") from None
    return manifest


# ---------------------------------------------------------------- check

def check_manifest(manifest: dict, index: dict, shard_dir: str | None = None, stamp: bool = False) -> list[str]:
    """Validate a manifest against an index; return the problems found (empty list: fine).

    With `shard_dir`, also check that every shard of every split in the index (train and val: every
    shard a run reads) is there with the index's sha256, hashing each in full (never trusting a
    verification stamp). Shards that verify refresh their stamps where `shard_dir` has a stamp file;
    `stamp=True` creates one (data/stamps.py).
    """
    try:
        return _check(manifest, index, shard_dir, stamp)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        return [f"malformed manifest: {type(e).__name__}: {e}"]


def _check(m: dict, index: dict, shard_dir: str | None, stamp: bool = False) -> list[str]:
    problems: list[str] = []
    if m.get("version") != MANIFEST_VERSION:
        problems.append(f"version {m.get('version')!r} != {MANIFEST_VERSION}")
    ident = _index_identity(index)
    for key in ("dataset", "train_samples"):
        if m["index"][key] != ident[key]:
            problems.append(f"index {key} {m['index'][key]!r} != {ident[key]!r}")
    for split, shards in ident["shards"].items():
        mine = {s["name"]: s["sha256"] for s in m["index"]["shards"].get(split, [])}
        for s in shards:
            if s["name"] not in mine:
                problems.append(f"shard {s['name']} of the index is not in the manifest")
            elif mine[s["name"]] != s["sha256"]:
                problems.append(f"shard {s['name']}: manifest sha256 {mine[s['name']][:12]} != index "
                                f"{s['sha256'][:12]} (manifest built from another index)")
        for name in set(mine) - {s["name"] for s in shards}:
            problems.append(f"shard {name} in the manifest is not in the index")
    if problems:
        return problems  # sample-level checks are meaningless against another index

    arrays = split_arrays(index, "train")
    n, p = arrays.samples, m["workers"]
    if len(m["ranks"]) != p:
        problems.append(f"{len(m['ranks'])} ranks listed for workers={p}")
    chunk_ids = resolve_chunks(m["chunks"], arrays.labels)
    for c, ids in zip(m["chunks"], chunk_ids):
        if len(ids) != c["samples"]:
            problems.append(f"chunk {c['id']}: resolves to {len(ids)} samples, says {c['samples']}")
    if m["mode"] == "risgd":
        allc = np.concatenate(chunk_ids)
        if len(m["chunks"]) != p or len(allc) != n or len(np.unique(allc)) != n:
            problems.append("chunks are not a partition of the training set into p disjoint chunks")
        sizes = [len(i) for i in chunk_ids]
        if max(sizes) - min(sizes) > index.get("shard_size", 1):
            problems.append(f"chunk sizes {min(sizes)}..{max(sizes)} differ by more than one shard")
    coverage = np.zeros(n, dtype=np.int64)
    hi = (p - 1) / p
    for j, r in enumerate(m["ranks"]):
        tag = f"rank {j}"
        if r["rank"] != j:
            problems.append(f"{tag}: listed as rank {r['rank']}")
        if not -_EPS <= r["mu"] <= hi + _EPS:
            problems.append(f"{tag}: mu_j {r['mu']} outside [0, {hi:g}]")
        if abs(r["gamma"] - (1 / p + r["mu"])) > 1e-6:
            problems.append(f"{tag}: gamma {r['gamma']} != 1/p + mu_j = {1 / p + r['mu']:.9f}")
        if m["mode"] == "risgd":
            want = _cyclic(j, p, r["mu"])
            got = [(c["chunk"], c["fraction"]) for c in r["chunks"]]
            if [c for c, _ in got] != [c for c, _ in want] or any(
                    abs(a - b) > 1e-6 for (_, a), (_, b) in zip(got, want)):
                problems.append(f"{tag}: chunks {got} are not the cyclic structure {want} for mu_j={r['mu']}")
        held = []
        for c in r["chunks"]:
            ids = chunk_ids[c["chunk"]]
            if "subset" in c:
                sub = c["subset"]
                if abs(sub["count"] - c["fraction"] * len(ids)) > 0.5 + _EPS:
                    problems.append(f"{tag}: subset of chunk {c['chunk']} has {sub['count']} samples, "
                                    f"expected {c['fraction']} x {len(ids)} within one sample")
                ids = subset_ids(ids, m["seed"], j, c["chunk"], sub["count"])
                if ids_digest(ids) != sub["sha256"]:
                    problems.append(
                        f"{tag}: subset of chunk {c['chunk']} does not reproduce (sha256 differs)"
                    )
            elif c["fraction"] != 1.0:
                problems.append(f"{tag}: partial chunk {c['chunk']} has no seeded subset")
            held.append(ids)
        held_ids = np.unique(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
        coverage[held_ids] += 1
        if len(held_ids) != r["samples"]:
            problems.append(f"{tag}: holds {len(held_ids)} samples, manifest says {r['samples']}")
        # Chunks differ from N/p by at most one sample and the subset by half a sample.
        tol = (len(r["chunks"]) + 1) / n
        if abs(len(held_ids) / n - r["gamma"]) > tol + 1e-9:
            problems.append(f"{tag}: holds {len(held_ids) / n:.6f} of the data, gamma_j is {r['gamma']:.6f}")
        need = _shards_of(held_ids, arrays.starts, arrays.names)
        if sorted(need) != sorted(r["shards"]):
            problems.append(f"{tag}: shard list {r['shards']} != shards holding its samples {need}")
    if (coverage == 0).any():
        problems.append(f"{int((coverage == 0).sum())} training samples are held by no rank")
    hist = {int(k): int(v) for k, v in sorted(Counter(coverage.tolist()).items())}
    if hist != {int(k): int(v) for k, v in m["summary"]["replication_histogram"].items()}:
        problems.append(f"replication histogram {m['summary']['replication_histogram']} != actual {hist}")
    if shard_dir is not None:  # every shard a run reads: all splits (train and val), hashed in full
        stamps = Stamps(shard_dir, create=stamp)
        try:
            for split, info in index["splits"].items():
                for s in info["shards"]:
                    try:
                        verify_shards(index, shard_dir, [s["name"]], split=split, full=True, stamps=stamps)
                    except DataError as e:
                        problems.append(str(e))
        finally:
            stamps.save()
    return problems


# ---------------------------------------------------------------- CLI

def _print_summary(m: dict) -> None:
    print(f"{m['index']['dataset']}: p={m['workers']} mu={m['mu']} mode={m['mode']} "
          f"partition={m['partition']} seed={m['seed']} hetero_std={m['hetero_std']}")
    for r in m["ranks"]:
        chunks = " ".join(f"D{c['chunk']}" + ("" if c["fraction"] == 1 else f"[{c['fraction']:.3f}]")
                          for c in r["chunks"])
        print(f"  rank {r['rank']}: mu_j={r['mu']:.4f} gamma_j={r['gamma']:.4f} "
              f"(holds {r['gamma_actual']:.4f}) chunks {chunks}; {len(r['shards'])} shards, "
              f"{r['storage_fraction']:.3f} of one full copy")
    s = m["summary"]
    print(f"  replication histogram (ranks holding a sample: samples) {s['replication_histogram']}")
    print(f"  sum gamma_j = {s['sum_gamma']:.4f} (= 1 + p*mu for equal mu); shard storage over all ranks "
          f"= {s['storage_total_over_full_copy']:.3f} full copies (shard granularity)")


def main(argv: list[str] | None = None) -> int:
    ap = Parser(prog=command("data.manifest"), description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write a manifest for an index",
                       description="Write the per-rank redundancy manifest (YAML) for a shard index. "
                       "Exit status: 0 written; 2 bad input, one 'error:' line naming the argument or file "
                       "and the fix (--mu/--workers/--partition/--hetero-std out of range, missing or "
                       "malformed index); 1 the work itself failed (e.g. an OS error writing --out).")
    b.add_argument("--index", required=True, help="path to index.json (or its directory)")
    b.add_argument("--workers", type=int, required=True, help="number of ranks p")
    b.add_argument("--mu", type=float, default=0.0, help="redundancy mu = (q-1)/p in [0, (p-1)/p]")
    b.add_argument("--partition", default="iid", help="iid | label_sorted | dirichlet:ALPHA (default iid)")
    b.add_argument("--seed", type=int, default=0, help="seed for partition, subsets and hetero mu_j")
    b.add_argument("--hetero-std", type=float, default=0.0,
                   help="draw mu_j ~ N(mu, std) clipped to [0, (p-1)/p] (heterogeneous redundancy)")
    b.add_argument("--mode", choices=MODES, default="risgd",
                   help="risgd (cyclic chunks) or coop (every rank samples the whole set)")
    b.add_argument("--out", required=True, help="output manifest path (.yaml)")
    c = sub.add_parser("check", help="validate a manifest against an index (exit 2 on any problem)",
                       description="Validate coverage, gamma_j, cyclic structure, subsets, replication "
                       "histogram and the checksums of every shard of every split (train and val). "
                       "Exit status: 0 OK; 2 when problems are found (one 'problem:' line each, then a "
                       "count): they are a verdict on the input you gave, like any bad input (missing or "
                       "malformed manifest/index: one 'error:' line); 1 only if the check itself failed "
                       "(e.g. an OS error).")
    c.add_argument("manifest", help="manifest YAML")
    c.add_argument("--index", required=True, help="path to index.json (or its directory)")
    c.add_argument("--shard-dir", default=None,
                   help="also check that every shard of the index (train and val: every shard a run "
                   "reads) is present there with a matching sha256 "
                   "(default: the index's directory when it holds shards); every shard is hashed in full")
    c.add_argument("--stamp", action="store_true",
                   help="record the shards that verify in the shard directory's .risgd-verified.json (created "
                   "if missing), so that training starts there skip hashing them; without it, an existing "
                   "stamp file is refreshed and none is created")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":  # the parameters first: they need no index
            validate_manifest_params(args.workers, args.mu, args.partition, args.hetero_std, args.mode)
        index = load_index(args.index)
        if args.cmd == "build":
            m = build_manifest(index, args.workers, args.mu, args.partition, args.seed,
                               args.hetero_std, args.mode)
            write_manifest(m, args.out)
            _print_summary(m)
            print(f"wrote {args.out}")
            return EXIT_OK
        m = load_manifest(args.manifest)
        shard_dir = args.shard_dir
        if shard_dir is None:
            idx_dir = args.index if os.path.isdir(args.index) else os.path.dirname(args.index) or "."
            train = index["splits"]["train"]["shards"]
            shard_dir = idx_dir if train and os.path.exists(os.path.join(idx_dir, train[0]["name"])) else None
        problems = check_manifest(m, index, shard_dir, stamp=args.stamp)
    except (DataError, OSError) as e:
        return cli_error(e)
    for prob in problems:
        print(f"problem: {prob}")
    if problems:
        print(f"{args.manifest}: {len(problems)} problem(s)")
        return EXIT_BAD_INPUT
    _print_summary(m)
    print(f"{args.manifest}: OK" + ("" if shard_dir else " (shards not checked: pass --shard-dir)"))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
