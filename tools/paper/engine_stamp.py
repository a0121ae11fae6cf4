"""Which engine trained a run: a stamp the paper command writes into every run directory it launches.

train.py writes the run's own record (config.yaml, summary.json) and knows nothing of this: the paper
command computes the stamp of the code it is about to launch and appends it to ``RUN/paper_engine.json``
of each run it trains, before the launch (a run continued from a checkpoint keeps the stamps of the
launches before), and again after it if the engine changed in between. A finished run is *fresh* when
every stamp it carries names the current engine, *stale* otherwise, or when it carries none (trained
before stamps existed, or by train.py directly).

The stamp: the package version (``importlib.metadata``), the sha256 of the engine's source files
(``risgd_ext/**/*.py``, the code that does the rounds, averages and accounting; this is what is
compared), and, recorded but not compared (it changes with every commit), the git commit of the
checkout and whether the engine's files differ from it.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess

from risgd_common.atomic import write_text_atomic

FILE = "paper_engine.json"
COMPARED = ("version", "engine_sha256")


def engine_dir() -> str:
    """The directory of the ``risgd_ext`` package (found without importing it: no torch here)."""
    spec = importlib.util.find_spec("risgd_ext")
    if spec is None or not spec.submodule_search_locations:
        raise OSError("the engine package risgd_ext is not importable")
    return list(spec.submodule_search_locations)[0]


def engine_sha256(root: str | None = None) -> tuple[str, int]:
    """sha256 over the engine's ``.py`` files (relative path and bytes, in sorted order), and their count."""
    root = root or engine_dir()
    files = sorted(os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root)
                   for f in names if f.endswith(".py"))
    h = hashlib.sha256()
    for rel in files:
        with open(os.path.join(root, rel), "rb") as f:
            h.update(rel.replace(os.sep, "/").encode() + b"\0" + f.read() + b"\0")
    return h.hexdigest(), len(files)


def _git(root: str, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def current() -> dict:
    """The stamp of the engine this process would launch."""
    root = engine_dir()
    digest, count = engine_sha256(root)
    try:
        version = importlib.metadata.version("risgd")
    except importlib.metadata.PackageNotFoundError:
        version = None
    checkout = os.path.dirname(root)
    commit = _git(checkout, "rev-parse", "HEAD")
    dirty = None if commit is None else bool(_git(checkout, "status", "--porcelain", "--", root))
    return {"package": "risgd", "version": version, "engine_sha256": digest, "engine_files": count,
            "git_commit": commit, "engine_differs_from_commit": dirty,
            "stamped": datetime.datetime.now().isoformat(timespec="seconds")}


def read(run_dir: str) -> list[dict] | None:
    """The stamps of the launches that trained the run, oldest first; None if it has none."""
    try:
        with open(os.path.join(run_dir, FILE)) as f:
            stamps = json.load(f)["launches"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return stamps if isinstance(stamps, list) and stamps else None


def append(run_dir: str, stamp: dict) -> None:
    """Add ``stamp`` to the run's stamps (unless its last one names the same engine)."""
    stamps = read(run_dir) or []
    if stamps and same(stamps[-1], stamp):
        return
    os.makedirs(run_dir, exist_ok=True)
    write_text_atomic(os.path.join(run_dir, FILE), json.dumps({"launches": [*stamps, stamp]}, indent=1) + "\n")


def same(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in COMPARED)


def stale_reason(stamps: list[dict] | None, now: dict) -> str | None:
    """None when every stamp names the engine ``now``; else why the run is stale (one line)."""
    if not stamps:
        return f"no {FILE}: trained before engine stamps, or not by the paper command"
    for s in stamps:
        if not same(s, now):
            what = [f"{k} {str(s.get(k))[:12]} (now {str(now.get(k))[:12]})"
                    for k in COMPARED if s.get(k) != now.get(k)]
            return "trained (in part) by another engine: " + ", ".join(what)
    return None
