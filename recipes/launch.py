"""One real ``deepspeed`` launch of train.py from Python (the demo and the paper report use it).

A launch costs ~15-30 s of start-up on a small machine, so a list of runs goes into one launch as a
plan (``train.py --plan``): every run is checked first, then they train one after another in the
same process group, with real collectives.
"""

from __future__ import annotations

import os
import subprocess
import sys

import yaml

from risgd_common.atomic import write_text_atomic
from risgd_hosts.local import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(recipe: str, ranks: int, overrides: list[str], log_path: str,
           plan: list[list[str]] | None = None) -> None:
    """``deepspeed --num_gpus RANKS train.py --recipe RECIPE [--plan P] OVERRIDES``, output to ``log_path``.

    Raises SystemExit(2) when train.py refused its input (one line in the log), SystemExit(1) when
    the run failed; the message names the log.
    """
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), os.path.join(ROOT, "train.py"), "--recipe", recipe]
    if plan is not None:
        plan_path = f"{log_path}.plan.yaml"
        write_text_atomic(plan_path, yaml.safe_dump(plan, default_flow_style=None, width=1000))
        cmd += ["--plan", os.path.abspath(plan_path)]
    with open(log_path, "w") as log:
        proc = subprocess.run([*cmd, *overrides], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:  # 2: the run refused its input (one line in the log); 1: it failed
        print(f"error: run failed (exit {proc.returncode}): see {log_path}", file=sys.stderr)
        raise SystemExit(2 if proc.returncode == 2 else 1)
