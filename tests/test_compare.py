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
    summary = {"algorithm": cfg["algorithm"], "tau": 5, "mu": cfg["mu"], "world_size": 4, "steps": steps, "seed": seed,
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


def test_every_row_names_what_differs_between_the_runs(tmp_path, capsys):
    """One seed each (no seed table): the per-run rows name the steps, also across labels."""
    a = _run(tmp_path, "a", 0, 10, 80.0)
    b = _run(tmp_path, "b", 0, 100, 90.0)
    c = _run(tmp_path, "c", 0, 100, 90.0, mu=0.25)  # another label, and the steps differ from a's
    assert compare.main([a, b, c, "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "mean over seeds" not in out
    rows = {line.split()[0]: line.split(None, 1)[1].split("  ")[0] for line in out.splitlines()[2:] if line.strip()}
    assert rows == {"a": "RI-SGD tau=5 mu=0.5 [steps=10]", "b": "RI-SGD tau=5 mu=0.5 [steps=100]",
                    "c": "RI-SGD tau=5 mu=0.25 [steps=100]"}
    # runs that differ only in what the label names keep their plain labels
    assert compare.names([compare.load_run(d) for d in (b, c)]) == ["RI-SGD tau=5 mu=0.5", "RI-SGD tau=5 mu=0.25"]


def test_plots_of_other_runs_are_not_replaced_without_force(tmp_path, capsys):
    a = _run(tmp_path / "runs", "a", 0, 10, 80.0)
    b = _run(tmp_path / "runs", "b", 0, 100, 90.0)
    out = tmp_path / "plots"
    assert compare.main([a, "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in out.glob("vs_*.png")}
    assert sorted(first) == ["vs_iterations.png", "vs_rounds.png", "vs_wall.png"]
    capsys.readouterr()
    assert compare.main([a, b, "--out", str(out)]) == 2  # another comparison: refused before any output
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and captured.err.startswith("error: ")
    assert str(out / "vs_iterations.png") in captured.err and "--force" in captured.err and "--out" in captured.err
    assert {p.name: p.read_bytes() for p in out.glob("vs_*.png")} == first
    assert compare.main([a, "--out", str(out)]) == 0  # the same comparison again: its plots are refreshed
    assert compare.main([b, a, "--out", str(out), "--force"]) == 0
    assert all(compare.plotted_runs(str(p)) == "\n".join(sorted(map(os.path.realpath, (a, b))))
               for p in out.glob("vs_*.png"))
    (out / "vs_rounds.png").write_bytes(b"not ours")  # a file compare did not write is not replaced either
    assert compare.main([a, b, "--out", str(out)]) == 2
    assert str(out / "vs_rounds.png") in capsys.readouterr().err


def test_the_legend_covers_no_data(tmp_path, monkeypatch):
    runs = [_run(tmp_path, f"r-s{s}", s, 10, 80.0 + s) for s in range(3)]
    for fig in _figures(runs, str(tmp_path / "plots"), monkeypatch):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(fig)  # (plot closed it) drawn again as savefig drew it
        canvas.draw()
        renderer = canvas.get_renderer()
        tight = fig.get_tightbbox(renderer)  # what savefig's bbox_inches="tight" keeps, in inches
        for ax in fig.axes:
            legend = ax.get_legend()
            if legend is None:
                continue
            box = legend.get_window_extent(renderer)
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
            assert not box.overlaps(ax.xaxis.label.get_window_extent(renderer)), ax.get_title()
            # the legend sets the tight box's edge: its corner lies on it, up to float rounding (a run on CI fell
            # outside by the last bits); 0.01 inch is a pixel at 100 dpi, far below any cut a reader would see
            kept = tight.padded(0.01)
            assert kept.contains(box.x0 / fig.dpi, box.y0 / fig.dpi), "cut off when saved"
            assert kept.contains(box.x1 / fig.dpi, box.y1 / fig.dpi), "cut off when saved"


def _manifest(run_dir: str, workers: list[list[float]]) -> None:
    """A manifest.yaml's part that says which chunks (their fractions) each worker holds."""
    ranks = [{"rank": i, "chunks": [{"chunk": c, "fraction": f, "samples": 100} for c, f in enumerate(chunks)]}
             for i, chunks in enumerate(workers)]
    with open(os.path.join(run_dir, "manifest.yaml"), "w") as f:
        yaml.safe_dump({"version": 1, "ranks": ranks}, f)


def test_images_drawn_is_the_equal_compute_axis(tmp_path, monkeypatch, capsys):
    """RI-SGD's step draws from every chunk a worker holds: per_chunk grows it with mu, split does not."""
    pr = _run(tmp_path, "pr", 0, 10, 80.0, mu=0.0)
    ri = _run(tmp_path, "ri", 0, 10, 90.0)
    split = _run(tmp_path, "split", 0, 10, 90.0, **{"data.batch_policy": "split"})
    bare = _run(tmp_path, "bare", 0, 10, 90.0, mu=0.25)  # no manifest: left out of that plot, with a note
    _manifest(pr, [[1.0]] * 4)
    _manifest(ri, [[1.0, 1.0, 0.5]] * 4)  # 2.5 chunks: 32 + 32 + 16 per worker
    _manifest(split, [[1.0, 1.0, 0.5]] * 4)
    assert [compare.images_per_step(d) for d in (pr, ri, split, bare)] == [128, 320, 128, None]
    figs = _figures([pr, ri, split, bare], str(tmp_path / "plots"), monkeypatch)
    assert len(figs) == 4 and "images drawn" in figs[3].axes[0].get_xlabel()
    xs = {line.get_label().split()[0]: list(line.get_xdata()) for line in figs[3].axes[0].get_lines()}
    assert xs == {"pr": [5 * 128, 10 * 128], "ri": [5 * 320, 10 * 320], "split": [5 * 128, 10 * 128], "bare": []}
    assert "bare not in vs_samples.png" in capsys.readouterr().err
