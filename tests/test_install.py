"""What `pip install` gives: a wheel built from this tree carries the trainer, the recipes and the
ds_configs; installed into a fresh virtual environment (no checkout on its path), its commands run
from any directory; a missing optional dependency is one `error:` line naming the extra (exit 2);
usage lines and hints name the command the way it was run."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from helpers import ROOT

from risgd_common import install
from risgd_tools import launch as launch_mod
from risgd_trainer.run_config import RecipeError, find_ds_config, load_recipe, resolve_run

pytestmark = pytest.mark.slow  # `make quick` leaves these out (see pyproject's markers)

def _env() -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("WANDB_", "PYTHON", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """Built from a copy of the tree: a build/ folder left in the checkout is never reused."""
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src") / "risgd"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "runs",
                                                             "shards", "reports", "wandb", "__pycache__", ".*cache"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = glob.glob(str(out / "risgd-*.whl"))
    return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> str:
    """A fresh venv holding the wheel alone; the heavy dependencies come from this interpreter's
    site-packages by a .pth line (which adds the folder only: its editable finder of the checkout is
    not run, so nothing of the checkout is importable there)."""
    root = str(tmp_path_factory.mktemp("venv"))
    subprocess.run([_base_python(), "-m", "venv", "--without-pip", root], check=True, timeout=120)
    python = os.path.join(root, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", wheel],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(root, "bin")


def _base_python() -> str:
    """The interpreter this one's venv was made from (a venv made by a venv's python would do too)."""
    for name in ("python3", "python"):
        path = os.path.join(sys.base_prefix, "bin", name)
        if os.path.exists(path):
            return path
    return sys.executable


def test_the_wheel_carries_the_trainer_the_recipes_and_the_ds_configs(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "risgd_trainer/train.py" in names and "risgd_tools/launch.py" in names
    recipes = [n for n in os.listdir(os.path.join(ROOT, "recipes")) if n.endswith(".yaml")]
    configs = [n for n in os.listdir(os.path.join(ROOT, "ds_configs")) if n.endswith(".json")]
    assert recipes and configs
    assert {f"risgd_recipes/{n}" for n in recipes} <= names
    assert {f"risgd_recipes/ds_configs/{n}" for n in configs} <= names
    assert "risgd-train = risgd_trainer.train:main" in entry_points
    assert "risgd-cost-model = risgd_planner.cli:main" in entry_points  # the planner's room (issue 45 item 2)
    assert not any(n.split("/")[0] in ("data", "models", "recipes", "trainer", "tools", "hosts", "train.py")
                   for n in names)
    # every package of the tree is in the wheel (a new subpackage must be listed in pyproject's packages)
    installed = {"data": "risgd_data", "models": "risgd_models", "recipes": "risgd_recipes",
                 "trainer": "risgd_trainer", "tools": "risgd_tools", "hosts": "risgd_hosts", "risgd_ext": "risgd_ext",
                 "risgd_common": "risgd_common", "risgd_planner": "risgd_planner"}
    for folder, name in installed.items():
        for init in glob.glob(os.path.join(ROOT, folder, "**", "__init__.py"), recursive=True):
            rel = os.path.relpath(init, os.path.join(ROOT, folder)).replace(os.sep, "/")
            assert f"{name}/{rel}" in names, f"{name}/{rel} is not in the wheel: add its package to pyproject.toml"


def test_installed_risgd_train_trains_a_bundled_recipe_from_any_directory(venv, tmp_path, digits_dir):
    proc = subprocess.run([os.path.join(venv, "risgd-train"), "--recipe", "digits", "algorithm=sync", "mu=0",
                           "steps=2", "eval_every=0", "wandb.enabled=false", f"data.shards={digits_dir}",
                           "run_name=r"], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with open(tmp_path / "runs" / "r" / "summary.json") as f:
        summary = json.load(f)
    assert summary["steps"] == 2 and summary["world_size"] == 1
    assert f"{os.sep}site-packages{os.sep}risgd_recipes{os.sep}digits.yaml" in os.path.abspath(
        os.path.join(tmp_path, summary["recipe"]))  # the bundled recipe, not the checkout's


def test_installed_launcher_starts_the_trainer_and_relays_its_refusal(venv, tmp_path):
    """What `risgd-demo` and `risgd-paper` do: a real `deepspeed` launch of the installed trainer."""
    code = ("import risgd_tools.launch as l; assert '/site-packages/' in l.__file__, l.__file__; "
            "l.launch('recipes/digits.yaml', 1, ['bogus=1'], 'x.log')")
    proc = subprocess.run([os.path.join(venv, "python"), "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=_env())
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown recipe key(s) ['bogus']"), proc.stderr
    assert lines[0].endswith("(log: x.log)")


def test_a_failed_start_of_the_trainer_is_exit_1_not_bad_input(tmp_path, monkeypatch, capsys):
    """Python's own exit 2 (e.g. a trainer file it cannot open) carries no `error:` line: a failure."""
    log = str(tmp_path / "run.log")

    class FakePopen:  # a Python that could not start the trainer: exit 2, no `error:` line of ours
        def __init__(self, cmd, cwd, stdout, stderr):
            assert "--module" in cmd and launch_mod.TRAINER in cmd and os.path.isdir(cwd)
            stdout.write("python: can't open file '/x/site-packages/train.py': [Errno 2] No such file or directory\n")
            self.returncode = 2

        def poll(self) -> int:
            return self.returncode

        wait = poll

    monkeypatch.setattr(launch_mod.subprocess, "Popen", FakePopen)
    with pytest.raises(SystemExit) as e:
        launch_mod.launch("recipes/digits.yaml", 2, [], log)
    assert e.value.code == 1
    assert capsys.readouterr().err == f"error: run failed (exit 2): see {log}\n"


def _recipe(path, ds_config: str) -> str:
    with open(os.path.join(ROOT, "recipes", "digits.yaml")) as f:
        text = f.read().replace("ds_config: ds_configs/digits.json", f"ds_config: {ds_config}")
    assert f"ds_config: {ds_config}" in text
    path.write_text(text)
    return str(path)


def test_ds_config_is_found_next_to_the_recipe_then_among_the_bundled(tmp_path, monkeypatch):
    (tmp_path / "exp").mkdir()
    (tmp_path / "elsewhere").mkdir()
    with open(os.path.join(ROOT, "ds_configs", "digits.json")) as f:
        (tmp_path / "exp" / "mine.json").write_text(f.read())
    mine = _recipe(tmp_path / "exp" / "mine.yaml", "mine.json")
    bundled = _recipe(tmp_path / "exp" / "bundled.yaml", "ds_configs/imagenet.json")
    missing = _recipe(tmp_path / "exp" / "missing.yaml", "nope.json")
    monkeypatch.chdir(tmp_path / "elsewhere")  # not where the recipe is, not a checkout
    assert find_ds_config("mine.json", mine) == str(tmp_path / "exp" / "mine.json")
    assert find_ds_config("ds_configs/imagenet.json", bundled) == os.path.join(install.CHECKOUT or "",
                                                                              "ds_configs", "imagenet.json")
    run = resolve_run(mine, [f"runs_dir={tmp_path}/runs"], world_size=4)
    assert run.cfg["ds_config"] == "mine.json"  # the recipe keeps what it says (an experiment key)
    # the checkout's own recipes from another directory: ds_configs/ beside recipes/
    cfg = load_recipe(os.path.join(ROOT, "recipes", "imagenet_resnet50.yaml"))
    assert find_ds_config(cfg["ds_config"], cfg["recipe"]) == os.path.join(ROOT, "ds_configs", "imagenet.json")
    with pytest.raises(RecipeError) as e:
        resolve_run(missing, [f"runs_dir={tmp_path}/runs"], world_size=4)
    assert "ds_config nope.json not found" in str(e.value) and "ds_configs/digits.json" in str(e.value)
    assert "\n" not in str(e.value)
    monkeypatch.chdir(ROOT)  # as always: relative to the working directory first
    assert find_ds_config("ds_configs/digits.json", mine) == "ds_configs/digits.json"


def test_a_recipe_is_found_by_name_and_by_path(tmp_path, monkeypatch):
    from risgd_trainer.train import locate_recipe

    monkeypatch.chdir(tmp_path)
    bundled = os.path.join(ROOT, "recipes", "digits.yaml")
    assert locate_recipe("digits") == locate_recipe("digits.yaml") == locate_recipe("recipes/digits.yaml") == bundled
    (tmp_path / "digits.yaml").write_text("name: mine\n")  # a file of that name here wins
    assert locate_recipe("digits.yaml") == "digits.yaml"
    with pytest.raises(RecipeError) as e:
        locate_recipe("nosuch")
    assert "recipe nosuch not found" in str(e.value) and "digits" in str(e.value)


def test_a_missing_extra_is_one_error_line_naming_it(tmp_path, monkeypatch, capsys, digits_dir):
    from risgd_data import make_shards
    from risgd_tools import compare, demo

    for name in ("sklearn", "sklearn.datasets", "sklearn.model_selection"):
        monkeypatch.setitem(sys.modules, name, None)  # as if scikit-learn were not installed
    assert make_shards.main(["--dataset", "digits", "--out", str(tmp_path / "s"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: scikit-learn is not installed"), err
    assert "[train]'" in err[0] and not os.path.exists(tmp_path / "s" / "index.json")

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "algorithm": "sync", "tau": 1, "mu": 0.0, "comm_rounds": 1, "comm_bytes": 1.0, "comm_seconds": 0.1,
        "wall_seconds": 1.0, "final_test_acc": 10.0, "best_test_acc": 10.0, "final_train_loss": 2.0, "seed": 0}))
    (run / "metrics.jsonl").write_text("")
    assert compare.main([str(run), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: matplotlib is not installed") and "[train]'" in err[0]
    assert compare.main([str(run), "--no-plots"]) == 0
    capsys.readouterr()
    # the demo says so before it launches anything
    assert demo.main(["--runs-dir", str(tmp_path / "demo"), f"data.shards={digits_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "matplotlib is not installed" in err[0] and not os.path.exists(tmp_path / "demo")


def test_the_trainer_checks_its_extras_before_the_process_group(tmp_path, monkeypatch, capsys, digits_dir):
    import torch.distributed as dist

    from risgd_trainer import train

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = ["--recipe", "digits", f"data.shards={digits_dir}", f"runs_dir={tmp_path}", "steps=10", "tau=5"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: wandb is not installed, and logging to wandb"), err
    assert "wandb.enabled=false" in err[0] and not dist.is_initialized()


def test_usage_lines_and_hints_name_the_command_as_it_was_run(monkeypatch, tmp_path, capsys):
    from risgd_data.errors import DataError
    from risgd_data.manifest import load_manifest
    from risgd_data.manifest import main as manifest_main

    def hint() -> str:
        with pytest.raises(DataError) as e:
            load_manifest(str(tmp_path / "none.yaml"))
        return str(e.value)

    monkeypatch.setattr(sys, "argv", ["/venv/bin/risgd-manifest", "build"])
    assert "run risgd-manifest build" in hint()
    with pytest.raises(SystemExit):
        manifest_main(["--help"])
    assert capsys.readouterr().out.startswith("usage: risgd-manifest ")
    monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, "data", "manifest.py")])  # python -m data.manifest
    assert ("run python -m data.manifest build" if install.CHECKOUT else "run risgd-manifest build") in hint()
    assert install.command("train.py") == ("python train.py" if install.CHECKOUT else "risgd-train")


def _concurrently(commands: list[tuple[list[str], str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run each (command, working directory) at once (each pays Python's and torch's start-up: side by side
    they share the cores) and return what each printed, in order."""
    procs = [subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for cmd, cwd in commands]
    done = []
    for (cmd, _), proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return done


def test_every_installed_command_answers_help_from_any_directory(venv, tmp_path):
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        commands = tomllib.load(f)["project"]["scripts"]
    assert "risgd-elastic" in commands
    procs = _concurrently([([os.path.join(venv, name), "--help"], str(tmp_path)) for name in commands])
    for name, proc in zip(commands, procs):
        assert proc.returncode == 0 and "usage:" in proc.stdout.lower(), (name, proc.stdout[-800:], proc.stderr[-1500:])


# Every documented command with bad input, in the checkout form (python -m FOLDER.MODULE from the
# root) and the installed form (risgd-*): one `error:` line and exit 2 (issue 34: `python -m
# tools.demo --recipe nosuch` printed a traceback of a second RecipeError class and exited 1).
BAD_INPUT = [
    ("data.make_shards", "risgd-make-shards", ["--dataset", "nosuch", "--out", "OUT"]),
    ("data.manifest", "risgd-manifest", ["build", "--index", "nosuch/index.json", "--workers", "4", "--out", "m.yaml"]),
    ("data.replicate", "risgd-replicate", ["--manifest", "nosuch.yaml", "--source", "s", "--dest", "d",
                                           "--node-rank", "0", "--ranks-per-node", "1"]),
    ("tools.compare", "risgd-compare", ["nosuch"]),
    ("tools.demo", "risgd-demo", ["--recipe", "nosuch"]),
    ("tools.paper", "risgd-paper", ["--recipe", "nosuch"]),
    ("risgd_planner", "risgd-cost-model", ["--nodes", "0", "--bandwidth-gbit", "1", "--compute-ms", "1"]),
    ("risgd_ext.cost_model", None, ["--nodes", "0", "--bandwidth-gbit", "1", "--compute-ms", "1"]),  # its old name
    ("hosts.netns_cluster", "risgd-netns-cluster", ["--hosts", "0", "--", "true"]),
    ("recipes.netns_cluster", None, ["--hosts", "0", "--", "true"]),
    ("train.py", "risgd-train", ["--recipe", "nosuch"]),
]


def _one_error_line(proc: subprocess.CompletedProcess, what: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        (what, proc.returncode, proc.stdout[-800:], proc.stderr[-2000:])


@pytest.mark.parametrize("module, installed, args", BAD_INPUT, ids=[m for m, _, _ in BAD_INPUT])
def test_every_documented_command_refuses_bad_input_in_one_line_in_both_forms(module, installed, args, venv,
                                                                             tmp_path):
    out = str(tmp_path / "out")
    args = [out if a == "OUT" else a for a in args]
    checkout = [sys.executable, "train.py"] if module == "train.py" else [sys.executable, "-m", module]
    forms = [([*checkout, *args], ROOT)]
    if installed:
        forms.append(([os.path.join(venv, installed), *args], str(tmp_path)))
    for (cmd, _), proc in zip(forms, _concurrently(forms)):
        _one_error_line(proc, " ".join(cmd[:3]))
    assert not os.path.exists(out)  # bad input loses nothing and makes nothing


def test_no_file_loads_under_two_module_names(tmp_path):
    """A checkout's folder names (data, recipes, models, hosts) are the installed packages themselves:
    importing by either name, or running `python -m recipes.X`, loads each file once."""
    code = """
import os, runpy, sys
for name in ("tools.demo", "recipes.demo", "risgd_recipes.demo"):  # the room's name, and the names before the move
    sys.argv = [name, "--recipe", "nosuch"]
    try:
        runpy.run_module(name, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        assert e.code == 2, (name, e.code)
import data.manifest, trainer.run_config, models, hosts.local, risgd_trainer.run_config, risgd_data.manifest
assert trainer.run_config is risgd_trainer.run_config and data.manifest is risgd_data.manifest
import recipes.config, recipes.paper.grid, risgd_recipes.train, risgd_recipes.paper.experiments.fig2, tools.paper.grid
import risgd_trainer.train, risgd_tools.paper.experiments.fig2
assert recipes.config is risgd_trainer.run_config and recipes.paper.grid is tools.paper.grid
assert risgd_recipes.train is risgd_trainer.train
assert risgd_recipes.paper.experiments.fig2 is risgd_tools.paper.experiments.fig2
from risgd_recipes.config import RecipeError
assert RecipeError is risgd_trainer.run_config.RecipeError
root = os.getcwd()
seen = {}
for name, m in list(sys.modules.items()):  # __main__ (and multiprocessing's name of it) ran the alias's two lines
    f = getattr(m, "__file__", None)
    mine = f and os.path.abspath(f).startswith(root + os.sep) and not os.path.abspath(f).startswith(
        os.path.join(root, ".venv") + os.sep)
    if mine and name not in ("__main__", "__mp_main__"):
        seen.setdefault(os.path.abspath(f), set()).add(id(m))
twice = {f: n for f, n in seen.items() if len(n) > 1}
assert not twice, twice
print("ok", len(seen))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=_env())
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]
