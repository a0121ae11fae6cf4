"""The paper report from finished runs: every experiment's analysis (its module's), then ``paper.md``
and ``paper.json``, and the verdict table the command prints.

Runs are read with :func:`tools.compare.load_run`; the per-run table at the end of the report is
:func:`tools.compare.table`. The verdict rules are :mod:`tools.paper.verdict`'s.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import statistics

from risgd_common.atomic import write_text_atomic

from .. import compare
from . import engine_stamp as stamp
from . import verdict as V
from .analysis import Analysis, Context, md_table
from .experiments.workers import workers_of
from .grid import Experiment, Grid

VERDICT_FILE = "tools/paper/verdict.py"


def rules_sha256() -> str:
    """sha256 of the rules' file as it is now (the one this process imported)."""
    with open(V.__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def noise_floor(index: dict | None, runs: list[dict]) -> dict:
    """The test split's size and the binomial standard deviation of one accuracy measured on it."""
    n = (index or {}).get("splits", {}).get("val", {}).get("samples") if index else None
    accs = [r["summary"]["final_test_acc"] for r in runs if r["summary"].get("final_test_acc") is not None]
    mean = statistics.fmean(accs) if accs else None
    if not n:
        return {"test_samples": None, "mean_final_test_acc": mean}

    def sd(p: float) -> float:
        return 100 * math.sqrt(p * (1 - p) / n)

    return {"test_samples": n, "one_image_points": 100 / n, "mean_final_test_acc": mean,
            "binomial_sd_points_at_mean": None if mean is None else sd(mean / 100),
            "binomial_sd_points_at_98": sd(0.98)}


def rules_text(noise: dict) -> str:
    t = "t(0.975, n - 1)"
    text = f"""The rules are the code of `{VERDICT_FILE}`: sha256 `{rules_sha256()}` for the file that decided this
report (`git log -p {VERDICT_FILE}` shows when it changed; whether that was before or after any run was
looked at cannot be verified from the files, and is not claimed). Each claim is split into checks. A
*measured* check takes per seed `diff`, the advantage of the setting the paper says is better
(positive supports the claim; a paired check compares two settings trained with the same seed), and
`margin`, the smallest advantage that counts as an effect. With n >= {V.MIN_SEEDS} seeds the t
interval of the mean diff, mean +- {t} * sd / sqrt(n) at 3 seeds, decides:

| the interval of the mean diff | verdict |
|---|---|
| lies above the margin | confirmed |
| lies at or below the margin | not confirmed |
| spans the margin | inconclusive |
| (fewer than {V.MIN_SEEDS} seeds) | inconclusive; the interval is shown from 2 seeds |

**Seeds where they decide something.** A measured check still inconclusive at {V.LOOKS[0]} seeds gets more
seeds for the settings it compares (paired by seed, as before) at the looks {', '.join(map(str, V.LOOKS))}, up to
{V.SEED_CAP}, when the power estimate says the cap could decide it; the cheapest such checks first, within the
command's budget of runs (`--extra-runs`). Looking again at judged data raises the chance of a false decision,
so each look spends its own share of the error: one-sided {', '.join(f'{a:g}' for a in V.SPEND)} at
{', '.join(map(str, V.LOOKS))} seeds (intervals of {', '.join(f'{1 - 2 * a:.1%}' for a in V.SPEND)}). By the union
bound over the looks (Bonferroni), a false confirmation (or false "not confirmed") happens with probability at
most {V.ALPHA:g} whatever decides that a check goes on; the 3-seed look is the fixed-sample rule unchanged. Each
check states the seeds that decided it, or, undecided, about how many seeds a decision would need at its observed
mean and spread (a power estimate for {V.POWER:.0%} power at the last look's level, stated as such).

A *vote* (where the knee of the tau sweep lies, per seed) is confirmed when it holds on every seed,
not confirmed when it holds on none, inconclusive otherwise or on fewer than {V.MIN_SEEDS} seeds. An
experiment is confirmed when all its checks are, not confirmed when all its checks are not, mixed
when some but not all are confirmed, and inconclusive when none is confirmed and some are
inconclusive.

Margins: test accuracy {V.ACC_MARGIN:g} points; training loss and divergence compared as log10 ratios,
margin log10(1.1) (at least 10%); rounds to a target 0; time to a target as a log10 ratio, "way
sooner" log10(2) (at least 2x), "sooner" log10(1.1). A baseline that never reaches a target counts with
its whole run (a lower bound, which favours the baseline); a seed on which the claimed setting never
reaches it counts as a saving of at most 0. "Almost the same accuracy level" is within {V.TARGET_GAP:g} point
of SyncSGD's final accuracy (seed mean); the target of "sooner" is that accuracy minus {V.TARGET_GAP:g} point.
Times are the cost model's at {V.BANDWIDTH_GBIT:g} Gbit/s and {V.LATENCY_US:g} us latency from each run's
measured compute per step and the bytes it moved: predictions for that network, not measurements. The
knee of a tau sweep is the largest tau whose accuracy is within {V.KNEE_GAP:g} point of the best tau's;
"around T" is within a factor {V.KNEE_FACTOR:g} of T.

"""
    if noise.get("test_samples"):
        n = noise["test_samples"]
        at_mean = noise["binomial_sd_points_at_mean"]
        mean = "" if at_mean is None else (f", {at_mean:.2f} points at the runs' mean final accuracy "
                                           f"({noise['mean_final_test_acc']:.1f}%)")
        text += (f"**Noise floor.** The test split has {n:,} images: one image is {noise['one_image_points']:.2f} "
                 f"points, and the binomial standard deviation of one accuracy measured on it is "
                 f"{noise['binomial_sd_points_at_98']:.2f} points at 98%{mean}; the accuracy margin is "
                 f"{V.ACC_MARGIN:g} points. One seed cannot tell a difference of that size from noise: the interval "
                 "over seeds decides. It measures how a paired difference varies between training seeds on these "
                 "images; it does not include the sampling error of the test split itself (the standard deviation "
                 "above, for one accuracy).")
    else:
        text += ("**Noise floor.** The test split's size is not known here (the shard index was not found), so its "
                 "binomial noise floor is not stated; the interval over seeds decides.")
    return text


def stale_runs(runs: dict[str, dict], engine: dict | None) -> dict[str, str]:
    """Run name -> why it is stale (:func:`tools.paper.engine_stamp.stale_reason`), for the runs another engine
    trained or that carry no stamp; empty without a current ``engine`` stamp."""
    if engine is None:
        return {}
    return {name: reason for name, run in runs.items()
            if (reason := stamp.stale_reason(run.get("engine"), engine))}


def scale_table(grid: Grid, cfg: dict, index: dict | None) -> str:
    if index:
        train = index["splits"]["train"]["samples"]
        val = index["splits"].get("val", {}).get("samples", 0)
        shape = "x".join(map(str, index.get("image_shape") or [])) or "variable"
        data = f"{index['dataset']} ({train:,} train, {val:,} test, {shape}, {index['num_classes']} classes)"
    else:
        data = cfg["data"]["dataset"]
    try:
        import risgd_models

        params = f" ({risgd_models.model_bytes(cfg['model']['name']) / 4 / 1e6:.2f}M parameters and buffers)"
    except Exception:  # a model timm cannot build here without its weights or options: name only
        params = ""
    p, b = grid.ranks, grid.base_batch
    rows = [
        ["data", "CIFAR-10 (50,000 train, 10,000 test, 3x32x32) and CIFAR-100; ImageNet in Appendix A", data],
        ["model", "ResNet-44 (0.66M parameters)", cfg["model"]["name"] + params],
        ["iterations", "45,000 (CIFAR-10), 80,000 (CIFAR-100)", f"{grid.steps:,}"],
        ["workers", "4 GPUs (V100 / GTX 1080 Ti), TensorFlow", f"{p} ranks ({device()}), DeepSpeed"],
        ["SyncSGD batch", "128 (32 per worker)", f"{p * b} ({b} per rank)"],
        ["learning rate", "0.1, step decay (authors' code)",
         f"{cfg['optimizer']['lr']:g}, {cfg['schedule']['kind']} schedule (the recipe's)"],
        ["heterogeneous mu", "mu_j ~ N(mu, 0.01)", f"mu_j ~ N(mu, {grid.hetero_std:g}) for RI-SGD (not for mu=0, "
                                                   "nor for full redundancy, which must hold every chunk)"],
        ["Fig. 2 grid", "mu in {0, 0.1, 0.25, 0.5}, tau=50",
         f"mu in {{{', '.join(f'{m:g}' for m in grid.mus)}}}, tau={grid.tau}, partitions "
         f"{', '.join(grid.partitions)}"],
        ["tau sweep", "Appendix A", f"tau in {{{', '.join(str(t) for t in grid.taus if t != grid.steps)}}} and "
                                    f"tau={grid.steps} "
                                    "(no averaging until the end)"],
        ["Fig. 3 batch", "512 (128 per worker: full redundancy, 4 chunks x 32; Coop-SGD the same)",
         f"{p * p * b} ({p * b} per rank: {p} chunks x {b}; Coop-SGD the same)"],
        ["Fig. 4 batch", "512 (128 per worker)", f"{p * b * grid.batch_factor} ({b * grid.batch_factor} per rank, "
                                                 f"{grid.batch_factor}x the base batch)"],
        ["failures", "section 4.4 (the analysis); the authors' slides report CIFAR-10 runs with failed workers",
         f"s in {{{', '.join(map(str, grid.fail_counts))}}} ranks down from round {grid.fail_round}"],
        ["number of workers", "4 (CIFAR); 4 and 8 GPUs (ImageNet, Appendix A)",
         f"p in {{{', '.join(str(w) for w in workers_of(grid) if w <= p)}}} in the launch of {p} ranks (node_size = "
         f"{p} / p: a worker of several ranks is synchronous inside)"
         + (f"; p={grid.wide_ranks} in a launch of {grid.wide_ranks} ranks" if grid.wide_ranks else "")],
        ["seeds", "not stated (one curve per setting)", f"Fig. 2: {len(grid.seeds_main)} "
                                                        f"({', '.join(map(str, grid.seeds_main))}); elsewhere: "
                                                        f"{len(grid.seeds_other)} "
                                                        f"({', '.join(map(str, grid.seeds_other))}); "
                                                        f"{len(grid.extra)} more runs where the sequential rule "
                                                        f"took an inconclusive check to {V.LOOKS[1]} or "
                                                        f"{V.LOOKS[2]} seeds"],
        ["evaluation", "not stated", f"every {grid.eval_every} steps (at the first average at or after), on the "
                                     "whole test split"],
    ]
    return md_table(["", "paper", "here"], rows)


def device() -> str:
    import torch

    return f"{torch.cuda.get_device_name(0)} GPUs" if torch.cuda.is_available() else "CPU processes, gloo"


def analyse(grid: Grid, runs: dict[str, dict], out_dir: str, draw: bool = True) -> list[Analysis]:
    """Every experiment's analysis (and plot, under ``out_dir``, unless ``draw`` is False), in report order."""
    ctx = Context(grid, runs, out_dir, draw)
    return [exp.analyse(ctx, exp) for exp in grid.experiments()]


def verdict_table(analyses: list[Analysis]) -> str:
    """The fixed-width table the command prints."""
    head = f"{'experiment':<62} {'verdict':<14} checks (confirmed / not confirmed / inconclusive)"
    lines = [head, "-" * len(head)]
    for a in analyses:
        counts = [sum(c.verdict == v for c in a.checks) for v in V.CHECK_VERDICTS]
        lines.append(f"{a.exp.title:<62} {a.verdict:<14} {counts[0]} / {counts[1]} / {counts[2]}")
        if a.headline:
            lines.append(f"    {a.headline}")
        lines.append(f"    seeds per check: {seeds_summary(a.checks)}")
    return "\n".join(lines)


def seed_note(c: V.Check) -> str:
    """How many seeds decided a check, or why it stays undecided (with the power estimate)."""
    n = len(c.votes) if c.votes is not None else len(c.diffs)
    if c.verdict != V.INCONCLUSIVE:
        return f"{n}"
    if c.votes is not None:
        return f"{n} (a vote split across seeds: more seeds cannot make it unanimous)"
    if n < V.MIN_SEEDS:
        return f"{n} (below {V.MIN_SEEDS})"
    need = ("a decision needs more than 200 seeds at the observed spread" if c.needed is None else
            f"about {c.needed} seeds would decide it at the observed mean and spread (a power estimate, "
            f"{V.POWER:.0%})")
    if n >= V.SEED_CAP:
        return f"{n}, the cap: {need}"
    if c.needed is None or c.needed > V.SEED_CAP:
        return f"{n}, not extended: {need}, beyond the cap of {V.SEED_CAP}"
    return f"{n}, not extended within the run budget (--extra-runs): {need}"


def seeds_summary(checks: list[V.Check]) -> str:
    """``3 seeds: 8 checks, 5: 2 (1 undecided at the cap)``: the seeds the checks were judged on."""
    by_n: dict[int, list[V.Check]] = {}
    for c in checks:
        by_n.setdefault(len(c.votes) if c.votes is not None else len(c.diffs), []).append(c)
    parts = []
    for n in sorted(by_n):
        undecided = sum(c.verdict == V.INCONCLUSIVE for c in by_n[n])
        parts.append(f"{n}: {len(by_n[n])}" + (f" ({undecided} inconclusive)" if undecided else ""))
    return "checks by seeds judged on, " + ", ".join(parts)


def _check_rows(checks: list[V.Check]) -> str:
    rows = []
    for c in checks:
        if c.votes is not None:
            per_seed = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in c.votes.items())
        else:
            per_seed = ", ".join(f"{d:+.3g}" for d in c.diffs) if c.diffs else "-"
        mean = "-" if c.mean is None else f"{c.mean:+.3g}"
        ci = "-" if c.low is None else f"{c.low:+.3g} .. {c.high:+.3g} ({c.level:.1%})"
        margin = "-" if c.margin is None else f"{c.margin:.3g}"
        rows.append([c.name, per_seed, mean, ci, margin, c.detail, seed_note(c), f"**{c.verdict}**"])
    return md_table(["check", "per seed", "mean", "interval (level)", "margin", "diff is", "seeds", "verdict"], rows)


def engine_section(runs: dict[str, dict], engine: dict | None, stale: dict[str, str]) -> list[str]:
    """The report's lines on the engine that trained the runs (:mod:`tools.paper.engine_stamp`)."""
    if engine is None:
        return ["No engine stamp was taken for this report: whether the runs were trained by the current engine "
                "is not known.", ""]
    commit = engine.get("git_commit")
    where = "" if commit is None else (f", git commit `{commit[:12]}`"
                                       + (" with the engine's files changed since" if engine.get(
                                           "engine_differs_from_commit") else ""))
    lines = [f"The engine now: `risgd` {engine.get('version')}, sha256 of its {engine.get('engine_files')} source "
             f"files (`risgd_ext/**/*.py`) `{engine['engine_sha256']}`{where}. Each run the paper command launches "
             f"records the stamp of the engine that trained it (`RUN/{stamp.FILE}`); the version and the "
             "sha256 are compared.", ""]
    if not stale:
        lines += [f"All {len(runs)} runs were trained by this engine.", ""]
        return lines
    lines += [f"**{len(stale)} of {len(runs)} runs are stale**: another engine trained them, or they carry no stamp. "
              "Their numbers are in the verdicts above; `--retrain-stale` moves them aside and trains them again.", ""]
    shown = sorted(stale.items())
    lines += md_table(["run", "why it is stale"], [[f"`{n}`", r] for n, r in shown[:40]]).splitlines()
    if len(shown) > 40:
        lines.append(f"| ... | and {len(shown) - 40} more (paper.json) |")
    return lines + [""]


def too_few_seeds(grid: Grid) -> list[str]:
    """The report's first words when no experiment has the seeds a measured check is decided on (``--quick``
    and the test grid: 1 seed): that every measured verdict is inconclusive by construction. Empty otherwise."""
    n = max(len(grid.seeds_main), len(grid.seeds_other))
    if n >= V.MIN_SEEDS:
        return []
    said = "One seed decides nothing" if n == 1 else f"{n} seeds decide nothing"
    return [f"**{said}.** These runs have {n} seed{'s' if n > 1 else ''} per setting; a measured check is decided on "
            f"{V.MIN_SEEDS} or more (\"How the verdicts are decided\" below), so every measured check here is "
            "inconclusive whatever its numbers, and the numbers are one draw each, not an effect. `make paper` "
            f"(3 seeds, and more where the sequential rule needs them) or `--seeds` with {V.MIN_SEEDS} or more "
            "decides them.", ""]


def write(grid: Grid, cfg: dict, runs: dict[str, dict], out_dir: str, command: str, index: dict | None,
          timing: dict, engine: dict | None = None) -> list[Analysis]:
    """Analyse, plot, and write ``paper.md`` and ``paper.json`` under ``out_dir``. ``engine``: the current
    engine's stamp (the runs' own are their ``engine`` entries, from :func:`tools.paper.engine_stamp.read`)."""
    os.makedirs(out_dir, exist_ok=True)
    analyses = analyse(grid, runs, out_dir)
    exps = grid.experiments()
    all_runs = [runs[s.run_name(seed)] for s, seed in grid.runs()]
    noise = noise_floor(index, all_runs)
    stale = stale_runs(runs, engine)
    md = [f"# The RI-SGD paper, experiment by experiment, on `{cfg['recipe']}`", "", *too_few_seeds(grid),
          "Haddadpour, Kamani, Mahdavi and Cadambe, *Trading Redundancy for Communication: Speeding up Distributed "
          "SGD for Non-convex Optimization*, ICML 2019. Every experiment of its section 5 and Appendix A re-run here; "
          f"each verdict is computed by `{VERDICT_FILE}` from the runs.", "",
          f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `{command}`: grid `{grid.name}`, "
          f"{grid.ranks} ranks, {len(grid.runs())} runs under `{timing['runs_dir']}` "
          f"({timing['trained']} trained by this command, {timing['launches']} launch(es), "
          f"{timing['seconds']:.0f} s; the runs' own wall-clock adds up to {timing['run_seconds']:.0f} s).", ""]
    if grid.only:
        md += [f"**Only {', '.join(grid.only)}** (`--only`): the other experiments of the paper were not run or "
               "reported here.", ""]
    if stale:
        md += [f"**{len(stale)} of {len(runs)} runs are stale** (trained by another engine, or without an engine "
               "stamp): see \"The engine that trained the runs\".", ""]
    md += ["## Verdicts", "",
           md_table(["experiment", "claim", "verdict", "key numbers (seed means)"],
                    [[a.exp.title, a.exp.claim, f"**{a.verdict}**", a.headline] for a in analyses]), "",
           "## What was scaled down against the paper", "", scale_table(grid, cfg, index), "",
           "## How the verdicts are decided", "", rules_text(noise), "",
           "## The engine that trained the runs", "", *engine_section(runs, engine, stale)]
    for i, a in enumerate(analyses, start=1):
        md += [f"## {i}. {a.exp.title}", "", f"**Claim.** {a.exp.claim}", "", f"**Here.** {a.exp.setup}", "",
               f"**Verdict: {a.verdict}.** Seeds: {', '.join(map(str, a.exp.seeds))}"
               + (f", and up to {max(len(c.diffs) for c in a.checks)} for the checks the sequential rule took further"
                  if any(len(c.diffs) > len(a.exp.seeds) for c in a.checks) else "")
               + f"; {seeds_summary(a.checks)}.", "", a.table, ""]
        if a.plot:
            md += [f"![{a.exp.title}]({a.plot})", ""]
        md += [_check_rows(a.checks), ""]
        md += [f"- {n}" for n in a.notes] + ([""] if a.notes else [])
    md += ["## Every run", "", "```", compare.table(all_runs), "```", ""]
    write_text_atomic(os.path.join(out_dir, "paper.md"), "\n".join(md))

    def run_records(exp: Experiment) -> list[dict]:
        out = []
        for s in exp.settings:
            for seed in grid.with_seeds(s, exp.seeds_of(s)):
                name = s.run_name(seed)
                out.append({"name": name, "dir": runs[name]["dir"], "setting": s.label(), "seed": seed,
                            "summary": runs[name]["summary"], "engine": runs[name].get("engine"),
                            "stale": stale.get(name)})
        return out

    doc = {"paper": "Haddadpour et al., ICML 2019 (RI-SGD)", "recipe": cfg["recipe"], "grid": grid.name,
           "ranks": grid.ranks, "steps": grid.steps, "command": command, "timing": timing,
           "rules": {"file": VERDICT_FILE, "sha256": rules_sha256(), "min_seeds": V.MIN_SEEDS, "confidence": 0.95,
                     "looks": list(V.LOOKS), "spend_one_sided": list(V.SPEND), "alpha": V.ALPHA, "power": V.POWER,
                     "paper_regime": {"ratio": V.paper_ratio(), "params": V.PAPER_PARAMS,
                                      "workers": V.PAPER_WORKERS, "step_flop": V.PAPER_STEP_FLOP,
                                      "gpu_flops": V.PAPER_GPU_FLOPS, "link_gbit": V.PAPER_LINK_GBIT,
                                      "latency_us": V.PAPER_LATENCY_US},
                     "acc_margin": V.ACC_MARGIN, "target_gap": V.TARGET_GAP, "rounds_margin": V.ROUNDS_MARGIN,
                     "div_margin_log10": V.DIV_MARGIN, "loss_margin_log10": V.LOSS_MARGIN,
                     "way_sooner_log10": V.WAY_SOONER, "sooner_log10": V.SOONER, "knee_gap": V.KNEE_GAP,
                     "knee_factor": V.KNEE_FACTOR, "bandwidth_gbit": V.BANDWIDTH_GBIT, "latency_us": V.LATENCY_US},
           "noise_floor": noise, "engine": engine, "stale_runs": stale,
           "experiments": [{"key": a.exp.key, "name": a.exp.title, "claim": a.exp.claim, "setup": a.exp.setup,
                            "verdict": a.verdict, "headline": a.headline,
                            "numbers": {**a.numbers, "checks": [c.as_dict() for c in a.checks]},
                            "plot": a.plot, "runs": run_records(exp)} for a, exp in zip(analyses, exps)]}
    write_text_atomic(os.path.join(out_dir, "paper.json"), json.dumps(doc, indent=1, default=str) + "\n")
    return analyses
