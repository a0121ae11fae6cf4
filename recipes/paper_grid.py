"""The paper report's grid: which runs each experiment of the RI-SGD paper needs, as train.py overrides.

A :class:`Setting` is one configuration (algorithm, mu, tau, partition, batch, failures); a run is a
setting and a seed. Experiments share runs where their settings coincide (SyncSGD-free settings of
Fig. 2 are also the tau sweep's tau=50 point, the failures' s=0 point and the theory's points), so
each run is trained once. Run names are a pure function of the setting and the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

GRIDS = ("full", "quick", "test")
HETERO_STD = 0.01  # the paper's heterogeneous redundancy: mu_j ~ N(mu, 0.01) (its code's sigma)
# Keys the grid sets for every run: an override of one of them would silently change an experiment.
GRID_KEYS = ("algorithm", "mu", "tau", "steps", "epochs", "seed", "run_name", "runs_dir", "warmup_sync_steps",
             "failures", "eval_every", "data.partition", "data.hetero_std", "data.base_batch",
             "data.batch_policy", "data.manifest")


@dataclass(frozen=True)
class Setting:
    """One configuration of train.py; ``down``: ranks that fail from round ``fail_round`` on."""

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

    def slug(self) -> str:
        part = {"label_sorted": "ls", "iid": "iid"}.get(self.partition, self.partition.replace(":", ""))
        text = f"{part}-{self.algorithm}"
        if self.algorithm != "sync":
            text += f"-t{self.tau}"
        if self.algorithm == "risgd":
            text += f"-mu{self.mu:g}"
            if self.hetero_std:
                text += f"-h{self.hetero_std:g}"
        text += f"-b{self.base_batch}"
        if self.batch_policy != "per_chunk":
            text += f"-{self.batch_policy}"
        if self.down:
            text += f"-down{'-'.join(map(str, self.down))}r{self.fail_round}"
        return text

    def run_name(self, seed: int) -> str:
        return f"{self.slug()}-s{seed}"

    def label(self) -> str:
        if self.algorithm == "sync":
            return "SyncSGD"
        if self.algorithm == "coop":
            return f"Coop-SGD tau={self.tau}"
        name = "PR-SGD" if self.algorithm == "prsgd" else f"RI-SGD mu={self.mu:g}"
        return f"{name} tau={self.tau}"

    def per_rank_batch(self, ranks: int) -> float:
        """Samples a rank draws per step (heterogeneous mu taken at its mean)."""
        if self.algorithm in ("sync", "prsgd", "coop") or self.batch_policy == "split":
            return float(self.base_batch)
        extra = self.mu * ranks
        return self.base_batch * (1 + math.floor(extra + 1e-9)) + round((extra % 1) * self.base_batch)

    def overrides(self, seed: int) -> list[str]:
        failures = f"[{{ranks: [{', '.join(map(str, self.down))}], start_round: {self.fail_round}}}]" \
            if self.down else "[]"
        return [f"algorithm={self.algorithm}", f"mu={self.mu:g}", f"tau={self.tau}", f"steps={self.steps}",
                "epochs=0", "warmup_sync_steps=0", f"seed={seed}", f"data.partition={self.partition}",
                f"data.hetero_std={self.hetero_std:g}", f"data.base_batch={self.base_batch}",
                f"data.batch_policy={self.batch_policy}", f"failures={failures}", f"run_name={self.run_name(seed)}"]


@dataclass(frozen=True)
class Experiment:
    key: str
    title: str
    claim: str                        # the paper's, with its figure or section
    setup: str                        # what runs here
    seeds: tuple[int, ...]
    settings: tuple[Setting, ...]


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

    # -- the experiments' settings, one function each (the analysis asks for the same objects) --

    def fig2(self, partition: str) -> dict:
        return {"sync": self.sync(partition), **{mu: self.local(partition, mu) for mu in self.mus}}

    def sweep_taus(self) -> tuple[int, ...]:
        return tuple(t for t in self.taus if t != self.steps) + (self.steps,)

    def tau_sweep(self) -> dict:
        return {(mu, t): self.local(self.partition, mu, t) for mu in (0.0, self.tau_mu) for t in self.sweep_taus()}

    def diversity(self) -> dict:
        full = replace(self.local(self.partition, self.full_mu), hetero_std=0.0)  # every rank holds every chunk
        coop = Setting("coop", 0.0, self.tau, self.steps, self.partition, 0.0, self.base_batch * self.ranks)
        return {"full": full, "coop": coop}

    def saturation(self) -> dict:
        big = self.base_batch * self.batch_factor
        return {"prsgd_big": self.local(self.partition, 0.0, base_batch=big),
                "risgd_big": self.local(self.partition, self.tau_mu, base_batch=big, batch_policy="split"),
                "prsgd": self.local(self.partition, 0.0), "risgd": self.local(self.partition, self.tau_mu)}

    def failures(self) -> dict:
        return {(mu, s): self.local(self.partition, mu, down=tuple(range(1, s + 1)), fail_round=self.fail_round)
                for s in self.fail_counts for mu in (0.0, *self.fail_mus)}

    def theory(self) -> dict:
        out = {("mu", p, mu): s for p in self.partitions for mu, s in self.fig2(p).items() if mu != "sync"}
        out.update({("tau", mu, t): s for (mu, t), s in self.tau_sweep().items()})
        return out

    def experiments(self) -> list[Experiment]:
        p, t, b, big, steps = self.ranks, self.tau, self.base_batch, self.batch_factor, self.steps
        fig2 = [s for part in self.partitions for s in self.fig2(part).values()]
        mus = ", ".join(f"{m:g}" for m in self.mus)
        fail_mus = ", ".join(f"{m:g}" for m in self.fail_mus)
        swept = [x for x in self.taus if x != steps]
        downs = "; ".join(f"s={s}: ranks {list(range(1, s + 1))}" for s in self.fail_counts if s)
        return [
            Experiment("fig2", "Fig. 2: redundancy against SyncSGD",
                       "Fig. 2 (ResNet on CIFAR-10/100, 4 workers, tau=50, mu in {0, 0.1, 0.25, 0.5}): \"by "
                       "increasing redundancy rate we get quite close to the baseline SyncSGD in terms of "
                       "convergence, in an accelerated rate ... We reach almost the same accuracy level way sooner\".",
                       f"mu in {{{mus}}} at tau={t} (RI-SGD's mu_j ~ N(mu, {self.hetero_std:g})) against SyncSGD, "
                       f"{steps} iterations, partitions {' and '.join(self.partitions)}; the target is SyncSGD's final "
                       "accuracy (seed mean) minus 1 point.", self.seeds_main, tuple(fig2)),
            Experiment("tau", "Appendix A: the number of local steps tau",
                       "Section 5.2 / Appendix A: as tau goes up \"the accuracy goes down, however the number of "
                       "communication rounds and hence the time for execution reduces\"; tau \"around 50\" is the best "
                       "trade-off on CIFAR; with no averaging step in the middle of training, \"redundancy can, "
                       "indeed, improve the convergence rate\".",
                       f"PR-SGD and RI-SGD mu={self.tau_mu:g} at tau in {{{', '.join(map(str, swept))}}} and at "
                       f"tau={steps} (one average, at the end), {self.partition}, {steps} iterations.",
                       self.seeds_other, tuple(self.tau_sweep().values())),
            Experiment("diversity", "Fig. 3: full redundancy against cooperative SGD",
                       "Fig. 3 (ResNet-44 on CIFAR-10, tau=50, batch 512 for both): \"RI-SGD with full redundancy can "
                       "outperform the simple model averaging with every node having access to all data\" "
                       "(cooperative SGD), through the diversity of its mini-batches.",
                       f"RI-SGD mu={self.full_mu:g} (every rank holds every chunk and draws {b} from each) against "
                       f"Coop-SGD (every rank samples the whole set, {p * b} per step): {p * b} per rank both, "
                       f"tau={t}, {self.partition}.", self.seeds_other, tuple(self.diversity().values())),
            Experiment("saturation", f"Fig. 4: escaping saturation at a {big}x batch",
                       "Fig. 4 (ResNet-44 on CIFAR-10, tau=50, batch 512 for both): \"redundancy can help to escape "
                       "saturation by introducing gradient diversity, hence, can achieve a better performance\" "
                       "than PR-SGD.",
                       f"PR-SGD against RI-SGD mu={self.tau_mu:g}, both at {b * big} per rank ({big}x the base batch; "
                       f"RI-SGD splits it over its chunks), tau={t}, {self.partition}; the same two at batch {b} "
                       "for reference.", self.seeds_other, tuple(self.saturation().values())),
            Experiment("failures", "Section 4.4: failed workers",
                       "Section 4.4: when s failed workers are ignored, \"by proper choice of gamma ... taking "
                       "advantage of the data redundancy, RI-SGD(tau) is resilient against failures\" (a lower error "
                       "than PR-SGD with the same s).",
                       f"{downs} of {p} down from round {self.fail_round} (consecutive ranks: the harder case for "
                       f"cyclic placement), PR-SGD against RI-SGD mu in {{{fail_mus}}}, tau={t}, {self.partition}.",
                       self.seeds_other, tuple(self.failures().values())),
            Experiment("theory", "Theorem 4.2: the residual error (divergence before averaging)",
                       "Theorem 4.2 / Remark 2 and section 6: \"redundancy reduces residual error as compared with "
                       "conventional algorithms where there is no redundancy\"; the residual term grows with (tau - 1) "
                       "and shrinks as gamma = 1/p + mu grows (gamma = 1 gives Cooperative SGD's bound).",
                       "The divergence of the local models before each average, mean_j ||x_j - x||^2 / ||x||^2 "
                       "averaged over the run's rounds (`divergence_mean`), of the Fig. 2 runs (against mu) and of "
                       "the tau sweep (against tau).",
                       tuple(sorted(set(self.seeds_main) | set(self.seeds_other))), tuple(self.theory().values())),
        ]

    def seeds_of(self, exp: Experiment, setting: Setting) -> tuple[int, ...]:
        """The theory reuses Fig. 2's runs (all its seeds) and the tau sweep's (the other seeds)."""
        if exp.key != "theory":
            return exp.seeds
        return self.seeds_main if setting in self.fig2(setting.partition).values() else self.seeds_other

    def runs(self) -> list[tuple[Setting, int]]:
        """Every (setting, seed) once, seed-major: an interrupted grid has every experiment's first seed."""
        seen, out = set(), []
        seeds = sorted(set(self.seeds_main) | set(self.seeds_other))
        for seed in seeds:
            for exp in self.experiments():
                for s in exp.settings:
                    if seed in self.seeds_of(exp, s) and (s, seed) not in seen:
                        seen.add((s, seed))
                        out.append((s, seed))
        return out


class GridError(ValueError):
    """A grid that cannot run (one line naming the option and the fix)."""


def make_grid(name: str, recipe_cfg: dict, ranks: int, steps: int | None = None,
              seeds: tuple[int, ...] | None = None) -> Grid:
    """The grid ``name`` for a resolved recipe: the paper's grid at the recipe's iterations (full),
    shorter and one seed (quick), or tiny (test: ~20 steps, for the test suite)."""
    if name not in GRIDS:
        raise GridError(f"--grid {name!r} is unknown: use one of {', '.join(GRIDS)}")
    if ranks < 2:
        raise GridError(f"--ranks {ranks} is invalid: the paper's comparisons need at least 2 ranks")
    full_mu = (ranks - 1) / ranks
    recipe_steps = recipe_cfg["steps"]
    if name == "full":
        grid_steps, tau, taus = recipe_steps, 50, (1, 10, 25, 50, 100, 200)
        mus, main, other = (0.0, 0.1, 0.25, 0.5), (0, 1, 2), (0, 1)
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
    return Grid(name, ranks, grid_steps, tau, mus, partitions, partition, taus, tau_mu, fail_counts, fail_mus,
                fail_round, 4, base, main, other, eval_every)
