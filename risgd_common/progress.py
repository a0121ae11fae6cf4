"""Progress of a trainer's launch, read from its log: which run is training, its step and the time
left, from the trainer's own tqdm bar (``NAME:  40%|####      | 400/1000 [00:12<00:18, ...]``).

Used by every launcher that sends the trainer's output to a log (``risgd_tools.launch`` for the demo
and the paper, ``risgd_hosts.netns_cluster`` for the benchmarks on namespace hosts,
``benchmarks/gpu_check.py``): a long run is never a silent wait. A leaf module: it imports nothing
of the project.
"""

from __future__ import annotations

import os
import re
import sys
import time

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
        if not self.names:  # the launch's runs are not known here (e.g. a plan read on another host)
            rest, which = "", f"[run {k}]"
        elif left is not None and per_run is not None:
            rest, which = f", about {_clock(left + after * per_run)} left in all", f"[run {k}/{total}]"
        elif left is not None and after == 0:
            rest, which = f", about {_clock(left)} left in all", f"[run {k}/{total}]"
        else:
            rest, which = "", f"[run {k}/{total}]"
        this = "" if left is None else f", {_clock(left)} left in it"
        return f"{which} {name}: step {step}/{steps}{this}{rest}"

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


def watch(proc, log_path: str, names: list[str] | None = None, stream=None, every_s: float = 1.0) -> int:
    """Wait for ``proc`` (a ``subprocess.Popen`` writing the trainer's output to ``log_path``), saying its
    progress on ``stream`` (stderr) meanwhile; returns its exit status."""
    progress = Progress(names or [], log_path, stream)
    while proc.poll() is None:
        time.sleep(every_s)
        progress.poll()
    progress.close()
    return proc.returncode
