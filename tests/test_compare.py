"""risgd-compare groups runs by experiment: seeds of one experiment are averaged, runs that differ in
anything else (12 against 102 steps) never are, and every run is named in the plots' legend. The run
records are written the way the trainer writes them (config.yaml from a resolved recipe, summary.json,
metrics.jsonl); the trainer itself writing them is test_train.py's job."""

from __future__ import annotations

import json
import os

import yaml

from risgd_tools import compare
from risgd_trainer.run_config import load_recipe


def _run(root, name: str, seed: int, steps: int, acc: float, **over) -> str:
    run_dir = os.path.join(root, name)
    os.makedirs(run_dir)
    cfg = load_recipe("recipes/digits.yaml", [f"seed={seed}", f"steps={steps}", "tau=5", "algorithm=risgd",
                                              "mu=0.5", f"run_name={name}", f"runs_dir={root}",
                                              *(f"{k}={v}" for k, v in over.items())])
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)
    summary = {"algorithm": "risgd", "tau": 5, "mu": 0.5, "world_size": 4, "steps": steps, "seed": seed,
               "comm_rounds": steps // 5, "comm_bytes": 1e6, "comm_seconds": 0.1, "wall_seconds": 1.0,
               "final_test_acc": acc, "best_test_acc": acc, "final_train_loss": 0.5}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step in (steps // 2, steps):
            f.write(json.dumps({"step": step, "comm_rounds": step // 5, "wall_seconds": step / 10,
                                "train_loss": 0.5, "test_acc": acc}) + "\n")
    return run_dir


def test_runs_of_different_lengths_are_never_merged(tmp_path, capsys):
    short0 = _run(tmp_path, "short-s0", 0, 10, 80.0)
    short1 = _run(tmp_path, "short-s1", 1, 10, 90.0)
    long0 = _run(tmp_path, "long-s0", 0, 100, 97.0)
    groups = compare.group([compare.load_run(d) for d in (short0, long0, short1)])
    assert [(name, [os.path.basename(r["dir"]) for r in members]) for name, members in groups] == [
        ("RI-SGD tau=5 mu=0.5 [steps=10]", ["short-s0", "short-s1"]),
        ("RI-SGD tau=5 mu=0.5 [steps=100]", ["long-s0"])]
    assert compare.main([short0, long0, short1, "--no-plots"]) == 0
    out = capsys.readouterr().out
    rows = out.split("experiment (mean over seeds)")[1].splitlines()[2:]
    assert [r.split("]")[0] + "]" for r in rows] == ["RI-SGD tau=5 mu=0.5 [steps=10]",
                                                     "RI-SGD tau=5 mu=0.5 [steps=100]"]
    assert rows[0].split("]")[1].split()[:3] == ["2", "2", "85.00"]  # 2 seeds, 2 rounds, the mean of 80 and 90
    assert rows[1].split("]")[1].split()[:3] == ["1", "20", "97.00"]


def test_operational_keys_do_not_split_an_experiment(tmp_path):
    a = _run(tmp_path, "a", 0, 10, 80.0, eval_every=5)
    b = _run(tmp_path, "b", 1, 10, 90.0, eval_every=10)  # how often it was evaluated is not the experiment
    c = _run(tmp_path, "c", 2, 10, 90.0, **{"optimizer.lr": 0.01})  # the learning rate is
    groups = compare.group([compare.load_run(d) for d in (a, b, c)])
    assert [len(members) for _, members in groups] == [2, 1]
    assert groups[1][0].endswith("[optimizer.lr=0.01]")


def test_the_legend_names_every_run(tmp_path):
    runs = [_run(tmp_path, f"r-s{s}", s, 10, 80.0 + s) for s in range(2)]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):  # the real savefig, after reading the legend it draws
        made.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        paths = compare.plot([compare.load_run(d) for d in runs], str(tmp_path / "plots"))
    finally:
        plt.Figure.savefig = real_savefig
    assert len(paths) == 3 and all(os.path.getsize(p) > 0 for p in paths)
    assert made[0] == ["r-s0 (RI-SGD tau=5 mu=0.5)", "r-s1 (RI-SGD tau=5 mu=0.5)"]


def test_a_mistyped_path_is_named_as_missing(tmp_path, capsys):
    assert compare.main([str(tmp_path / "runs" / "no-such-run")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "has not finished" not in err and err.count("\n") == 1


def test_a_run_named_twice_is_one_run_not_two_seeds(tmp_path, capsys):
    run = _run(tmp_path, "r-s0", 0, 10, 80.0)
    assert compare.main([run, run + "/", "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert "mean over seeds" not in captured.out and captured.out.count("r-s0") == 1
    assert "given twice, counted once" in captured.err


def _figures(runs: list[str], out_dir: str, monkeypatch) -> list:
    """compare.plot's figures (iterations, rounds, wall), kept for reading after it saved and closed them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        made.append(fig)
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    compare.plot([compare.load_run(d) for d in runs], out_dir)
    return made


def test_a_folder_of_runs_is_its_finished_runs(tmp_path, capsys):
    root = tmp_path / "runs"
    for s in range(2):
        _run(root, f"r-s{s}", s, 10, 80.0 + s)
    unfinished = _run(root, "r-s2", 2, 10, 82.0)
    os.remove(os.path.join(unfinished, "summary.json"))  # still training (or stopped): config.yaml, no summary
    os.makedirs(root / "notes")  # a folder that is no run is passed over in silence
    assert compare.main([str(root)]) == 0
    captured = capsys.readouterr()
    rows = captured.out.split("experiment (mean over seeds)")[0].splitlines()[2:]
    assert [r.split()[0] for r in rows if r.strip()] == ["r-s0", "r-s1"]
    assert "mean over seeds" in captured.out  # the two seeds are one experiment, as when named one by one
    notes = [line for line in captured.err.splitlines() if line.startswith("note: took")]  # (and identical loss)
    assert len(notes) == 1 and "2 runs" in notes[0] and str(root) in notes[0]
    assert "r-s2" in notes[0] and "notes" not in notes[0].replace(str(root), "")
    assert (root / "vs_iterations.png").exists()  # the default --out is the folder
    # the folder and one of its runs named again: that run counts once
    assert compare.main([str(root), str(root / "r-s0"), "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split("experiment (mean over seeds)")[0].count("r-s0") == 1
    assert "given twice, counted once" in captured.err


def test_a_folder_without_a_finished_run_is_an_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    os.makedirs(empty)
    stopped = tmp_path / "stopped"
    run = _run(stopped, "r-s0", 0, 10, 80.0)
    os.remove(os.path.join(run, "summary.json"))
    for folder in (empty, stopped):
        assert compare.main([str(folder), "--no-plots"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "run directories (runs/NAME) or a folder of them" in err and "summary.json" not in err
    assert compare.main([run, "--no-plots"]) == 2  # an unfinished run directory itself is named as such
    err = capsys.readouterr().err
    assert "has not finished" in err and err.count("\n") == 1


def test_a_run_evaluated_once_shows_on_both_panels(tmp_path, monkeypatch):
    run = _run(tmp_path, "once", 0, 10, 80.0)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:  # one evaluation: one point, no line to draw
        f.write(json.dumps({"step": 10, "comm_rounds": 2, "wall_seconds": 1.0, "train_loss": 0.5,
                            "test_acc": 80.0}) + "\n")
    for fig in _figures([run], str(tmp_path / "plots"), monkeypatch):
        for ax in fig.axes[:2]:
            (line,) = ax.get_lines()
            assert len(line.get_xdata()) == 1 and line.get_marker() not in (None, "", "None", " "), ax.get_title()


def test_identical_curves_are_said_to_hide_each_other(tmp_path, monkeypatch, capsys):
    a = _run(tmp_path, "a", 0, 10, 80.0)
    b = _run(tmp_path, "b", 0, 10, 80.0, **{"optimizer.lr": 0.01})  # another experiment, the same curves
    c = _run(tmp_path, "c", 1, 10, 90.0)  # a's seed 1: its accuracy differs, its (fabricated) loss does not
    figs = _figures([a, b, c], str(tmp_path / "plots"), monkeypatch)
    legend = [t.get_text() for t in figs[0].axes[0].get_legend().get_texts()]
    assert legend[0] == "a (RI-SGD tau=5 mu=0.5 [optimizer.lr=0.05])"
    assert legend[1] == "c (RI-SGD tau=5 mu=0.5 [optimizer.lr=0.05])"  # c is a's seed: drawn in a's group
    assert legend[2] == "b (RI-SGD tau=5 mu=0.5 [optimizer.lr=0.01]) (same curve as a)"
    loss_legend = [t.get_text() for t in figs[0].axes[1].get_legend().get_texts()]
    assert loss_legend[1].endswith("(same curve as a)") and loss_legend[2].endswith("(same curve as a)")
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 2, notes
    assert notes[0].startswith("note: runs a and b draw identical curves (one hides the other)")
    assert "test accuracy" in notes[0]
    assert notes[1].startswith("note: runs a, c and b draw identical curves")
    assert "training loss" in notes[1] and "test accuracy" not in notes[1]
