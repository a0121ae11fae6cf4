"""Replication: exactly the node's shards, sha256-verified, atomic, idempotent; local/fsspec/pipe sources."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

import fsspec
import pytest

from risgd_data.errors import DataError
from risgd_data.index import load_index
from risgd_data.loader import make_train_loader
from risgd_data.manifest import build_manifest, write_manifest
from risgd_data.replicate import REPLICA_RECORD, read_replica, replicate
from risgd_data.stamps import STAMP_NAME, read_stamps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def manifest_path(digits_dir, tmp_path):
    m = build_manifest(load_index(digits_dir), 4, 0.25)
    path = str(tmp_path / "m.yaml")
    write_manifest(m, path)
    return path, m


def _quiet(*_):
    pass


def test_local_copy_exact_and_idempotent(digits_dir, manifest_path, tmp_path):
    path, m = manifest_path
    dest = tmp_path / "node0"
    rep = replicate(path, digits_dir, str(dest), node_rank=0, ranks_per_node=1, log=_quiet)
    want = set(m["ranks"][0]["shards"]) | {s["name"] for s in m["index"]["shards"]["val"]}
    assert {n for n in os.listdir(dest) if n.endswith(".tar")} == want
    assert {"index.json", "m.yaml"} <= set(os.listdir(dest))
    # No temporary left; the hidden files are the verification stamp of every shard copied and the
    # record of the workers this node serves (what an elastic run reads to know who it is).
    assert sorted(n for n in os.listdir(dest) if n.startswith(".")) == sorted([STAMP_NAME, REPLICA_RECORD])
    record = read_replica(str(dest))
    assert record["workers"] == [0] and record["manifest"] == "m.yaml"
    with open(path, "rb") as f:
        assert record["manifest_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert set(read_stamps(str(dest))) == want
    assert rep["node_storage_over_full_copy"] == pytest.approx(rep["manifest_node_storage_over_full_copy"])
    assert rep["node_storage_over_full_copy"] == pytest.approx(m["ranks"][0]["storage_fraction"])
    mtimes = {n: os.stat(dest / n).st_mtime_ns for n in os.listdir(dest)}
    again = replicate(path, digits_dir, str(dest), node_rank=0, ranks_per_node=1, log=_quiet)
    assert again["bytes_copied"] == 0 and again["files_copied"] == 0
    assert again["present_by_stamp"] == again["files_present"] == len(want)  # trusted, not re-hashed
    assert mtimes == {n: os.stat(dest / n).st_mtime_ns for n in os.listdir(dest)}
    # The node directory is a complete shard dir for that rank's loader (sha256 verified).
    make_train_loader(path, str(dest), 0, base_batch=8, num_workers=0).batch_at(0)


def test_storage_over_all_nodes(digits_dir, manifest_path, tmp_path):
    path, m = manifest_path
    reps = [replicate(path, digits_dir, str(tmp_path / f"n{k}"), k, 1, with_val=False, log=_quiet)
            for k in range(4)]
    total = sum(r["node_storage_over_full_copy"] for r in reps)
    assert total == pytest.approx(m["summary"]["storage_total_over_full_copy"])
    assert sum(r["manifest_node_gamma_sum"] for r in reps) == pytest.approx(1 + 4 * 0.25)
    two = replicate(path, digits_dir, str(tmp_path / "pair"), 1, 2, with_val=False, log=_quiet)
    assert two["ranks"] == [2, 3]
    assert read_replica(str(tmp_path / "pair"))["workers"] == [2, 3]  # a node of two ranks serves two workers
    assert set(os.listdir(tmp_path / "pair")) - {"index.json", "m.yaml", STAMP_NAME, REPLICA_RECORD} == (
        set(m["ranks"][2]["shards"]) | set(m["ranks"][3]["shards"]))
    with pytest.raises(DataError, match="--node-rank 2"):
        replicate(path, digits_dir, str(tmp_path / "x"), 2, 2, log=_quiet)


def test_fsspec_and_pipe_sources(digits_dir, manifest_path, tmp_path):
    path, m = manifest_path
    fs = fsspec.filesystem("memory")
    for name in os.listdir(digits_dir):
        fs.pipe(f"/shards/{name}", open(os.path.join(digits_dir, name), "rb").read())
    a = replicate(path, "memory://shards", str(tmp_path / "mem"), 1, 1, log=_quiet)
    b = replicate(path, f"pipe:cat {digits_dir}/{{name}}", str(tmp_path / "pipe"), 1, 1, log=_quiet)
    c = replicate(path, f"file://{digits_dir}", str(tmp_path / "file"), 1, 1, log=_quiet)
    assert a["bytes_copied"] == b["bytes_copied"] == c["bytes_copied"] > 0
    assert sorted(os.listdir(tmp_path / "mem")) == sorted(os.listdir(tmp_path / "pipe"))
    with pytest.raises(DataError, match="failed"):
        replicate(path, "pipe:false {name}", str(tmp_path / "bad"), 1, 1, log=_quiet)


def test_checksum_failure_leaves_nothing(digits_dir, manifest_path, tmp_path):
    path, m = manifest_path
    src = tmp_path / "src"
    shutil.copytree(digits_dir, src)
    victim = m["ranks"][0]["shards"][1]
    with open(src / victim, "r+b") as f:
        f.seek(1000)
        f.write(b"!")
    dest = tmp_path / "node"
    with pytest.raises(DataError, match=f"shard {victim} .*sha256"):
        replicate(path, str(src), str(dest), 0, 1, log=_quiet)
    assert victim not in os.listdir(dest)
    assert [n for n in os.listdir(dest) if n.startswith(".")] == [STAMP_NAME]  # no temporary
    assert victim not in read_stamps(str(dest)) and m["ranks"][0]["shards"][0] in read_stamps(str(dest))
    os.remove(src / victim)
    with pytest.raises(DataError, match=f"shard {victim} not found"):
        replicate(path, str(src), str(dest), 0, 1, log=_quiet)


def test_cli(digits_dir, manifest_path, tmp_path):
    path, _ = manifest_path
    run = lambda *a: subprocess.run([sys.executable, "-m", "data.replicate", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    r = run("--help")
    assert r.returncode == 0 and "pdsh" in r.stdout and "Slurm" in r.stdout
    args = ["--manifest", path, "--dest", str(tmp_path / "n"), "--node-rank", "0", "--ranks-per-node", "1"]
    r = run(*args, "--source", digits_dir)
    assert r.returncode == 0 and "node storage / one full copy" in r.stdout, r.stderr
    r = run(*args, "--source", digits_dir)
    assert "copied 0 files, 0 bytes" in r.stdout and " by stamp, 0 hashed)" in r.stdout, r.stdout
    r = run(*args, "--source", digits_dir, "--rehash")  # every shard present hashed in full
    assert r.returncode == 0 and "copied 0 files, 0 bytes" in r.stdout and "(0 by stamp, " in r.stdout, r.stdout
    assert "--rehash" in run("--help").stdout
    r = run(*args, "--source", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "index.json" in r.stderr


def test_cli_exit_codes(digits_dir, manifest_path, tmp_path):
    path, m = manifest_path
    run = lambda *a: subprocess.run([sys.executable, "-m", "data.replicate", *a], cwd=REPO,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    node = ["--manifest", path, "--node-rank", "0", "--ranks-per-node", "1"]
    # A source shard whose sha256 differs from the manifest's: bad input, exit 2, one line naming it,
    # and neither the shard nor a temporary file is left in the destination.
    src = tmp_path / "src"
    shutil.copytree(digits_dir, src)
    victim = m["ranks"][0]["shards"][0]
    with open(src / victim, "r+b") as f:
        f.seek(600)
        f.write(b"#")
    dest = tmp_path / "node"
    r = run(*node, "--source", str(src), "--dest", str(dest))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and victim in r.stderr and "sha256" in r.stderr
    assert victim not in os.listdir(dest) and not [n for n in os.listdir(dest)
                                                    if n.startswith(".") and n != STAMP_NAME]
    # A malformed index.json at the source (used to be a JSON traceback): exit 2, one line.
    (src / "index.json").write_text("{not json")
    r = run(*node, "--source", str(src), "--dest", str(dest))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "index.json" in r.stderr, r.stderr
    # An out-of-range argument: exit 2.
    r = run("--manifest", path, "--node-rank", "9", "--ranks-per-node", "1", "--source", digits_dir,
            "--dest", str(dest))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--node-rank 9" in r.stderr
    # The copy itself failing (the destination cannot be created): exit 1, one line.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run(*node, "--source", digits_dir, "--dest", str(blocker / "n"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error:"), r.stderr
    assert "Exit status" in run("--help").stdout


def test_a_directory_without_a_replica_record_says_how_to_make_one(tmp_path):
    with pytest.raises(DataError, match="holds no replica record .* python -m data.replicate --dest"):
        read_replica(str(tmp_path))
