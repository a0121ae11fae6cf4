"""The one exception type of the data package, the small checks that raise it, and the exit codes.

Exit codes of every data command (make_shards, manifest build/check, replicate):
  0  success
  1  the work itself failed (an OS error while reading or writing, a bug): `error: ...` on stderr
  2  bad input: a DataError (missing or malformed file, out-of-range argument, sha256 mismatch of an
     input, problems found by `manifest check`) or an argparse usage error
"""

from __future__ import annotations

import os
import sys

from risgd_common.hashing import sha256_file


class DataError(Exception):
    """A data problem the user must fix (missing shard, sha256 mismatch, bad manifest...).

    The message is always one line that names the offending file and the fix, so CLIs can print
    it verbatim and exit 2 (bad input) instead of showing a traceback.
    """


EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed
EXIT_BAD_INPUT = 2  # DataError, argparse usage errors, problems found by `manifest check`


def cli_error(e: BaseException) -> int:
    """Print `error: ...` (one line) on stderr; return 2 for a DataError, 1 for anything else."""
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT if isinstance(e, DataError) else EXIT_FAILED


def safe_name(name: str) -> str:
    """Return `name` if it is a plain file name; refuse anything that could escape a directory.

    Shard names come from index.json / manifests, which may have been edited or come from
    elsewhere, and are joined onto local directories and remote URLs.
    """
    if (
        not isinstance(name, str)
        or not name
        or name in (".", "..")
        or "/" in name
        or "\\" in name
        or "\x00" in name
        or name.startswith(".")
    ):
        raise DataError(f"refusing unsafe shard name {name!r}: shard names must be plain file names")
    return name


# (path, size, mtime_ns) -> digest: each shard is hashed at most once per process.
_VERIFIED: dict[tuple[str, int, int], str] = {}


def verify_shard(shard_dir: str, name: str, sha256: str, fix: str) -> str:
    """Check that shard `name` exists under `shard_dir` with the expected sha256; return its path.

    Raises DataError with a one-line message naming the shard and `fix` (the command to run).
    """
    path = os.path.join(shard_dir, safe_name(name))
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"shard {name} missing under {shard_dir}: {fix}") from None
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    digest = _VERIFIED.get(key)
    if digest is None:
        digest = sha256_file(path)
        _VERIFIED[key] = digest
    if digest != sha256:
        raise DataError(
            f"shard {name} under {shard_dir} has sha256 {digest[:12]}... but the index expects "
            f"{sha256[:12]}...: {fix}"
        )
    return path
