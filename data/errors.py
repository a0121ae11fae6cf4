"""The one exception type of the data package, the small checks that raise it, and the exit codes.

Exit codes of every data command (make_shards, manifest build/check, replicate):
  0  success
  1  the work itself failed (an OS error while reading or writing, a bug): `error: ...` on stderr
  2  bad input: a DataError (missing or malformed file, out-of-range argument, sha256 mismatch of an
     input, problems found by `manifest check`), an argparse usage error, or a missing optional
     dependency (risgd_common.install.MissingExtra: the line names the extra to install)
"""

from __future__ import annotations

import os
import sys

from risgd_common.install import MissingExtra

from .stamps import Stamps


class DataError(Exception):
    """A data problem the user must fix (missing shard, sha256 mismatch, bad manifest...).

    The message is always one line that names the offending file and the fix, so CLIs can print
    it verbatim and exit 2 (bad input) instead of showing a traceback.
    """


EXIT_OK = 0
EXIT_FAILED = 1  # the work itself failed
EXIT_BAD_INPUT = 2  # DataError, argparse usage errors, problems found by `manifest check`


def cli_error(e: BaseException) -> int:
    """Print `error: ...` (one line) on stderr; return 2 for a DataError or a missing optional
    dependency, 1 for anything else."""
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return EXIT_BAD_INPUT if isinstance(e, (DataError, MissingExtra)) else EXIT_FAILED


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


def verify_shard(shard_dir: str, name: str, sha256: str, fix: str, full: bool = False,
                 stamps: Stamps | None = None) -> str:
    """Check that shard `name` exists under `shard_dir` with the expected sha256; return its path.

    The shard is hashed only when neither the in-process cache nor the directory's verification stamp
    (data/stamps.py) vouches for it, or always with `full=True`. `stamps` shares one stamp file across
    many calls (index.verify_shards); without it this call reads and saves its own.
    Raises DataError with a one-line message naming the shard and `fix` (the command to run).
    """
    path = os.path.join(shard_dir, safe_name(name))
    own = stamps is None
    if own:
        stamps = Stamps(shard_dir)
    elif stamps.shard_dir != shard_dir:
        raise ValueError(f"stamps of {stamps.shard_dir!r} passed to verify a shard under {shard_dir!r}")
    try:
        try:
            digest = stamps.digest(name, sha256, full=full)
        except FileNotFoundError:
            raise DataError(f"shard {name} missing under {shard_dir}: {fix}") from None
    finally:
        if own:
            stamps.save()
    if digest != sha256:
        raise DataError(
            f"shard {name} under {shard_dir} has sha256 {digest[:12]}... but the index expects "
            f"{sha256[:12]}...: {fix}"
        )
    return path
