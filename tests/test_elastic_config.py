"""The recipe keys of an elastic run, checked before any process group: what it supports, how
many ranks a launch may have, and the one-experiment rule (the world size may change only in an
elastic run; the floor may be changed on a continued run)."""

from __future__ import annotations

import os

import pytest
import yaml

from risgd_trainer.run_config import RecipeError, resolve_run

RECIPE = "recipes/digits.yaml"


def resolve(tmp_path, *overrides, world_size=3):
    return resolve_run(RECIPE, [f"runs_dir={tmp_path}", "run_name=el", *overrides], world_size)


def test_an_elastic_run_resolves_at_any_world_size_up_to_its_workers(tmp_path):
    for world_size in (3, 2, 1):
        run = resolve(tmp_path, "elastic.workers=3", world_size=world_size)
        assert run.elastic and run.manifest_workers == 3 and run.world_size == world_size
    fixed = resolve(tmp_path, world_size=3)
    assert not fixed.elastic and fixed.manifest_workers == 3
    with pytest.raises(RecipeError, match="this launch has 4 ranks but the elastic run has elastic.workers=3"):
        resolve(tmp_path, "elastic.workers=3", world_size=4)


@pytest.mark.parametrize("override, named", [("algorithm=sync", "algorithm='sync'"), ("node_size=3", "node_size=3"),
                                             ("overlap=true", "overlap=True"),
                                             ("failures=[{ranks: [1], start_round: 1}]", "failures=")])
def test_what_an_elastic_run_does_not_support_yet_is_refused_in_one_line(tmp_path, override, named):
    with pytest.raises(RecipeError) as e:
        resolve(tmp_path, "elastic.workers=3", override, "mu=0" if override == "algorithm=sync" else "mu=0.5")
    assert "an elastic run (elastic.workers=3) needs" in str(e.value) and named in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override", ["elastic.workers=-1", "elastic.min_workers=0", "elastic.min_coverage=1.5",
                                      "elastic.min_workers=4"])
def test_the_floor_keys_are_validated(tmp_path, override):
    with pytest.raises(RecipeError, match="elastic"):
        resolve(tmp_path, "elastic.workers=3", override)


def test_the_world_size_may_change_only_in_an_elastic_run(tmp_path):
    run = resolve(tmp_path, "elastic.workers=3")
    os.makedirs(run.run_dir)
    with open(os.path.join(run.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(run.cfg, f)
    # continued at fewer ranks, with another floor: the same experiment
    assert not resolve(tmp_path, "elastic.workers=3", "elastic.min_coverage=0.5", world_size=2).finished
    # continued as a fixed-size run: another experiment
    with pytest.raises(RecipeError, match="elastic.workers: 3 -> 0"):
        resolve(tmp_path, world_size=2)
