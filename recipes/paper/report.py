"""The paper report from finished runs: every experiment's analysis (its module's), then ``paper.md``
and ``paper.json``, and the verdict table the command prints.

Runs are read with :func:`recipes.compare.load_run`; the per-run table at the end of the report is
:func:`recipes.compare.table`. The verdict rules are :mod:`recipes.paper.verdict`'s.
"""

from __future__ import annotations

import datetime
import json
import os

from risgd_common.atomic import write_text_atomic

from .. import compare
from . import verdict as V
from .analysis import Analysis, Context, md_table
from .grid import Experiment, Grid

RULES = f"""Fixed before any run was looked at (`recipes/paper/verdict.py`); the grid, the split, the schedule
and the seeds were not changed after. Each claim is split into checks. A check compares two settings
seed by seed: `diff` is the advantage of the setting the paper says is better (positive supports the
claim), `margin` the smallest advantage that counts as an effect:

| mean diff over seeds | every seed's diff > 0 | some seed's diff <= 0 |
|---|---|---|
| > margin | confirmed | mixed |
| <= margin | mixed | not confirmed |

Margins: test accuracy {V.ACC_MARGIN} points; rounds to a target 0 (a baseline that never reaches it
counts as its total rounds + 1, a lower bound; a seed on which the claimed setting never reaches it
counts as a saving of at most 0); divergence compared as log10 ratios, margin log10(1.1) (at least
10%).
"Close to SyncSGD" means within {V.TARGET_GAP} point of SyncSGD's final accuracy (seed mean); the target
for "rounds to SyncSGD" is SyncSGD's final accuracy (seed mean) minus {V.TARGET_GAP} point. The knee of
the tau sweep is the largest tau whose seed-mean accuracy is within {V.KNEE_GAP} point of the best tau's;
checks on a knee are yes/no (confirmed / not confirmed). An experiment is confirmed when all its
checks are, not confirmed when none is, mixed otherwise."""


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
        ["Fig. 3 / Fig. 4 batch", "512 (128 per worker)", f"{p * b * grid.batch_factor} ({b * grid.batch_factor} "
                                                           "per rank)"],
        ["failures", "theory only (section 4.4)", f"s in {{{', '.join(map(str, grid.fail_counts))}}} ranks down "
                                                  f"from round {grid.fail_round}"],
        ["seeds", "not stated (one curve per setting)", f"Fig. 2: {len(grid.seeds_main)} "
                                                        f"({', '.join(map(str, grid.seeds_main))}); elsewhere: "
                                                        f"{len(grid.seeds_other)} "
                                                        f"({', '.join(map(str, grid.seeds_other))})"],
        ["evaluation", "not stated", f"every {grid.eval_every} steps (at the first average at or after), on the "
                                     "whole test split"],
    ]
    return md_table(["", "paper", "here"], rows)


def device() -> str:
    import torch

    return f"{torch.cuda.get_device_name(0)} GPUs" if torch.cuda.is_available() else "CPU processes, gloo"


def analyse(grid: Grid, runs: dict[str, dict], out_dir: str) -> list[Analysis]:
    """Every experiment's analysis (and plot, under ``out_dir``), in report order."""
    ctx = Context(grid, runs, out_dir)
    return [exp.analyse(ctx, exp) for exp in grid.experiments()]


def verdict_table(analyses: list[Analysis]) -> str:
    """The fixed-width table the command prints."""
    head = f"{'experiment':<62} {'verdict':<14} checks (confirmed / mixed / not confirmed)"
    lines = [head, "-" * len(head)]
    for a in analyses:
        counts = [sum(c.verdict == v for c in a.checks) for v in (V.CONFIRMED, V.MIXED, V.NOT_CONFIRMED)]
        lines.append(f"{a.exp.title:<62} {a.verdict:<14} {counts[0]} / {counts[1]} / {counts[2]}")
        if a.headline:
            lines.append(f"    {a.headline}")
    return "\n".join(lines)


def _check_rows(checks: list[V.Check]) -> str:
    rows = []
    for c in checks:
        per_seed = ", ".join(f"{d:+.3g}" for d in c.diffs) if c.diffs else "-"
        mean = "-" if c.mean is None else f"{c.mean:+.3g}"
        margin = "-" if c.margin is None else f"{c.margin:.3g}"
        rows.append([c.name, per_seed, mean, margin, c.detail, f"**{c.verdict}**"])
    return md_table(["check", "diff per seed", "mean", "margin", "diff is", "verdict"], rows)


def write(grid: Grid, cfg: dict, runs: dict[str, dict], out_dir: str, command: str, index: dict | None,
          timing: dict) -> list[Analysis]:
    """Analyse, plot, and write ``paper.md`` and ``paper.json`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    analyses = analyse(grid, runs, out_dir)
    exps = grid.experiments()
    md = [f"# The RI-SGD paper, experiment by experiment, on `{cfg['recipe']}`", "",
          "Haddadpour, Kamani, Mahdavi and Cadambe, *Trading Redundancy for Communication: Speeding up Distributed "
          "SGD for Non-convex Optimization*, ICML 2019. Every experiment of its section 5 and Appendix A re-run here; "
          "each verdict is computed by `recipes/paper/verdict.py` from the runs.", "",
          f"Generated {datetime.datetime.now().isoformat(timespec='seconds')} by `{command}`: grid `{grid.name}`, "
          f"{grid.ranks} ranks, {len(grid.runs())} runs under `{timing['runs_dir']}` "
          f"({timing['trained']} trained by this command, {timing['launches']} launch(es), "
          f"{timing['seconds']:.0f} s; the runs' own wall-clock adds up to {timing['run_seconds']:.0f} s).", "",
          "## Verdicts", "",
          md_table(["experiment", "claim", "verdict", "key numbers (seed means)"],
                   [[a.exp.title, a.exp.claim, f"**{a.verdict}**", a.headline] for a in analyses]), "",
          "## What was scaled down against the paper", "", scale_table(grid, cfg, index), "",
          "## How the verdicts are decided", "", RULES, ""]
    for i, a in enumerate(analyses, start=1):
        md += [f"## {i}. {a.exp.title}", "", f"**Claim.** {a.exp.claim}", "", f"**Here.** {a.exp.setup}", "",
               f"**Verdict: {a.verdict}.** Seeds: {', '.join(map(str, a.exp.seeds))}.", "", a.table, ""]
        if a.plot:
            md += [f"![{a.exp.title}]({a.plot})", ""]
        md += [_check_rows(a.checks), ""]
        md += [f"- {n}" for n in a.notes] + ([""] if a.notes else [])
    all_runs = [runs[s.run_name(seed)] for s, seed in grid.runs()]
    md += ["## Every run", "", "```", compare.table(all_runs), "```", ""]
    write_text_atomic(os.path.join(out_dir, "paper.md"), "\n".join(md))

    def run_records(exp: Experiment) -> list[dict]:
        return [{"name": s.run_name(seed), "dir": runs[s.run_name(seed)]["dir"], "setting": s.label(),
                 "seed": seed, "summary": runs[s.run_name(seed)]["summary"]}
                for s in exp.settings for seed in exp.seeds_of(s)]

    doc = {"paper": "Haddadpour et al., ICML 2019 (RI-SGD)", "recipe": cfg["recipe"], "grid": grid.name,
           "ranks": grid.ranks, "steps": grid.steps, "command": command, "timing": timing,
           "rules": {"acc_margin": V.ACC_MARGIN, "target_gap": V.TARGET_GAP, "rounds_margin": V.ROUNDS_MARGIN,
                     "div_margin_log10": V.DIV_MARGIN, "knee_gap": V.KNEE_GAP},
           "experiments": [{"key": a.exp.key, "name": a.exp.title, "claim": a.exp.claim, "setup": a.exp.setup,
                            "verdict": a.verdict, "headline": a.headline,
                            "numbers": {**a.numbers, "checks": [c.as_dict() for c in a.checks]},
                            "plot": a.plot, "runs": run_records(exp)} for a, exp in zip(analyses, exps)]}
    write_text_atomic(os.path.join(out_dir, "paper.json"), json.dumps(doc, indent=1, default=str) + "\n")
    return analyses
