"""What every experiment's analysis is built of: the finished runs by setting (:class:`Context`), the
result (:class:`Analysis`), and the numbers and tables shared between experiments.

Runs are ``tools.compare.load_run`` dicts, by run name.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from risgd_trainer.naming import label

from . import verdict as V
from .grid import Experiment, Grid, Setting


@dataclass
class Analysis:
    """One experiment's result: what goes into paper.json and paper.md."""

    exp: Experiment
    checks: list[V.Check]
    numbers: dict
    table: str                     # markdown
    plot: str | None               # PNG file name, next to paper.md
    notes: list[str] = field(default_factory=list)
    headline: str = ""             # the key numbers, one line (seed means)

    @property
    def verdict(self) -> str:
        return V.combine([c.verdict for c in self.checks])


class Context:
    """The grid and its finished runs (``compare.load_run`` dicts) by run name; ``draw``: write the plots
    (False: the verdicts only, e.g. between the sequential rule's stages)."""

    def __init__(self, grid: Grid, runs: dict[str, dict], out_dir: str, draw: bool = True):
        self.grid, self.runs, self.out_dir, self.draw = grid, runs, out_dir, draw

    def of(self, setting: Setting, seeds) -> dict[int, dict]:
        """The runs of ``setting`` at ``seeds`` and at the seeds the sequential rule added to it, by seed."""
        return {seed: self.runs[setting.run_name(seed)] for seed in self.grid.with_seeds(setting, seeds)}

    def values(self, setting: Setting, seeds, fn: Callable[[dict], float]) -> dict[int, float]:
        return {seed: fn(run) for seed, run in self.of(setting, seeds).items()}


def final_acc(run: dict) -> float:
    return run["summary"]["final_test_acc"]


def spread(values: dict[int, float | None]) -> dict:
    """mean, min, max and the per-seed values (None where a value is missing)."""
    got = [v for v in values.values() if v is not None]
    return {"mean": statistics.fmean(got) if got else None, "min": min(got, default=None),
            "max": max(got, default=None), "per_seed": {str(k): v for k, v in values.items()}}


def fmt(stat: dict, spec: str = ".2f") -> str:
    if stat["mean"] is None:
        return "-"
    if len(stat["per_seed"]) == 1 or stat["min"] == stat["max"]:
        return format(stat["mean"], spec)
    return f"{format(stat['mean'], spec)} ({format(stat['min'], spec)}..{format(stat['max'], spec)})"


def setting_numbers(ctx: Context, setting: Setting, seeds) -> dict:
    """The summary numbers of one setting over its seeds."""
    runs = ctx.of(setting, seeds)
    s = {seed: r["summary"] for seed, r in runs.items()}
    return {"label": setting.label(), "run_names": [setting.run_name(seed) for seed in runs],
            "per_rank_batch": setting.per_rank_batch(ctx.grid.ranks),
            **{key: spread({seed: v.get(key) for seed, v in s.items()})
               for key in ("final_test_acc", "best_test_acc", "final_train_loss", "comm_rounds", "comm_seconds",
                           "wall_seconds", "divergence_mean", "min_data_coverage")}}


def batch_text(setting: Setting, ranks: int) -> str:
    """``128 per rank`` (and how RI-SGD draws it: ``32 per chunk`` or ``split``)."""
    text = f"{setting.per_rank_batch(ranks):g} per rank"
    if setting.algorithm == "risgd":
        text += f" ({setting.base_batch} per chunk)" if setting.batch_policy == "per_chunk" else " (split)"
    return text


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def points(run: dict, key: str = "comm_rounds") -> list[tuple[float, float]]:
    return [(m[key], m["test_acc"]) for m in run["metrics"] if m.get("test_acc") is not None]


def compute_per_step(run: dict) -> float:
    """The run's measured compute per step (the engine's ``compute_seconds`` / steps; for a record
    without it, wall-clock minus communication)."""
    s = run["summary"]
    if s.get("compute_seconds") is not None:
        return s["compute_seconds"] / s["steps"]
    return max(s["wall_seconds"] - (s.get("comm_seconds") or 0.0), 0.0) / s["steps"]


def model_seconds(run: dict, step: float, comm_bytes: float, collectives: float,
                  bandwidth_gbit: float = V.BANDWIDTH_GBIT, latency_us: float = V.LATENCY_US) -> float:
    """The cost model's time for the run's first ``step`` steps at a stated network: the run's measured
    compute per step times ``step``, plus ring all-reduces of ``comm_bytes`` in ``collectives``
    collectives over its ranks (``risgd_planner.ring_seconds``). A prediction, not a measurement."""
    from risgd_planner import ring_seconds

    return step * compute_per_step(run) + ring_seconds(comm_bytes, run["summary"]["world_size"],
                                                       bandwidth_gbit * 1e9 / 8, latency_us / 1e6,
                                                       collectives=int(collectives))


def time_points(run: dict, bandwidth_gbit: float = V.BANDWIDTH_GBIT,
                latency_us: float = V.LATENCY_US) -> list[tuple[float, float]]:
    """(model seconds, test accuracy) at each evaluation (see :func:`model_seconds`)."""
    return [(model_seconds(run, m["step"], m["comm_bytes"], m["comm_rounds"], bandwidth_gbit, latency_us),
             m["test_acc"]) for m in run["metrics"] if m.get("test_acc") is not None]


def time_to(run: dict, target: float, bandwidth_gbit: float = V.BANDWIDTH_GBIT,
            latency_us: float = V.LATENCY_US) -> tuple[float, bool]:
    """(model seconds to the first evaluation at or above ``target``, True), or (the whole run's model
    seconds, False) if it never gets there."""
    s = run["summary"]
    total = model_seconds(run, s["steps"], s["comm_bytes"], s["comm_rounds"], bandwidth_gbit, latency_us)
    return V.first_reach(time_points(run, bandwidth_gbit, latency_us), target, total)


def network_text() -> str:
    """The stated network of every model time, for labels."""
    return f"{V.BANDWIDTH_GBIT:g} Gbit/s, {V.LATENCY_US:g} us"


def by_seed(ctx: Context, settings: list[Setting], seeds, fn) -> list[list[float]]:
    """[[fn(run of settings[0], seed), fn(run of settings[1], seed), ...] for each seed]."""
    return [[fn(ctx.runs[s.run_name(seed)]) for s in settings] for seed in seeds]


def settings_table(ctx: Context, exp: Experiment, named: list[tuple[str, Setting]], numbers: dict) -> str:
    """A row per named setting (batch, accuracies, loss, divergence, wall-clock); fills numbers['settings']."""
    rows = []
    for name, s in named:
        nums = setting_numbers(ctx, s, exp.seeds)
        numbers["settings"][name] = nums
        rows.append([s.label(), batch_text(s, ctx.grid.ranks), fmt(nums["final_test_acc"]), fmt(nums["best_test_acc"]),
                     fmt(nums["final_train_loss"], ".4f"), fmt(nums["divergence_mean"], ".2e"),
                     fmt(nums["wall_seconds"], ".1f")])
    return md_table(["setting", "batch", "final test acc", "best test acc", "final train loss",
                     "mean divergence", "wall s"], rows)


def against_prsgd(mus) -> list[tuple[float, str]]:
    """The lines of a sweep: PR-SGD (mu=0), then RI-SGD at each of ``mus``, with their labels (no tau)."""
    return [(0.0, label("prsgd")), *((mu, label("risgd", mu=mu)) for mu in mus)]
