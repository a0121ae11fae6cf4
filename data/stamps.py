"""Verification stamps: which shards of a directory were fully sha256-verified, so a start need not
hash them again.

A shard directory may hold one small file, `.risgd-verified.json`. Per shard name it records the
sha256 the shard had when it was last hashed in full, with the file's identity at that moment:
size, mtime_ns, ctime_ns, inode and device. A verification (`Stamps.digest`) accepts a shard
without reading it when its entry names the sha256 the index expects and that identity is still the
file's; anything else (no entry, another identity, another sha256, `full=True`) hashes the whole
file. A shard that hashes to what the index expects gets a fresh entry.

Why the identity is enough to see a change: writing to a file sets its mtime and ctime to the
clock; `os.utime` can put the mtime back but sets the ctime to the clock too, and nothing short of
changing the system clock sets a ctime. A truncation changes the size; a file copied or renamed
over the shard has another inode (and a rename sets the ctime). So the stamp catches every edit
made through the file system; what it cannot see is a change that bypasses it (bit rot on the
medium, a raw write to the block device): `full=True` (`data.verify: full`, `replicate --rehash`,
`manifest check`) hashes everything for that.

File times come from a coarse clock (one kernel tick; a second on some file systems), so a write
in the same tick as the one a stamp recorded would leave the same times. Fresh entries are therefore
settled before they are kept: `Stamps.save` waits until the clock has moved past the file's ctime
(20 ms, or about 2 s on a file system with whole-second times; only for files changed just now), so
any change made after a verifying call returns carries a later ctime and is caught. What remains
is a concurrent writer changing the file within the same tick in which it was hashed.

Who writes the file: `data.replicate` creates it for its verified copies (and `manifest check
--stamp` after a full check). A verification refreshes the entries of a directory that already has
a stamp file and never creates one, so a directory nobody opted in (e.g. make_shards' output) is
left as it is, and a read-only directory costs nothing but the hashing. Writes go through
risgd_common.atomic after re-reading the file and merging into it: ranks of a node that start
at once may lose one another's fresh entries (those shards are hashed again at the next start),
never corrupt the file. A stamp file that cannot be read or parsed counts as no stamps; the next
write replaces it.

The stamp is a cache of a verification, not a security boundary: whoever can write the shard
directory could as well rewrite index.json.
"""

from __future__ import annotations

import json
import os
import time

from risgd_common.atomic import write_bytes_atomic
from risgd_common.hashing import sha256_file

STAMP_NAME = ".risgd-verified.json"
STAMP_VERSION = 1
FIELDS = ("size", "mtime_ns", "ctime_ns", "ino", "dev")  # the file identity an entry must match
_TICK_NS = 20_000_000  # > one kernel clock tick (10 ms at HZ=100): file times come from a coarse clock
_SECOND_NS = 1_000_000_000
_ABOUT = ("risgd_data verification stamps: a shard whose size, mtime_ns, ctime_ns, ino and dev still match "
          "its entry was fully sha256-verified and is not hashed again at start; delete this file to "
          "hash every shard at the next start (or verify with full=True)")

Identity = tuple[int, int, int, int, int]

# (absolute path, *identity) -> sha256: each shard is hashed at most once per process.
_VERIFIED: dict[tuple, str] = {}


def identity(st: os.stat_result) -> Identity:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _valid(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
            and all(type(entry.get(k)) is int for k in FIELDS))


def read_stamps(shard_dir: str) -> dict[str, dict]:
    """The valid entries of `shard_dir`'s stamp file; {} when it is missing, unreadable or malformed."""
    try:
        with open(os.path.join(shard_dir, STAMP_NAME), "rb") as f:
            doc = json.loads(f.read())
        shards = doc["shards"] if doc["version"] == STAMP_VERSION else {}
        return {name: e for name, e in shards.items() if isinstance(name, str) and _valid(e)}
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return {}


def _settle_until(ctime_ns: int) -> int:
    """The clock time after which a write can no longer carry `ctime_ns` (see the module docstring)."""
    coarse = _SECOND_NS * 2 if ctime_ns % _SECOND_NS == 0 else 0  # whole-second (or FAT's 2 s) times
    return ctime_ns + coarse + _TICK_NS


class Stamps:
    """One directory's stamps for one verification pass: look shards up, hash what must be hashed,
    then `save()` once (fresh entries into the in-process cache, and into the stamp file if the
    directory has one or `create`)."""

    def __init__(self, shard_dir: str, create: bool = False):
        self.shard_dir = shard_dir
        self.path = os.path.join(shard_dir, STAMP_NAME)
        self.writes = create or os.path.lexists(self.path)
        self.entries = read_stamps(shard_dir)
        self.fresh: dict[str, tuple[str, Identity]] = {}  # verified by a full hash in this pass
        self.by_cache = self.by_stamp = self.hashed = self.hashed_bytes = 0

    def digest(self, name: str, expected: str, full: bool = False) -> str:
        """sha256 of shard `name` (a safe name): `expected` without reading the file when the
        in-process cache or the stamp vouches for it (unless `full`), else a full hash.

        Raises FileNotFoundError when the shard is missing.
        """
        path = os.path.join(self.shard_dir, name)
        ident = identity(os.stat(path))
        if not full:
            cached = _VERIFIED.get((os.path.abspath(path), *ident))
            if cached is not None:
                self.by_cache += 1
                return cached
            entry = self.entries.get(name)
            if entry is not None and entry["sha256"] == expected and tuple(entry[k] for k in FIELDS) == ident:
                _VERIFIED[(os.path.abspath(path), *ident)] = expected
                self.by_stamp += 1
                return expected
        digest = sha256_file(path)
        self.hashed += 1
        self.hashed_bytes += ident[0]
        try:
            unchanged = identity(os.stat(path)) == ident  # not rewritten or replaced while we read it
        except OSError:
            unchanged = False
        if digest == expected and unchanged:
            self.fresh[name] = (digest, ident)
        return digest

    def add_copy(self, name: str, sha256: str, written: os.stat_result) -> None:
        """Record a file this process has just written with content of `sha256` and renamed into
        place (the verified copy); `written` is the fstat of its temporary before the rename. The
        rename may set the ctime, so the entry takes the identity after it, if it is the same file."""
        try:
            st = os.stat(os.path.join(self.shard_dir, name))
        except OSError:
            return
        if (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns) == (
                written.st_ino, written.st_dev, written.st_size, written.st_mtime_ns):
            self.fresh[name] = (sha256, identity(st))

    def add_written(self, name: str, sha256: str) -> None:
        """Record a shard this process has just written and hashed (make_shards), with its identity
        now: the writer's own hash vouches for it, so the first start need not hash it again."""
        try:
            self.fresh[name] = (sha256, identity(os.stat(os.path.join(self.shard_dir, name))))
        except OSError:
            pass

    def report(self) -> dict:
        return {"shards": self.by_cache + self.by_stamp + self.hashed, "by_stamp": self.by_stamp,
                "by_cache": self.by_cache, "hashed": self.hashed, "hashed_bytes": self.hashed_bytes}

    def save(self) -> bool:
        """Settle the fresh entries, cache them, merge them into the stamp file; True if it was written.

        Never raises for the stamp file: an unwritable directory keeps no stamps, that is all.
        """
        now = time.time_ns()
        settled, until = {}, now
        for name, (sha256, ident) in self.fresh.items():
            t = _settle_until(ident[2])
            if t - now <= 2 * _SECOND_NS + _TICK_NS:  # else a ctime far in the future: trust no stamp
                settled[name] = (sha256, ident)
                until = max(until, t)
        self.fresh = {}
        if until > now:
            time.sleep((until - now) / 1e9)
        for name, (sha256, ident) in settled.items():
            _VERIFIED[(os.path.abspath(os.path.join(self.shard_dir, name)), *ident)] = sha256
        if not self.writes or not settled:
            return False
        new = {name: {"sha256": sha256, **dict(zip(FIELDS, ident))} for name, (sha256, ident) in settled.items()}
        entries = read_stamps(self.shard_dir)  # re-read: keep what other ranks wrote meanwhile
        if all(entries.get(name) == e for name, e in new.items()):
            self.entries = entries
            return False
        entries.update(new)
        self.entries = entries
        doc = {"version": STAMP_VERSION, "about": _ABOUT, "shards": dict(sorted(entries.items()))}
        try:
            write_bytes_atomic(self.path, (json.dumps(doc, indent=1) + "\n").encode())
        except OSError:
            return False
        return True
