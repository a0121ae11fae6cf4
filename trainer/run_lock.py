"""One run at a time in a run directory: an flock on ``RUN_DIR/.lock``, held by rank 0 of a fixed run
for as long as it trains. A crash cannot leave it stale (the kernel drops the lock with the process); a
second run into the same directory is refused in one line before it writes anything. An elastic run's
nodes share their run directory by design (one writes the record at a time) and take no lock."""

from __future__ import annotations

import fcntl
import os

from risgd_trainer.run_config import RecipeError

LOCK_NAME = ".lock"
_held: dict[str, int] = {}  # run directory -> the open lock file's descriptor


def hold(run_dir: str) -> None:
    """Take the run directory's lock for this process (RecipeError, one line, when another run holds it)."""
    if run_dir in _held:
        return
    os.makedirs(run_dir, exist_ok=True)
    fd = os.open(os.path.join(run_dir, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        raise RecipeError(f"{run_dir} is in use by another run (process {holder or '?'}): wait for it, stop it, "
                          "or pick a new run_name=") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[run_dir] = fd


def release(run_dir: str) -> None:
    """Give the lock back (the process's exit does it too)."""
    fd = _held.pop(run_dir, None)
    if fd is not None:
        os.close(fd)
