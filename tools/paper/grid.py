"""The paper report's grid: which runs each experiment of the RI-SGD paper needs, as train.py overrides.

A :class:`Setting` is one configuration (algorithm, mu, tau, partition, batch, failures); a run is a
setting and a seed. Experiments share runs where their settings coincide (SyncSGD-free settings of
Fig. 2 are also the tau sweep's tau=50 point, the failures' s=0 point and the theory's points; the
equal-compute runs are also the theory's split-policy points), so each run is trained once. Run names
are a pure function of the setting and the seed (:func:`trainer.naming.setting_run_name`).

A :class:`Grid` holds the parameters every experiment draws on; each experiment's own settings, claim
and analysis are in its module (``fig2``, ``tau``, ``diversity``, ``saturation``, ``failures``,
``theory``, ``homogeneous``, ``equalcompute``, ``workers``), which builds its :class:`Experiment` from the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from risgd_trainer.naming import label, setting_run_name

from .registry import builders

GRIDS = ("full", "quick", "test")
HETERO_STD = 0.01  # the paper's heterogeneous redundancy: mu_j ~ N(mu, 0.01) (its code's sigma)
# Keys the grid sets for every run: an override of one of them would silently change an experiment.
GRID_KEYS = ("algorithm", "mu", "tau", "steps", "epochs", "seed", "run_name", "runs_dir", "warmup_sync_steps",
             "failures", "eval_every", "data.partition", "data.hetero_std", "data.base_batch",
             "data.batch_policy", "data.manifest", "node_size")


@dataclass(frozen=True)
class Setting:
    """One configuration of train.py; ``down``: ranks that fail from round ``fail_round`` on; ``node_size``:
    ranks per worker (> 1: each node of that many ranks is one worker, its ranks synchronous, so a grid
    of R ranks has R / node_size workers); ``ranks``: the world size of its launch where it is not the
    grid's (0: the grid's)."""

    algorithm: str
    mu: float
    tau: int
    steps: int
    partition: str
    hetero_std: float
    base_batch: int
    batch_policy: str = "per_chunk"
    down: tuple[int, ...] = ()
    fail_round: int = 2
    node_size: int = 1
    ranks: int = 0

    def world(self, grid_ranks: int) -> int:
        """The world size this setting trains at."""
        return self.ranks or grid_ranks

    def workers(self, ranks: int) -> int:
        return self.world(ranks) // self.node_size

    def run_name(self, seed: int) -> str:
        return setting_run_name(self, seed)

    def label(self) -> str:
        return label(self.algorithm, self.tau, self.mu, mu_first=True)

    def per_rank_batch(self, ranks: int) -> float:
        """Samples a rank draws per step (heterogeneous mu taken at its mean)."""
        if self.algorithm in ("sync", "prsgd", "coop") or self.batch_policy == "split":
            return float(self.base_batch)
        extra = self.mu * self.workers(ranks)
        return self.base_batch * (1 + math.floor(extra + 1e-9)) + round((extra % 1) * self.base_batch)

    def overrides(self, seed: int) -> list[str]:
        failures = f"[{{ranks: [{', '.join(map(str, self.down))}], start_round: {self.fail_round}}}]" \
            if self.down else "[]"
        return [f"algorithm={self.algorithm}", f"mu={self.mu:g}", f"tau={self.tau}", f"steps={self.steps}",
                "epochs=0", "warmup_sync_steps=0", f"seed={seed}", f"data.partition={self.partition}",
                f"data.hetero_std={self.hetero_std:g}", f"data.base_batch={self.base_batch}",
                f"data.batch_policy={self.batch_policy}", f"failures={failures}",
                *([f"node_size={self.node_size}"] if self.node_size > 1 else []), f"run_name={self.run_name(seed)}"]


@dataclass(frozen=True)
class Experiment:
    key: str
    title: str
    claim: str                        # the paper's, with its figure or section
    setup: str                        # what runs here
    seeds: tuple[int, ...]
    settings: tuple[Setting, ...]
    analyse: Callable = field(compare=False, repr=False)  # (Context, Experiment) -> Analysis
    # the seeds of one setting where they are not every setting's (the theory reuses other experiments' runs)
    seeds_for: Callable[[Setting], tuple[int, ...]] | None = field(default=None, compare=False, repr=False)

    def seeds_of(self, setting: Setting) -> tuple[int, ...]:
        return self.seeds if self.seeds_for is None else self.seeds_for(setting)


@dataclass(frozen=True)
class Grid:
    name: str
    ranks: int
    steps: int
    tau: int                          # the paper's main tau (50)
    mus: tuple[float, ...]            # Fig. 2
    partitions: tuple[str, ...]       # Fig. 2 (the recipe's first)
    partition: str                    # every other experiment: the recipe's partition
    taus: tuple[int, ...]             # Appendix A (tau=steps is added: no averaging until the end)
    tau_mu: float                     # RI-SGD's mu in the tau sweep, Fig. 4 and section 4.4
    fail_counts: tuple[int, ...]
    fail_mus: tuple[float, ...]
    fail_round: int
    batch_factor: int                 # Fig. 4: the larger batch
    base_batch: int
    seeds_main: tuple[int, ...]       # Fig. 2
    seeds_other: tuple[int, ...]
    eval_every: int
    hetero_std: float = HETERO_STD
    notes: tuple[str, ...] = field(default=())
    wide_ranks: int = 0               # a second launch of this many ranks (the number of workers p = 8); 0: none
    # seeds the sequential rule added (verdict.LOOKS), by setting: (setting, seed) beyond the experiment's seeds
    extra: tuple[tuple[Setting, int], ...] = ()
    only: tuple[str, ...] = ()        # --only: these experiments' keys, in report order; (): every experiment

    def with_seeds(self, setting: Setting, seeds) -> tuple[int, ...]:
        """``seeds`` and the seeds the sequential rule added to ``setting``, sorted."""
        return tuple(sorted(set(seeds) | {seed for s, seed in self.extra if s == setting}))

    @property
    def full_mu(self) -> float:
        return (self.ranks - 1) / self.ranks

    def local(self, partition: str, mu: float, tau: int | None = None, **kw) -> Setting:
        """PR-SGD (mu=0, no heterogeneity: the paper's 'except for mu=0') or RI-SGD with the paper's
        heterogeneous redundancy."""
        return Setting("prsgd" if mu == 0 else "risgd", mu, tau or self.tau, self.steps, partition,
                       self.hetero_std if mu > 0 else 0.0, kw.pop("base_batch", self.base_batch), **kw)

    def sync(self, partition: str) -> Setting:
        return Setting("sync", 0.0, self.tau, self.steps, partition, 0.0, self.base_batch)

    def experiments(self) -> list[Experiment]:
        """The paper's experiments in report order, each built by its module in ``experiments/``
        (registered there; see :mod:`.registry`)."""
        every = [build(self) for _, build in builders()]
        return [e for e in every if e.key in self.only] if self.only else every

    def runs(self) -> list[tuple[Setting, int]]:
        """Every (setting, seed) once, seed-major: an interrupted grid has every experiment's first seed;
        then the seeds the sequential rule added, in the order it added them."""
        seen, out = set(), []
        seeds = sorted(set(self.seeds_main) | set(self.seeds_other))
        for seed in seeds:
            for exp in self.experiments():
                for s in exp.settings:
                    if seed in exp.seeds_of(s) and (s, seed) not in seen:
                        seen.add((s, seed))
                        out.append((s, seed))
        for run in self.extra:
            if run not in seen:
                seen.add(run)
                out.append(run)
        return out


class GridError(ValueError):
    """A grid that cannot run (one line naming the option and the fix)."""


WIDE_P = 8  # the number-of-workers experiment's largest p (the paper's 8 GPUs): a launch of its own below 8 ranks


def make_grid(name: str, recipe_cfg: dict, ranks: int, steps: int | None = None,
              seeds: tuple[int, ...] | None = None, max_ranks: int = WIDE_P) -> Grid:
    """The grid ``name`` for a resolved recipe: the paper's grid at the recipe's iterations (full),
    shorter and one seed (quick), or tiny (test: ~20 steps, for the test suite). Full and quick add a
    launch of WIDE_P ranks for p = WIDE_P workers when ``ranks`` is below it and ``max_ranks`` allows it."""
    if name not in GRIDS:
        raise GridError(f"--grid {name!r} is unknown: use one of {', '.join(GRIDS)}")
    if ranks < 2:
        raise GridError(f"--ranks {ranks} is invalid: the paper's comparisons need at least 2 ranks")
    full_mu = (ranks - 1) / ranks
    recipe_steps = recipe_cfg["steps"]
    if name == "full":
        grid_steps, tau, taus = recipe_steps, 50, (1, 10, 25, 50, 100, 200)
        # 3 seeds everywhere: a verdict needs a t interval over 3 seeds at least (verdict.MIN_SEEDS)
        mus, main, other = (0.0, 0.1, 0.25, 0.5), (0, 1, 2), (0, 1, 2)
        fail_counts, fail_round = (0, 1, 2), 2
    elif name == "quick":
        grid_steps, tau, taus = max(200, recipe_steps // 5 // 200 * 200), 50, (1, 10, 50, 200)
        mus, main, other = (0.0, 0.1, 0.25, 0.5), (0,), (0,)
        fail_counts, fail_round = (0, 1, 2), 2
    else:
        grid_steps, tau, taus = 20, 5, (1, 5, 10)
        mus, main, other = (0.0, 0.25, 0.5), (0,), (0,)
        fail_counts, fail_round = (0, 1), 2
    if not grid_steps:
        raise GridError(f"the recipe {recipe_cfg['recipe']} gives no 'steps' (it counts epochs): pass --steps")
    grid_steps = steps or grid_steps
    if seeds:
        main = other = tuple(seeds)
    mus = tuple(m for m in mus if m <= full_mu + 1e-9)
    fail_counts = tuple(s for s in fail_counts if s < ranks)
    tau_mu = min(0.25, full_mu)
    fail_mus = tuple(m for m in (0.25, 0.5) if m <= full_mu + 1e-9)
    bad = [t for t in (*taus, tau) if grid_steps % t]
    if bad:
        raise GridError(f"--steps {grid_steps} is not a multiple of tau={bad[0]} (the grid's taus are "
                        f"{', '.join(map(str, taus))}): use a multiple of {math.lcm(*taus, tau)}")
    base = recipe_cfg["data"]["base_batch"]
    eval_every = max(tau, min(recipe_cfg["eval_every"] or grid_steps, grid_steps // 20))
    partition = recipe_cfg["data"]["partition"]
    partitions = (partition, *[p for p in ("label_sorted", "iid") if p != partition])
    wide = WIDE_P if name != "test" and ranks < WIDE_P <= max_ranks else 0
    return Grid(name, ranks, grid_steps, tau, mus, partitions, partition, taus, tau_mu, fail_counts, fail_mus,
                fail_round, 4, base, main, other, eval_every, wide_ranks=wide)
