"""Intra-op threads for the trainer ranks that share this machine, whoever launched them.

The ``deepspeed`` launcher's ranks know how many they are (``LOCAL_SIZE``); two elastic nodes started
on one machine by two commands do not, and each took every core: 2 nodes x 1 rank on 2 cores ran 17x
slower (1.1 against about 20 steps a second) unless ``OMP_NUM_THREADS=1`` was set. Each rank registers
itself in a directory of this machine (a file named by its pid; the dead are skipped and removed). An
elastic rank takes ``cores // max(LOCAL_SIZE, ranks here)`` threads at its start and again at every
evaluation (a node started later makes the earlier ones give cores back). A fixed launch keeps
``cores // LOCAL_SIZE``, whatever else runs: its thread count, and so a CPU's sums, stay the same across
a crash and its resume. ``OMP_NUM_THREADS``, when set, wins.
"""

from __future__ import annotations

import atexit
import os
import tempfile

REGISTRY = os.path.join(tempfile.gettempdir(), "risgd-ranks")
_registered: set[str] = set()  # the registries this process is in (a plan's runs register once)


def register() -> None:
    """Count this process among the machine's trainer ranks until it exits."""
    if REGISTRY in _registered:
        return
    _registered.add(REGISTRY)
    os.makedirs(REGISTRY, exist_ok=True)
    path = os.path.join(REGISTRY, str(os.getpid()))
    with open(path, "w"):
        pass

    def unregister() -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    atexit.register(unregister)


def ranks_here() -> int:
    """The live trainer ranks registered on this machine (a crashed rank's file is removed here)."""
    try:
        names = os.listdir(REGISTRY)
    except OSError:
        return 0
    alive = 0
    for name in names:
        try:
            os.kill(int(name), 0)
            alive += 1
        except ProcessLookupError:
            try:
                os.unlink(os.path.join(REGISTRY, name))
            except OSError:
                pass
        except (ValueError, PermissionError):
            alive += name.isdigit()  # another user's live rank
    return alive


def balance(cores: int | None = None, shared: bool = True) -> int | None:
    """Set this rank's intra-op threads to its share of the machine's cores (None: OMP_NUM_THREADS is set
    and is left as it is); returns the threads set. ``shared``: count every registered rank of the machine
    (an elastic node), else this launch's ranks only (``LOCAL_SIZE``)."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    import torch

    cores = cores or os.cpu_count() or 1
    share = max(1, cores // max(int(os.environ.get("LOCAL_SIZE", "1")), ranks_here() if shared else 1, 1))
    if torch.get_num_threads() != share:
        torch.set_num_threads(share)
    return share
