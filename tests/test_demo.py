"""The demo's bookkeeping, without a launch: which finished runs it keeps."""

from __future__ import annotations

import os

import yaml

from risgd_tools import demo
from risgd_trainer.naming import demo_run_name
from risgd_trainer.run_config import resolve_run


def test_a_finished_run_of_another_experiment_is_refused_not_kept(tmp_path, digits_dir, capsys):
    """Issue 46 (item 8, seen with the demo): a finished run was kept by its name alone, so `--tau 10` after a
    tau-50 demo compared the tau-50 runs without a word. A run under the demo's name that holds another
    experiment is refused in one line naming the difference, exit 2, before any launch."""
    runs = tmp_path / "demo"
    name = demo_run_name("digits", "sync", 0.0, 0)
    common = [f"runs_dir={runs}", "wandb.group=digits-demo", f"data.shards={digits_dir}"]
    cfg = resolve_run("recipes/digits.yaml", [*common, "algorithm=sync", "mu=0.0", "seed=0", f"run_name={name}"],
                      4).cfg
    os.makedirs(runs / name)
    (runs / name / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (runs / name / "summary.json").write_text("{}")
    assert demo.main(["--runs-dir", str(runs), "--tau", "10", f"data.shards={digits_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds another experiment" in err[0] and "tau: 50 -> 10" in err[0], err
    assert "--runs-dir DIR" in err[0] and not (runs / "demo.log").exists()  # nothing launched
