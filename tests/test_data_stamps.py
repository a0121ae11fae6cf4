"""Verification stamps: a verified replica starts without hashing; every edit is still refused.

Real files throughout. "Without hashing" is proven by counting the calls of the one sha256 helper
(risgd_common.hashing.sha256_file, as data/stamps.py calls it) in a fresh process, so the in-process
cache is cold as at a real start.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys

import pytest

from risgd_data import stamps as stamps_mod
from risgd_data.errors import DataError
from risgd_data.index import load_index, verify_shards
from risgd_data.manifest import build_manifest, write_manifest
from risgd_data.replicate import REPLICA_RECORD, replicate
from risgd_data.stamps import STAMP_NAME, read_stamps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHA_ERROR = re.compile(r"shard (\S+) under (\S+) has sha256 [0-9a-f]{12}\.\.\. but the index expects "
                       r"[0-9a-f]{12}\.\.\.: \S.*")

# Runs in a fresh process: count the sha256 helper's calls around one verification.
_PROBE = """
import json, sys
import risgd_data.stamps as stamps
from risgd_common.hashing import sha256_file
from risgd_data.errors import DataError
from risgd_data.index import load_index, verify_shards
calls = []
stamps.sha256_file = lambda path: (calls.append(path), sha256_file(path))[1]
d, split, full, names = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4:]
try:
    out = {"report": verify_shards(load_index(d), d, names, split=split, full=full)}
except DataError as e:
    out = {"error": str(e)}
print(json.dumps(dict(out, calls=len(calls))))
"""


def fresh_verify(shard_dir: str, names: list[str], split: str = "train", full: bool = False) -> dict:
    r = subprocess.run([sys.executable, "-c", _PROBE, shard_dir, split, "1" if full else "0", *names],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture()
def cold_cache():
    stamps_mod._VERIFIED.clear()
    yield
    stamps_mod._VERIFIED.clear()


@pytest.fixture()
def replica(digits_dir, tmp_path):
    """A node directory written by replicate for all 4 ranks: every train and val shard, stamped."""
    index = load_index(digits_dir)
    m = build_manifest(index, 4, 0.25, partition="label_sorted")
    path = str(tmp_path / "m.yaml")
    write_manifest(m, path)
    dest = str(tmp_path / "node")
    replicate(path, digits_dir, dest, node_rank=0, ranks_per_node=4, log=lambda *_: None)
    return dest, m, path


def _names(index: dict, split: str = "train") -> list[str]:
    return [s["name"] for s in index["splits"][split]["shards"]]


def test_a_replica_starts_without_hashing_and_full_rehashes(replica):
    dest, m, _ = replica
    index = load_index(dest)
    assert set(read_stamps(dest)) == set(_names(index)) | set(_names(index, "val"))
    mine = m["ranks"][1]["shards"]  # what train.py verifies for rank 1
    out = fresh_verify(dest, mine)
    assert out["calls"] == 0 and out["report"]["by_stamp"] == len(mine) and out["report"]["hashed"] == 0, out
    out = fresh_verify(dest, _names(index, "val"), split="val")
    assert out["calls"] == 0, out
    # On request, every shard is hashed in full (data.verify: full).
    out = fresh_verify(dest, mine, full=True)
    assert out["calls"] == len(mine) == out["report"]["hashed"], out
    assert out["report"]["hashed_bytes"] == sum(os.path.getsize(os.path.join(dest, n)) for n in mine)
    # A stamped directory stays as it was: no write when nothing changed.
    before = os.stat(os.path.join(dest, STAMP_NAME))
    fresh_verify(dest, mine)
    after = os.stat(os.path.join(dest, STAMP_NAME))
    assert (before.st_ino, before.st_mtime_ns) == (after.st_ino, after.st_mtime_ns)


def _flip(path: str, restore_mtime: bool) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    if restore_mtime:  # utime can fake the mtime; the ctime it cannot
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        now = os.stat(path)
        assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def _swap(path: str, other: str) -> None:
    """Rename another file over the shard: same size and mtime, other bytes (the hardest swap)."""
    st = os.stat(path)
    data = bytearray(open(other, "rb").read()[: st.st_size].ljust(st.st_size, b"\0"))
    tmp = path + ".swap"
    with open(tmp, "wb") as f:
        f.write(bytes(data))
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.rename(tmp, path)
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (st.st_size, st.st_mtime_ns)


FAULTS = {
    "truncated": lambda p, o: os.truncate(p, os.path.getsize(p) // 2),
    "byte_flipped": lambda p, o: _flip(p, restore_mtime=False),
    "byte_flipped_mtime_restored": lambda p, o: _flip(p, restore_mtime=True),
    "swapped_by_rename": _swap,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_an_edited_shard_is_refused_with_one_line(replica, fault, cold_cache):
    dest, m, _ = replica
    index = load_index(dest)
    mine = m["ranks"][0]["shards"]
    victim = mine[1]
    # In this process first: the stamp vouches for every shard and fills the in-process cache.
    assert verify_shards(index, dest, mine)["hashed"] == 0
    FAULTS[fault](os.path.join(dest, victim), os.path.join(dest, mine[0]))  # at once: no settling time
    with pytest.raises(DataError) as e:  # the in-process cache does not vouch for it either
        verify_shards(index, dest, mine)
    assert SHA_ERROR.fullmatch(str(e.value)) and f"shard {victim} under {dest} " in str(e.value), str(e.value)
    out = fresh_verify(dest, mine)  # a fresh start: only the changed shard is hashed
    assert "error" in out and SHA_ERROR.fullmatch(out["error"]) and victim in out["error"], out
    assert out["calls"] == 1, out
    # Through the trainer's path too: exit 2 from rank 0 is train.py's business; the loader refuses.
    from risgd_data.loader import make_train_loader

    with pytest.raises(DataError, match=f"shard {victim} under .* has sha256"):
        make_train_loader(m, dest, 0, base_batch=8, num_workers=0)


def test_a_missing_shard_is_named(replica):
    dest, m, _ = replica
    victim = m["ranks"][2]["shards"][0]
    os.remove(os.path.join(dest, victim))
    out = fresh_verify(dest, m["ranks"][2]["shards"])
    assert out["error"].startswith(f"shard {victim} missing under {dest}: ") and "\n" not in out["error"], out


def test_a_corrupt_or_foreign_stamp_file_counts_as_none(replica):
    dest, m, _ = replica
    names = m["ranks"][0]["shards"]
    stamp = os.path.join(dest, STAMP_NAME)
    good = json.load(open(stamp))
    for junk in (b"{not json", b"\xff\xfe", b"[]", b'{"version": 99, "shards": {}}',
                 json.dumps({"version": 1, "shards": {n: {"sha256": 7} for n in names}}).encode()):
        with open(stamp, "wb") as f:
            f.write(junk)
        assert read_stamps(dest) == {}
        out = fresh_verify(dest, names)
        assert "error" not in out and out["calls"] == len(names), (junk, out)
        assert set(names) <= set(read_stamps(dest))  # healed: rewritten with the shards just hashed
        assert fresh_verify(dest, names)["calls"] == 0
    # An entry naming another sha256 than the index's is not trusted: hashed, then refreshed.
    doc = json.load(open(stamp))
    doc["shards"][names[0]]["sha256"] = "0" * 64
    json.dump(doc, open(stamp, "w"))
    assert fresh_verify(dest, names)["calls"] == 1
    assert read_stamps(dest)[names[0]]["sha256"] == good["shards"][names[0]]["sha256"]
    # A stamp file that cannot be read (a directory under its name) is no stamp, and no failure.
    os.remove(stamp)
    os.mkdir(stamp)
    out = fresh_verify(dest, names)
    assert "error" not in out and out["calls"] == len(names), out


def test_only_a_stamped_directory_is_written(digits_dir, tmp_path, cold_cache):
    # A directory without a stamp file (make_shards' output from before it stamped, with the
    # stamps taken away): verified in full as before, and left exactly as it was.
    d = tmp_path / "made"
    shutil.copytree(digits_dir, d)
    os.remove(d / STAMP_NAME)
    assert STAMP_NAME not in os.listdir(d)
    index = load_index(str(d))
    before = sorted(os.listdir(d))
    assert fresh_verify(str(d), _names(index))["calls"] == len(_names(index))
    assert verify_shards(index, str(d), _names(index))["hashed"] == len(_names(index))
    assert sorted(os.listdir(d)) == before
    # `manifest check --stamp` opts the directory in after a full check.
    m = str(tmp_path / "m.yaml")
    write_manifest(build_manifest(index, 2, 0.5), m)
    r = subprocess.run([sys.executable, "-m", "data.manifest", "check", m, "--index", str(d), "--stamp"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    assert set(read_stamps(str(d))) == set(_names(index)) | set(_names(index, "val"))
    assert fresh_verify(str(d), _names(index))["calls"] == 0


_CHECK = """
import sys
import risgd_data.stamps as stamps
from risgd_common.hashing import sha256_file
from risgd_data.manifest import main
calls = []
stamps.sha256_file = lambda path: (calls.append(path), sha256_file(path))[1]
rc = main(sys.argv[1:])
print("calls", len(calls))
sys.exit(rc)
"""


def test_manifest_check_always_hashes_in_full(replica):
    dest, m, path = replica
    index = load_index(dest)
    r = subprocess.run([sys.executable, "-c", _CHECK, "check", path, "--index", dest], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    every = len(_names(index)) + len(_names(index, "val"))
    assert r.returncode == 0 and f"calls {every}" in r.stdout, r.stdout + r.stderr
    _flip(os.path.join(dest, "val-000001.tar"), restore_mtime=True)
    r = subprocess.run([sys.executable, "-c", _CHECK, "check", path, "--index", dest], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    problems = [line for line in r.stdout.splitlines() if line.startswith("problem:")]
    assert r.returncode == 2 and len(problems) == 1 and "val-000001.tar" in problems[0], r.stdout
    assert "--stamp" in subprocess.run([sys.executable, "-m", "data.manifest", "check", "--help"], cwd=REPO,
                                       capture_output=True, text=True, timeout=60).stdout


def _rank(dest: str, names: list[str], barrier) -> None:
    stamps_mod._VERIFIED.clear()
    barrier.wait()
    verify_shards(load_index(dest), dest, names)


def test_ranks_starting_at_once_never_corrupt_the_stamp_file(replica):
    dest, m, _ = replica
    index = load_index(dest)
    names = _names(index)
    with open(os.path.join(dest, STAMP_NAME), "w") as f:
        f.write("garbage")  # a stamped directory whose stamps are lost: every rank hashes and writes
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_rank, args=(dest, names[k % len(names):] + names[:k % len(names)], barrier))
             for k in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 8
    doc = json.load(open(os.path.join(dest, STAMP_NAME)))  # valid JSON: one writer's whole file
    assert doc["version"] == 1 and set(doc["shards"]) <= set(names) and doc["shards"]
    for name, e in doc["shards"].items():  # every entry kept is true
        st = os.stat(os.path.join(dest, name))
        assert (e["size"], e["ino"], e["ctime_ns"]) == (st.st_size, st.st_ino, st.st_ctime_ns)
        assert e["sha256"] == {s["name"]: s["sha256"] for s in index["splits"]["train"]["shards"]}[name]
    assert not [n for n in os.listdir(dest) if n.startswith(".") and n not in (STAMP_NAME, REPLICA_RECORD)]  # no tmp
    out = fresh_verify(dest, names)  # entries lost to a race are hashed again, and kept
    assert "error" not in out and out["calls"] == len(names) - len(doc["shards"]), out
    assert fresh_verify(dest, names)["calls"] == 0


def test_make_shards_stamps_what_it_wrote(tmp_path):
    """A start on shards make_shards has just written hashes none of them: it stamped its own hashes."""
    from risgd_data.index import load_index
    from risgd_data.make_shards import make_shards
    from risgd_data.stamps import STAMP_NAME, Stamps

    out = str(tmp_path / "digits")
    make_shards("digits", out, shard_size=400, seed=0, progress=False)
    assert os.path.exists(os.path.join(out, STAMP_NAME))
    index = load_index(out)
    shards = [s for split in index["splits"].values() for s in split["shards"]]
    stamps = Stamps(out)
    for s in shards:
        assert stamps.digest(s["name"], s["sha256"]) == s["sha256"]
    assert stamps.report()["hashed"] == 0 and stamps.report()["by_stamp"] + stamps.report()["by_cache"] == len(shards)
    with open(os.path.join(out, shards[0]["name"]), "r+b") as f:  # a changed shard is hashed, and caught
        f.seek(600)
        f.write(b"X")
    assert Stamps(out).digest(shards[0]["name"], shards[0]["sha256"]) != shards[0]["sha256"]
