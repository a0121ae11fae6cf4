"""The suite's one harness: the checkout's root, a child's environment, and a launch of the trainer
through the product's own launcher command (``risgd_tools.launch.command``). Test modules import
it as ``from helpers import ...`` (pytest puts tests/ on the path); fixtures live in conftest.py."""

from __future__ import annotations

import os
import subprocess

import yaml

from risgd_tools.launch import command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = "recipes/digits.yaml"


def clean_env(**extra: str) -> dict:
    """This process's environment for a child run: no WANDB_* (offline, no account), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(extra)
    return env


def trainer_command(overrides: list[str], ranks: int = 2, recipe: str = DIGITS, port: int | None = None,
                    plan: str | None = None) -> list[str]:
    """``deepspeed --num_gpus RANKS train.py --recipe RECIPE OVERRIDES`` (the checkout's train.py), to
    run in :data:`ROOT`."""
    return command(recipe, ranks, overrides, plan=plan, port=port, trainer=os.path.join(ROOT, "train.py"))


def launch_trainer(overrides: list[str], ranks: int = 2, recipe: str = DIGITS, port: int | None = None,
                   env_extra: dict | None = None, timeout: float = 600,
                   plan: list[list[str]] | None = None, plan_dir: str | None = None) -> subprocess.CompletedProcess:
    """A real launch of the trainer, waited for, its output captured. With ``plan`` (a list of runs, each a
    list of overrides; written to ``plan_dir``/plan.yaml) the runs train one after another in the launch's
    one process group (``train.py --plan``): what several tests' runs share, so they pay one start-up."""
    plan_path = None
    if plan is not None:
        plan_path = os.path.join(plan_dir or ".", "plan.yaml")
        with open(plan_path, "w") as f:
            yaml.safe_dump(plan, f)
    return subprocess.run(trainer_command(overrides, ranks, recipe, port, plan=plan_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=clean_env(**(env_extra or {})))
