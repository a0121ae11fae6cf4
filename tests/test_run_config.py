"""The one config path (recipe -> resolved config -> ds_config with its risgd block), checked before
any process group or data work: where rounds end, one source for mu, one default and one validator
per key, and run directories that are never continued under another experiment."""

from __future__ import annotations

import os

import pytest
import torch.distributed as dist
import yaml
from helpers import ROOT

from risgd_data.index import load_index
from risgd_data.manifest import build_manifest, write_manifest
from risgd_ext.config import RISGDConfig, parse_block
from risgd_trainer.run_config import SCHEMA, RecipeError, check_shards_source, experiment_diff, load_recipe, resolve_run

RECIPE = "recipes/digits.yaml"


def resolve(tmp_path, *overrides, world_size=4):
    return resolve_run(RECIPE, [f"runs_dir={tmp_path}", *overrides], world_size)


def test_the_engine_schedule_says_where_averages_fall():
    cfg = RISGDConfig(tau=50, warmup_sync_steps=25)
    averages = [s for s in range(1, 300) if cfg.is_average_step(s)]
    assert averages == list(range(1, 26)) + [75, 125, 175, 225, 275]
    assert cfg.average_steps_near(200) == (175, 225) and cfg.average_steps_near(225) == (225, 225)


def test_a_run_that_cannot_end_on_an_average_is_refused(tmp_path):
    with pytest.raises(RecipeError) as e:
        resolve(tmp_path, "warmup_sync_steps=25", "tau=50", "steps=200")
    assert "use steps=175 or steps=225" in str(e.value) and "\n" not in str(e.value)
    assert resolve(tmp_path, "warmup_sync_steps=25", "tau=50", "steps=225").cfg["steps"] == 225
    # SyncSGD averages every step: any length ends on an average
    assert resolve(tmp_path, "algorithm=sync", "mu=0", "steps=201").risgd is None


def test_epochs_round_up_to_the_next_average(tmp_path):
    run = resolve(tmp_path, "steps=0", "epochs=3", "warmup_sync_steps=25", "tau=50")
    assert run.total_steps(steps_per_epoch=70) == 225  # 210 -> the next average, 225


def test_one_default_per_engine_key():
    defaults = RISGDConfig()
    assert parse_block({}) == defaults  # the parser takes the dataclass's defaults
    for key in ("tau", "warmup_sync_steps", "average_optimizer_state"):
        assert SCHEMA[key] == getattr(defaults, key)


def test_the_engine_validates_the_recipe_keys_it_owns(tmp_path):
    with pytest.raises(RecipeError, match=r"risgd.tau must be an int >= 1, got 0"):
        resolve(tmp_path, "tau=0")
    with pytest.raises(RecipeError, match=r"failures\[0\].ranks \[7\] do not exist in a world of 4"):
        resolve(tmp_path, "failures=[{ranks: [7]}]")


def test_the_ds_config_is_built_once_with_the_risgd_block(tmp_path):
    run = resolve(tmp_path, "tau=20", "warmup_sync_steps=10", "steps=990")
    assert run.ds_config["risgd"]["tau"] == 20 and run.risgd.tau == 20
    assert run.ds_config["train_batch_size"] == 32 * 4
    assert "risgd" not in resolve(tmp_path, "algorithm=sync", "mu=0").ds_config


@pytest.mark.parametrize("overrides, words", [
    (["mu=0.9"], "the override mu=0.9 is out of range"),     # p=4: mu <= 0.75
    (["data.partition=bogus"], "bogus"),
    (["data.hetero_std=-1"], "hetero"),
])
def test_redundancy_keys_are_checked_before_any_data_work(tmp_path, overrides, words):
    with pytest.raises(RecipeError) as e:
        resolve(tmp_path, f"data.shards={tmp_path}/none", *overrides)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "none")


def test_train_stops_on_a_bad_recipe_before_the_process_group(tmp_path, monkeypatch, capsys):
    import train

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert train.main(["--recipe", RECIPE, "mu=0.9", f"data.shards={tmp_path}/none", f"runs_dir={tmp_path}"]) == 2
    assert "the override mu=0.9 is out of range" in capsys.readouterr().err
    assert not dist.is_initialized() and not os.path.exists(tmp_path / "none")
    monkeypatch.setenv("RANK", "3")  # the same error on another rank: rank 0 alone says it
    assert train.main(["--recipe", RECIPE, "mu=0.9", f"runs_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err == ""


def test_the_manifest_is_the_one_source_of_mu(tmp_path, digits_dir):
    path = str(tmp_path / "m.yaml")
    write_manifest(build_manifest(load_index(digits_dir), 4, 0.25, partition="label_sorted"), path)
    # the recipe says mu: 0.5; an explicit contradiction is refused, naming the key and both values
    with pytest.raises(RecipeError) as e:
        resolve(tmp_path, f"data.manifest={path}", "mu=0.5", "data.partition=iid")
    assert "mu=0.5 (manifest: 0.25)" in str(e.value) and "data.partition='iid'" in str(e.value)
    # repeating the manifest's values is fine; leaving them out takes them from the manifest
    run = resolve(tmp_path, f"data.manifest={path}", "mu=0.25")
    assert run.cfg["mu"] == 0.25 and run.name == "digits-risgd-tau50-mu0.25-s0"
    with open(tmp_path / "r.yaml", "w") as f:  # a recipe that does not name mu at all
        yaml.safe_dump({k: v for k, v in yaml.safe_load(open(RECIPE)).items() if k != "mu"}, f)
    run = resolve_run(str(tmp_path / "r.yaml"), [f"runs_dir={tmp_path}", f"data.manifest={path}"], 4)
    assert run.cfg["mu"] == 0.25 and run.cfg["data"]["partition"] == "label_sorted"
    with pytest.raises(RecipeError, match="the manifest .* is for 4 workers but this run has 2 ranks"):
        resolve(tmp_path, f"data.manifest={path}", world_size=2)
    with pytest.raises(RecipeError, match="algorithm coop cannot use the risgd-mode manifest"):
        resolve(tmp_path, f"data.manifest={path}", "algorithm=coop", "mu=0")


def test_an_existing_run_directory_must_hold_the_same_experiment(tmp_path):
    run = resolve(tmp_path, "run_name=a")
    os.makedirs(run.run_dir)
    with open(os.path.join(run.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(run.cfg, f)
    assert not resolve(tmp_path, "run_name=a").finished
    # where things are and how they are logged may change; what is trained may not
    assert not resolve(tmp_path, "run_name=a", "wandb.enabled=false", "eval_every=50", "data.num_workers=2").finished
    with pytest.raises(RecipeError) as e:
        resolve(tmp_path, "run_name=a", "data.partition=iid", "optimizer.lr=0.2")
    msg = str(e.value)
    assert "data.partition: 'label_sorted' -> 'iid'" in msg and "optimizer.lr: 0.05 -> 0.2" in msg
    assert "run_name=" in msg and "\n" not in msg
    with pytest.raises(RecipeError, match="steps: 1000 -> 2000"):  # extending a run changes its schedule
        resolve(tmp_path, "run_name=a", "steps=2000")
    open(os.path.join(run.run_dir, "summary.json"), "w").close()
    assert resolve(tmp_path, "run_name=a").finished


def test_a_default_name_is_made_of_resolved_values_typed_or_not(tmp_path):
    """Issue 46 item 8: a run's default name is made of the resolved configuration: a value typed on the
    command line that equals the recipe's or the default names the run as leaving it out does (a re-run of
    the same experiment finds its directory, however it was spelled)."""
    left_out = resolve(tmp_path).name
    assert left_out == "digits-risgd-tau50-mu0.5-s0"
    for typed in (["tau=50"], ["mu=0.5"], ["seed=0"], ["node_size=1"], ["overlap=false"], ["tau_intra=0"],
                  ["outer_lr=1.0", "outer_momentum=0.0"], ["compress=none"], ["elastic.workers=0"]):
        assert resolve(tmp_path, *typed).name == left_out, typed
    # what changes the experiment changes the name, typed or from the recipe
    assert resolve(tmp_path, "tau=25").name == "digits-risgd-tau25-mu0.5-s0"
    assert resolve(tmp_path, "algorithm=prsgd").name == "digits-prsgd-tau50-mu0-s0"  # the recipe's mu resolved to 0
    assert resolve(tmp_path, "run_name=mine").name == "mine"


def test_experiment_diff_ignores_operational_keys_only():
    a = load_recipe(RECIPE)
    b = load_recipe(RECIPE, ["runs_dir=/elsewhere", "data.shards=/local", "checkpoint_every=100", "seed=1"])
    assert experiment_diff(a, b) == ["seed: 0 -> 1"]


def test_a_warm_up_covering_the_whole_run_is_refused(tmp_path):
    from risgd_trainer.run_config import check_local_steps

    with pytest.raises(RecipeError, match="warmup_sync_steps=25000 covers all 8 steps"):
        resolve_run("recipes/imagenet_resnet50.yaml", ["steps=8", "epochs=0", "data.manifest=null",
                                                       f"runs_dir={tmp_path}"], 8)
    run = resolve_run("recipes/imagenet_resnet50.yaml", ["steps=25050", "epochs=0", "data.manifest=null",
                                                                   f"runs_dir={tmp_path}"], 8)
    assert run.risgd.warmup_sync_steps == 25000  # a local step after the warm-up: accepted
    epochs = resolve_run("recipes/digits.yaml", ["warmup_sync_steps=500", "steps=0", "epochs=2",
                                                 f"runs_dir={tmp_path}"], 4)
    with pytest.raises(RecipeError, match="covers all 100 steps"):
        epochs.total_steps(50)  # epochs: known once the manifest gives the steps per epoch
    check_local_steps({"algorithm": "sync"}, None, 8)  # SyncSGD has no warm-up to speak of


def test_messages_name_the_way_out(tmp_path, digits_dir):
    with pytest.raises(RecipeError, match=r"this run has steps=8, epochs=90; .*'steps=8 epochs=0'"):
        resolve_run("recipes/imagenet_resnet50.yaml", ["steps=8", "data.manifest=null", f"runs_dir={tmp_path}"], 8)
    index = load_index(digits_dir)
    m = str(tmp_path / "two.yaml")
    write_manifest(build_manifest(index, 2, 0.5), m)
    with pytest.raises(RecipeError, match="or run it node-level with node_size=2"):
        resolve_run("recipes/digits.yaml", [f"data.manifest={m}", f"runs_dir={tmp_path}"], 4)


def test_data_max_side_must_match_the_shards_record(tmp_path, digits_dir, monkeypatch, capsys):
    """data.max_side (null: any) is checked against index.json's max_side before any process group or
    data work: one line naming the file and both ways out; train exits 2."""
    from risgd_data.make_shards import make_shards
    from risgd_data.synthetic import write_imagenet_tree

    src, sized = str(tmp_path / "src"), str(tmp_path / "sized")
    write_imagenet_tree(src, 4, 2, classes=2, seed=0)
    make_shards("imagenet", sized, src=src, progress=False, max_side=128)
    assert resolve(tmp_path, f"data.shards={sized}").cfg["data"]["max_side"] is None  # null: any shards
    assert resolve(tmp_path, f"data.shards={sized}", "data.max_side=128").cfg["data"]["max_side"] == 128
    index = os.path.join(sized, "index.json")
    cases = [
        ([f"data.shards={sized}", "data.max_side=256"],
         f"data.max_side=256 but {index} records max_side 128: set data.max_side=128 to train on these shards, "
         f"or remake them with python -m data.make_shards --dataset digits --src SRC --out {sized} --max-side 256"),
        ([f"data.shards={digits_dir}", "data.max_side=320"],
         f"data.max_side=320 but {os.path.join(digits_dir, 'index.json')} records full-size images (made without "
         "--max-side): set data.max_side=null"),
        ([f"data.shards={tmp_path}/none", "data.max_side=320"],
         f"data.max_side=320 but {tmp_path}/none/index.json does not exist"),
        (["data.max_side=0"], "data.max_side must be null (any shards) or the positive --max-side"),
        (["data.max_side=big"], "data.max_side must be null (any shards) or the positive --max-side"),
    ]
    for overrides, words in cases:
        with pytest.raises(RecipeError) as e:
            resolve(tmp_path, *overrides)
        assert str(e.value).startswith(words) and "\n" not in str(e.value), str(e.value)
    assert not os.path.exists(tmp_path / "none")
    import train

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    assert train.main(["--recipe", RECIPE, f"data.shards={sized}", "data.max_side=256", f"runs_dir={tmp_path}"]) == 2
    assert "records max_side 128: set data.max_side=128" in capsys.readouterr().err
    assert not dist.is_initialized()


def test_messages_name_what_the_user_wrote(tmp_path):
    """Issue 33 item 2: a redundancy error names the recipe key as the user wrote it (the override, or
    the recipe file's key and its path), never the make_shards/manifest flags behind it."""
    with pytest.raises(RecipeError) as e:
        resolve(tmp_path, "mu=2", world_size=2)
    assert str(e.value) == ("the override mu=2 is out of range: must be in [0, 0.5] = [0, (p-1)/p] for p=2 workers "
                            "(this launch's 2 ranks): lower mu or launch more ranks")
    with pytest.raises(RecipeError) as e:  # no mu typed: the recipe file's own mu, one rank
        resolve_run("recipes/cifar10_resnet44.yaml", [f"runs_dir={tmp_path}", "steps=100"], 1)
    assert str(e.value).startswith("mu: 0.25 in recipes/cifar10_resnet44.yaml is out of range: must be in [0, 0]")
    assert "for p=1 worker (this launch's 1 rank)" in str(e.value) and "--" not in str(e.value)
    with pytest.raises(RecipeError) as e:
        resolve(tmp_path, "data.partition=bogus")
    assert str(e.value).startswith("the override data.partition=bogus is invalid: use iid, label_sorted")
    with pytest.raises(RecipeError) as e:
        resolve(tmp_path, "data.hetero_std=-1")
    assert str(e.value).startswith("the override data.hetero_std=-1 is invalid")


def test_where_the_shards_come_from_is_checked_before_any_work(tmp_path, monkeypatch, capsys):
    """Issue 33 item 1: a typed data.shards whose parent does not exist is refused in one line and
    nothing is created; a CIFAR run without shards names data.src and data.shards, not --src."""
    monkeypatch.chdir(tmp_path)
    cifar = os.path.join(ROOT, "recipes", "cifar10_resnet44.yaml")
    digits = os.path.join(ROOT, RECIPE)

    def check(recipe, *overrides, world_size=4):
        run = resolve_run(recipe, [f"runs_dir={tmp_path}/runs", *overrides], world_size)
        check_shards_source(run.cfg["data"], run.origins)
        return run

    with pytest.raises(RecipeError) as e:
        check(digits, "data.shards=mistyped/dir/shards")
    assert str(e.value) == ("the override data.shards=mistyped/dir/shards: no shards there and its parent "
                            "mistyped/dir does not exist: fix the path to a directory of shards (one with index.json), "
                            "or create mistyped/dir first to have the shards made there at start")
    with pytest.raises(RecipeError) as e:  # issue 46 item 8: an absolute path is echoed as typed, not relative
        check(digits, "data.shards=/nonexistent-risgd/dir/shards")
    assert str(e.value) == ("the override data.shards=/nonexistent-risgd/dir/shards: no shards there and its parent "
                            "/nonexistent-risgd/dir does not exist: fix the path to a directory of shards (one with "
                            "index.json), or create /nonexistent-risgd/dir first to have the shards made there at "
                            "start")
    with pytest.raises(RecipeError) as e:
        check(cifar, "algorithm=sync", "mu=0", "data.shards=fresh", world_size=1)
    assert str(e.value).startswith(f"the override data.shards=fresh holds no shards (no index.json there), and "
                                   f"data.src: cifar-10-python.tar.gz in {cifar}, from which they would be made at "
                                   "start, is not a file: point data.shards at shards made by make_shards, or set "
                                   "data.src to the cifar10 source")
    with pytest.raises(RecipeError, match="and data.src, from which they would be made at start, is not set"):
        check(cifar, "algorithm=sync", "mu=0", "data.shards=fresh", "data.src=null", world_size=1)
    # the recipe's own path is made with its parents (the bundled shards/digits on a fresh clone)
    assert check(digits).cfg["data"]["shards"] == "shards/digits"
    # a typed path whose parent exists is where the digits shards are made at start
    assert check(digits, "data.shards=new").cfg["data"]["shards"] == "new"
    assert os.listdir(tmp_path) == []  # nothing was created by any of it
    import train

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert train.main(["--recipe", cifar, "data.shards=mistyped/dir2", "steps=100", "algorithm=sync", "mu=0",
                       f"runs_dir={tmp_path}/runs"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: the override data.shards=mistyped/dir2: no shards there")
    assert not dist.is_initialized() and os.listdir(tmp_path) == []


def _flat_keys(cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for key, value in cfg.items():
        out += _flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return out


def test_every_recipe_key_is_one_declaration_with_its_default_and_validator(tmp_path):
    """Issue 45 item 4: the recipe's keys are typed records (trainer.run_config.Recipe): each key of a
    resolved recipe (what config.yaml holds, in its order) is one field with its default and validator,
    and that validator refuses a value of another type in one line naming the key and the fix."""
    from dataclasses import MISSING

    from risgd_ext.config import recipe_keys
    from risgd_trainer.run_config import RecipeCheck, declared_keys

    declared = declared_keys()
    cfg = resolve(tmp_path).cfg
    assert [k for k in _flat_keys(cfg) if k != "recipe"] == list(declared)  # every key, in config.yaml's order
    assert _flat_keys(SCHEMA) == list(declared)
    for key, f in declared.items():
        assert f.default is not MISSING or f.default_factory is not MISSING, key
        check = f.metadata["check"]
        assert isinstance(check, RecipeCheck), key
        with pytest.raises(RecipeError) as e:
            check(key, object())
        said = str(e.value)
        assert said.startswith(f"recipe key '{key}' must be ") and said.endswith(": fix the recipe or the override")
        assert "\n" not in said
    for key, default in recipe_keys().items():  # the engine's recipe keys: their defaults are the engine's
        assert SCHEMA[key] == default and key in declared


@pytest.mark.parametrize("key", ["floor_wait_s", "op_timeout_s", "quorum_timeout_s"])
def test_a_bound_is_checked_in_one_place(tmp_path, key):
    """Issue 45 item 4: a seconds key's bound is risgd_common.bounds.POSITIVE_SECONDS on both sides, the
    recipe's elastic.KEY and the engine's risgd.KEY: the same bad value is refused in the same words by the
    same checker, each side naming its own file."""
    from risgd_common.bounds import POSITIVE_SECONDS
    from risgd_ext.config import KEYS, ConfigError
    from risgd_trainer.run_config import declared_keys

    assert declared_keys()[f"elastic.{key}"].metadata["check"].bound is POSITIVE_SECONDS
    assert KEYS[key].metadata["check"].bound is POSITIVE_SECONDS
    for bad in (0, -1.5):
        with pytest.raises(RecipeError) as recipe_side:
            resolve(tmp_path, "elastic.workers=3", f"elastic.{key}={bad}")
        with pytest.raises(ConfigError) as engine_side:
            parse_block({key: bad})
        assert str(recipe_side.value) == POSITIVE_SECONDS.message(f"elastic.{key}", float(bad),
                                                                  "fix the recipe or the override")
        assert str(engine_side.value) == POSITIVE_SECONDS.message(f"risgd.{key}", bad, "fix it in the ds_config")
        assert f"must be a number of seconds > 0, got {float(bad)!r}" in str(recipe_side.value)


def test_every_seconds_key_is_bounded_by_the_one_seconds_bound(tmp_path):
    """Every key named *_s, recipe or engine, is a number of seconds > 0 checked by POSITIVE_SECONDS (a new
    one with its own hand-written check fails here); dist_timeout_s=0 (every collective timing out at
    once) is refused before any work."""
    from risgd_common.bounds import POSITIVE_SECONDS
    from risgd_ext.config import KEYS
    from risgd_trainer.run_config import declared_keys

    recipe = {k: f.metadata["check"].bound for k, f in declared_keys().items() if k.endswith("_s")}
    engine = {k: f.metadata["check"].bound for k, f in KEYS.items() if k.endswith("_s")}
    assert "dist_timeout_s" in recipe and len(recipe) == 4 and len(engine) == 3
    assert all(bound is POSITIVE_SECONDS for bound in [*recipe.values(), *engine.values()])
    with pytest.raises(RecipeError) as e:
        resolve(tmp_path, "dist_timeout_s=0")
    assert str(e.value) == "dist_timeout_s must be a number of seconds > 0, got 0: fix the recipe or the override"
    assert resolve(tmp_path, "dist_timeout_s=60").cfg["dist_timeout_s"] == 60  # kept as typed, an int


def test_the_bounds_refuse_what_they_say():
    from risgd_common.bounds import FRACTION, PROBABILITY, SHARE, at_least, within

    assert FRACTION.what == "a number in [0, 1)" and FRACTION.ok(0) and not FRACTION.ok(1)
    assert PROBABILITY.ok(1) and not PROBABILITY.ok(True) and not PROBABILITY.ok(-0.1)
    assert SHARE.what == "a number in (0, 1)" and not SHARE.ok(0) and SHARE.ok(0.5) and not SHARE.ok(1)
    assert within(2, 4, "(]").ok(4) and not within(2, 4, "(]").ok(2)
    assert at_least(1).ok(1) and not at_least(1).ok(True) and not at_least(1).ok(1.0)
    assert at_least(1).or_null().ok(None) and at_least(1).or_null().what == "an int >= 1 or null"
