"""One real ``deepspeed`` launch of the trainer from Python (the demo and the paper report use it).

A launch costs ~15-30 s of start-up on a small machine, so a list of runs goes into one launch as a
plan (``train.py --plan``): every run is checked first, then they train one after another in the
same process group, with real collectives.

The ranks run the installed trainer module (``deepspeed --module risgd_trainer.train``: the same in a
checkout and in an installed wheel) in :data:`ROOT`: the checkout's root when the package runs from
one (where the recipes' relative paths such as ``shards/digits`` always pointed), else the directory
the command was started in.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import yaml

from risgd_common.atomic import write_text_atomic
from risgd_common.install import CHECKOUT
from risgd_common.ports import free_port
from risgd_common.progress import Progress, watch  # noqa: F401  (Progress: also launch.Progress)

ROOT = CHECKOUT or os.getcwd()  # where the trainer runs (its working directory)
TRAINER = "risgd_trainer.train"  # the module the ranks run (train.py in a checkout is a shim of it)
_ERROR = re.compile(r"^(?:\S+: )?error: (.+)")  # the trainer's one line on bad input (or argparse's)


def refusal(log_path: str) -> str | None:
    """What the last one-line ``error: ...`` the trainer wrote to the log says, or None."""
    try:
        with open(log_path, errors="replace") as f:
            found = [m.group(1) for m in (_ERROR.match(line.strip()) for line in f) if m]
    except OSError:
        return None
    return found[-1] if found else None


def _run_names(plan: list[list[str]] | None, overrides: list[str]) -> list[str]:
    """The run names a launch will train, where its overrides name them (``run_name=``), in order."""
    names = []
    for extra in plan or [[]]:
        given = [o.split("=", 1)[1] for o in [*overrides, *extra] if o.startswith("run_name=")]
        if given:
            names.append(given[-1])
    return names


def command(recipe: str, ranks: int, overrides: list[str], plan: str | None = None, port: int | None = None,
            trainer: str = TRAINER) -> list[str]:
    """The one launch command line: ``python -m deepspeed.launcher.runner --num_gpus RANKS --master_port
    PORT --module TRAINER --recipe RECIPE [--plan PLAN] OVERRIDES`` (``trainer`` a module, or a script
    path ending in .py such as the checkout's ``train.py``; ``port`` a free one by default). Run it in
    :data:`ROOT`; :func:`launch` (the demo, the paper) and the tests' harness use it."""
    where = [trainer] if trainer.endswith(".py") else ["--module", trainer]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(port or free_port()), *where, "--recipe", recipe]
    if plan is not None:
        cmd += ["--plan", os.path.abspath(plan)]
    return [*cmd, *overrides]


def launch(recipe: str, ranks: int, overrides: list[str], log_path: str,
           plan: list[list[str]] | None = None, progress: bool = True) -> None:
    """``deepspeed --num_gpus RANKS --module risgd_trainer.train --recipe RECIPE [--plan P] OVERRIDES``
    in :data:`ROOT`, output to ``log_path``. With ``progress`` (default) it says on stderr which run is
    training, its step and the time left (:class:`Progress`, read from the trainer's bar in the log).

    Raises SystemExit(2) when the trainer refused its input (its ``error:`` line is repeated, with the
    log), SystemExit(1) when the run failed in any other way; the message names the log.
    """
    plan_path = None
    if plan is not None:
        plan_path = f"{log_path}.plan.yaml"
        write_text_atomic(plan_path, yaml.safe_dump(plan, default_flow_style=None, width=1000))
    cmd = command(recipe, ranks, [], plan=plan_path)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*cmd, *overrides], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if progress:  # the run's progress from its own bar in the log, while it trains
            watch(proc, log_path, _run_names(plan, overrides))
        proc.wait()
    if not proc.returncode:
        return
    message = refusal(log_path) if proc.returncode == 2 else None
    if message is not None:  # the trainer's own exit 2: bad input, in one line
        print(f"error: {message} (log: {log_path})", file=sys.stderr)
        raise SystemExit(2)
    # anything else failed, a Python that could not start the trainer included (it exits 2 too)
    print(f"error: run failed (exit {proc.returncode}): see {log_path}", file=sys.stderr)
    raise SystemExit(1)
