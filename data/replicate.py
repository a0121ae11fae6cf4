"""Copy exactly the shards one node's ranks need, sha256-verified, atomic and idempotent.

    python -m data.replicate --manifest M.yaml --source SRC --dest NODE_DIR --node-rank K --ranks-per-node N

Run it once per node before training, e.g. with pdsh or as a Slurm step:

    pdsh -w node[0-3] 'cd risgd && python -m data.replicate --manifest M.yaml --source s3://bucket/shards \\
        --dest /local/shards --node-rank $(( ${HOSTNAME#node} )) --ranks-per-node 8'
    srun --ntasks-per-node=1 bash -c \
        'python -m data.replicate ... --node-rank $SLURM_NODEID --ranks-per-node 8'

Node K serves global ranks K*N .. K*N+N-1. SRC is a local directory, any fsspec URL
(file://, s3://, gs://, memory://...) or `pipe:CMD` where CMD writes the file named {name} to
stdout (webdataset's convention, e.g. `pipe:curl -s https://host/shards/{name}`). Each file goes to
a hidden temporary name in NODE_DIR (risgd_common.atomic) and is renamed into place only after its
sha256 matches the manifest; files already present with the right size and sha256 are not copied
again. index.json and the manifest are copied too, so NODE_DIR is a complete shard directory for
the loader.

NODE_DIR/.risgd-replica.json records which manifest workers the node serves (with the sha256 of
the manifest it was replicated for): an elastic run (recipe key ``elastic.workers``) reads it at
start to know, whatever rank number the launcher gives it, which worker's chunks, loader position
and optimizer state it carries (:func:`read_replica`).

Every shard copied or found correct is recorded in NODE_DIR/.risgd-verified.json (its sha256 with
the file's size, mtime, ctime, inode and device), so the ranks that start on this node skip hashing
shards that have not changed since; a shard already present is trusted the same way on a second
run. --rehash hashes every shard already present instead (and refreshes the stamps).

Exit status: 0 done; 2 bad input, with one `error:` line naming the file or argument and the fix
(missing or malformed manifest / index.json, a shard missing at the source or whose sha256 differs
from the manifest's, a failing pipe: command, a --node-rank that serves no rank); 1 the copy itself
failed (e.g. an OS error writing NODE_DIR).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from contextlib import contextmanager
from typing import BinaryIO

from risgd_common.atomic import atomic_write, write_bytes_atomic
from risgd_common.cli import Parser
from risgd_common.install import command

from .errors import EXIT_OK, DataError, cli_error, safe_name
from .manifest import load_manifest
from .stamps import Stamps

_BLOCK = 1 << 20
REPLICA_RECORD = ".risgd-replica.json"


def _what(name: str) -> str:
    return name if name == "index.json" else f"shard {name}"


@contextmanager
def open_source(source: str, name: str):
    """Binary stream of file `name` from a local dir, an fsspec URL or a `pipe:` command."""
    safe_name(name)
    if source.startswith("pipe:"):
        cmd = source[len("pipe:"):].replace("{name}", shlex.quote(name))
        proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            yield proc.stdout
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip().splitlines()
            proc.stderr.close()
            if proc.wait() != 0:
                why = err[-1] if err else f"exit {proc.returncode}"
                raise DataError(f"{name}: command {cmd!r} failed ({why}): fix the pipe: source")
    elif "://" in source:
        import fsspec

        url = f"{source.rstrip('/')}/{name}"
        try:
            f = fsspec.open(url, "rb").open()
        except FileNotFoundError:
            raise DataError(f"{_what(name)} not found at {url}: check --source") from None
        with f:
            yield f
    else:
        path = os.path.join(source, name)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise DataError(
                f"{_what(name)} not found under {source}: check --source or run make_shards"
            ) from None
        with f:
            yield f


def _copy_verified(src: BinaryIO, stamps: Stamps, name: str, sha256: str, origin: str) -> int:
    """Stream `src` to name under the stamps' directory through risgd_common.atomic; rename only if
    the sha256 matches, then stamp the copy.

    On a mismatch the writer raises before the rename, so neither the file nor a temporary is left.
    """
    h = hashlib.sha256()
    n = 0
    written = None

    def writer(out: BinaryIO) -> None:
        nonlocal n, written
        while block := src.read(_BLOCK):
            h.update(block)
            out.write(block)
            n += len(block)
        if h.hexdigest() != sha256:
            raise DataError(
                f"shard {name} from {origin} has sha256 {h.hexdigest()[:12]}... but the manifest expects "
                f"{sha256[:12]}...: the source is corrupt or from another make_shards run"
            )
        out.flush()
        written = os.fstat(out.fileno())

    atomic_write(os.path.join(stamps.shard_dir, name), writer)
    stamps.add_copy(name, sha256, written)
    return n


def _present(stamps: Stamps, name: str, size: int, sha256: str, rehash: bool) -> bool:
    """The shard is there with the manifest's sha256 (its stamp vouches for it unless `rehash`)."""
    path = os.path.join(stamps.shard_dir, name)
    if not os.path.isfile(path) or os.path.getsize(path) != size:
        return False
    try:
        return stamps.digest(name, sha256, full=rehash) == sha256
    except FileNotFoundError:
        return False


def _write_if_changed(path: str, data: bytes) -> int:
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if f.read() == data:
                return 0
    write_bytes_atomic(path, data)
    return len(data)


def node_ranks(manifest: dict, node_rank: int, ranks_per_node: int) -> list[int]:
    p = manifest["workers"]
    if ranks_per_node < 1 or not 0 <= node_rank * ranks_per_node < p:
        raise DataError(f"--node-rank {node_rank} with --ranks-per-node {ranks_per_node} serves no rank of "
                        f"the {p} workers: use node ranks 0..{(p - 1) // max(ranks_per_node, 1)}")
    return list(range(node_rank * ranks_per_node, min(p, (node_rank + 1) * ranks_per_node)))


def replicate(manifest_path: str, source: str, dest: str, node_rank: int, ranks_per_node: int,
              with_val: bool = True, log=print, rehash: bool = False) -> dict:
    """Copy the node's shards and stamp them; return a report dict (bytes copied, storage factors).

    Shards already in `dest` are trusted by their verification stamp, or hashed in full with `rehash`.
    """
    manifest = load_manifest(manifest_path)
    ranks = node_ranks(manifest, node_rank, ranks_per_node)
    os.makedirs(dest, exist_ok=True)
    with open_source(source, "index.json") as f:
        index_bytes = f.read()
    try:
        index_train = [(s["name"], s["sha256"]) for s in json.loads(index_bytes)["splits"]["train"]["shards"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"index.json at {source} is malformed ({type(e).__name__}: {e}): "
                        f"re-run {command('data.make_shards')} there") from None
    train = {s["name"]: s for s in manifest["index"]["shards"]["train"]}
    for name, sha256 in index_train:
        if name not in train or train[name]["sha256"] != sha256:
            raise DataError(f"index.json at {source} does not match the manifest (shard {name}): "
                            "rebuild the manifest for this index")
    needed = sorted({n for r in ranks for n in manifest["ranks"][r]["shards"]})
    files = [train[n] for n in needed]
    if with_val:
        files += manifest["index"]["shards"].get("val", [])
    copied = skipped = copied_bytes = 0
    stamps = Stamps(dest, create=True)
    try:
        for s in files:
            name = safe_name(s["name"])
            if _present(stamps, name, s["bytes"], s["sha256"], rehash):
                skipped += 1
                continue
            with open_source(source, name) as f:
                copied_bytes += _copy_verified(f, stamps, name, s["sha256"], source)
            copied += 1
            log(f"copied {name} ({s['bytes']} bytes)")
    finally:  # what was verified stays stamped, also when a later shard fails
        stamps.save()
    with open(manifest_path, "rb") as f:
        manifest_bytes = f.read()
    copied_bytes += _write_if_changed(os.path.join(dest, "index.json"), index_bytes)
    copied_bytes += _write_if_changed(os.path.join(dest, os.path.basename(manifest_path)), manifest_bytes)
    record = {"format": 1, "workers": ranks, "node_rank": node_rank, "ranks_per_node": ranks_per_node,
              "manifest": os.path.basename(manifest_path),
              "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest()}
    _write_if_changed(os.path.join(dest, REPLICA_RECORD), (json.dumps(record, indent=1) + "\n").encode())
    full = sum(s["bytes"] for s in train.values())
    node_bytes = sum(os.path.getsize(os.path.join(dest, n)) for n in needed)
    return {
        "node_rank": node_rank,
        "ranks": ranks,
        "files_copied": copied,
        "files_present": skipped,
        "present_by_stamp": stamps.by_stamp + stamps.by_cache,  # of those present: not hashed (stamp)
        "bytes_copied": copied_bytes,
        "node_train_bytes": node_bytes,
        "full_copy_bytes": full,
        "node_storage_over_full_copy": node_bytes / full,
        # What the manifest predicts: the same quantity at shard granularity, and sample-level gamma.
        "manifest_node_storage_over_full_copy": sum(train[n]["bytes"] for n in needed) / full,
        "manifest_node_gamma_sum": sum(manifest["ranks"][r]["gamma"] for r in ranks),
        "manifest_sum_gamma_all_ranks": manifest["summary"]["sum_gamma"],
        "mu": manifest["mu"],
        "workers": manifest["workers"],
    }


def read_replica(replica_dir: str) -> dict:
    """The record :func:`replicate` wrote in ``replica_dir``: ``workers`` (the manifest workers the
    node serves), ``manifest`` (the manifest file's name there) and ``manifest_sha256``. DataError
    (one line) when there is none or it is malformed."""
    path = os.path.join(replica_dir, REPLICA_RECORD)
    try:
        with open(path) as f:
            record = json.load(f)
        workers = record["workers"]
        if not (isinstance(workers, list) and workers and all(isinstance(w, int) and w >= 0 for w in workers)):
            raise ValueError("'workers' must be a non-empty list of worker ids")
    except FileNotFoundError:
        raise DataError(f"{replica_dir} holds no replica record ({REPLICA_RECORD}): copy this node's shards with "
                        f"python -m data.replicate --dest {replica_dir} ... (it records which workers the node "
                        "serves)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is malformed ({e}): re-run python -m data.replicate --dest {replica_dir} "
                        "...") from None
    return record


def format_report(rep: dict) -> str:
    return (
        f"node {rep['node_rank']} (ranks {rep['ranks'][0]}..{rep['ranks'][-1]}): "
        f"copied {rep['files_copied']} files, {rep['bytes_copied']} bytes; "
        f"{rep['files_present']} already present ({rep['present_by_stamp']} by stamp, "
        f"{rep['files_present'] - rep['present_by_stamp']} hashed)\n"
        f"node storage / one full copy of train = {rep['node_storage_over_full_copy']:.4f} "
        f"(manifest predicts {rep['manifest_node_storage_over_full_copy']:.4f} at shard granularity; "
        f"sample-level sum of gamma_j over the node's ranks = {rep['manifest_node_gamma_sum']:.4f})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = Parser(
        prog=command("data.replicate"), description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--manifest", required=True, help=f"manifest YAML from {command('data.manifest')} build")
    ap.add_argument("--source", required=True, help="local dir, fsspec URL, or pipe:CMD with {name}")
    ap.add_argument("--dest", required=True, help="node-local shard directory")
    ap.add_argument("--node-rank", type=int, required=True, help="this node's index K (0-based)")
    ap.add_argument("--ranks-per-node", type=int, required=True, help="ranks (GPUs) per node N")
    ap.add_argument("--no-val", action="store_true", help="do not copy the validation shards")
    ap.add_argument("--rehash", action="store_true",
                    help="hash every shard already in --dest in full instead of trusting its verification "
                    "stamp (.risgd-verified.json); refreshes the stamps")
    args = ap.parse_args(argv)
    try:
        rep = replicate(args.manifest, args.source, args.dest, args.node_rank, args.ranks_per_node,
                        with_val=not args.no_val, rehash=args.rehash)
    except (DataError, OSError) as e:
        return cli_error(e)
    print(format_report(rep))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
