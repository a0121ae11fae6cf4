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
import time

import yaml

from risgd_common.atomic import write_text_atomic
from risgd_common.install import CHECKOUT
from risgd_common.ports import free_port

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


_BAR = re.compile(r"([^\s:|]+): +(\d+)%\|[^|]*\| (\d+)/(\d+) \[([\d:]+)<([\d:?]+)")


def _seconds(clock: str) -> float | None:
    """tqdm's ``MM:SS`` or ``H:MM:SS`` as seconds (None for ``?``)."""
    if "?" in clock:
        return None
    s = 0.0
    for part in clock.split(":"):
        s = s * 60 + float(part)
    return s


def _latest_bar(log_path: str) -> tuple[str, int, int, float | None] | None:
    """(run name, step, steps, seconds left in it) of the trainer's last progress bar in the log."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    found = _BAR.findall(tail)
    if not found:
        return None
    name, _, step, steps, _, left = found[-1]
    return name, int(step), int(steps), _seconds(left)


class Progress:
    """Which run of a launch is training, its step and the time left, from the trainer's own progress
    bar in the log: a line whenever a run starts and at every quarter of it (or every 2 s on a
    terminal, on one line), with an estimate for the whole launch from the runs finished so far."""

    def __init__(self, names: list[str], log_path: str, stream=None):
        self.names, self.log_path = names, log_path
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done: list[float] = []  # seconds each finished run took
        self.current: str | None = None
        self.run_started = time.monotonic()
        self.last_quarter = -1
        self.last_print = 0.0

    def line(self, bar: tuple[str, int, int, float | None]) -> str:
        """The line for the trainer's latest bar (:func:`_latest_bar`)."""
        name, step, steps, left = bar
        now = time.monotonic()
        if name != self.current:
            if self.current is not None:
                self.done.append(now - self.run_started)
            self.current, self.run_started, self.last_quarter = name, now, -1
        k = self.names.index(name) + 1 if name in self.names else len(self.done) + 1
        total = max(len(self.names), k)
        after = total - k  # runs still to come after this one
        per_run = (sum(self.done) / len(self.done)) if self.done else None
        if left is not None and per_run is not None:
            rest = f", about {_clock(left + after * per_run)} left in all"
        elif left is not None and after == 0:
            rest = f", about {_clock(left)} left in all"
        else:
            rest = ""
        this = "" if left is None else f", {_clock(left)} left in it"
        return f"[run {k}/{total}] {name}: step {step}/{steps}{this}{rest}"

    def poll(self) -> None:
        bar = _latest_bar(self.log_path)
        if bar is None:  # nothing training yet
            return
        text = self.line(bar)
        quarter = 4 * bar[1] // max(bar[2], 1)
        now = time.monotonic()
        if self.tty:
            if now - self.last_print >= 2:
                self.stream.write("\r" + text[:150].ljust(150))
                self.stream.flush()
                self.last_print = now
        elif quarter != self.last_quarter:
            self.last_quarter = quarter
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


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
    watch = Progress(_run_names(plan, overrides), log_path) if progress else None
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*cmd, *overrides], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        while proc.poll() is None:  # the run's progress from its own bar in the log, while it trains
            time.sleep(1)
            if watch is not None:
                watch.poll()
    if watch is not None:
        watch.close()
    if not proc.returncode:
        return
    message = refusal(log_path) if proc.returncode == 2 else None
    if message is not None:  # the trainer's own exit 2: bad input, in one line
        print(f"error: {message} (log: {log_path})", file=sys.stderr)
        raise SystemExit(2)
    # anything else failed, a Python that could not start the trainer included (it exits 2 too)
    print(f"error: run failed (exit {proc.returncode}): see {log_path}", file=sys.stderr)
    raise SystemExit(1)
