"""The recipe keys of an elastic run, checked before any process group: a launch is one node (its ranks
the node level), what it refuses (torchrun's retired path among them), and the one-experiment rule (the
floor may be changed on a continued run; an elastic run is not continued as a fixed one)."""

from __future__ import annotations

import os

import pytest
import yaml

from risgd_common.ports import free_port
from risgd_trainer.run_config import RecipeError, resolve_run

RECIPE = "recipes/digits.yaml"


def resolve(tmp_path, *overrides, world_size=3):
    return resolve_run(RECIPE, [f"runs_dir={tmp_path}", "run_name=el", *overrides], world_size)


def test_an_elastic_launch_is_one_node_whatever_its_ranks(tmp_path):
    for world_size in (3, 2, 1):
        run = resolve(tmp_path, "elastic.workers=3", world_size=world_size)
        assert run.elastic and run.manifest_workers == 3 and run.world_size == world_size
        assert run.risgd.node_size == world_size and run.risgd.fault_tolerance == "torchft"
    fixed = resolve(tmp_path, world_size=3)
    assert not fixed.elastic and fixed.manifest_workers == 3 and fixed.risgd.fault_tolerance == "none"
    # the node level, overlap, compression and simulated failures compose with it
    run = resolve(tmp_path, "elastic.workers=3", "overlap=true", "compress=int8",
                  "failures=[{ranks: [1], start_round: 1, end_round: 2}]", world_size=2)
    assert run.risgd.overlap and run.risgd.compress == "int8" and run.risgd.failures


@pytest.mark.parametrize("override, said", [
    ("algorithm=sync", "an elastic run needs algorithm prsgd or risgd, got 'sync'"),
    ("node_size=2", "an elastic run's launch is one node: node_size=2 must be its 4 ranks"),
    ("elastic.backend=torchrun", "elastic.backend=torchrun was retired"),
    ("elastic.backend=etcd", "elastic.backend must be torchft, got 'etcd'")])
def test_what_an_elastic_run_refuses_is_one_line(tmp_path, override, said):
    with pytest.raises(RecipeError) as e:
        resolve(tmp_path, "elastic.workers=3", override, "mu=0" if override == "algorithm=sync" else "mu=0.5",
                world_size=4)
    assert said in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override", ["elastic.workers=-1", "elastic.min_workers=0", "elastic.min_coverage=1.5",
                                      "elastic.min_workers=4"])
def test_the_floor_keys_are_validated(tmp_path, override):
    with pytest.raises(RecipeError, match="elastic"):
        resolve(tmp_path, "elastic.workers=3", override)


def test_a_continued_elastic_run_may_change_its_floor_but_not_become_fixed(tmp_path):
    run = resolve(tmp_path, "elastic.workers=3")
    os.makedirs(run.run_dir)
    saved = dict(run.cfg, elastic=dict(run.cfg["elastic"], backend="torchrun"))  # saved before torchft was the only
    with open(os.path.join(run.run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(saved, f)
    # continued with another floor (and a record that still says torchrun): the same experiment
    assert not resolve(tmp_path, "elastic.workers=3", "elastic.min_coverage=0.5").finished
    # continued as a fixed-size run: another experiment
    with pytest.raises(RecipeError, match="elastic.workers: 3 -> 0"):
        resolve(tmp_path, world_size=3)


def test_an_elastic_run_has_a_default_name_of_its_own(tmp_path):
    """Issue 46 item 8: an elastic run took a fixed run's default name (elastic.workers was not in it), and was
    then refused beside that fixed run's directory as another experiment. It is named -elasticP; a run started
    under the old name is still found by the same command (and said so), an explicit run_name= is kept."""
    def run(*overrides, world_size=1):
        return resolve_run(RECIPE, [f"runs_dir={tmp_path}", *overrides], world_size)

    def save(r):
        os.makedirs(r.run_dir)
        with open(os.path.join(r.run_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(r.cfg, f)

    fixed = run(world_size=4)
    save(fixed)
    elastic = run("elastic.workers=4")
    assert elastic.name == "digits-risgd-tau50-elastic4-mu0.5-s0" and elastic.name != fixed.name
    assert not elastic.finished and elastic.notes == []  # beside the fixed run, not refused as its experiment
    assert run("elastic.workers=4", world_size=2).name == "digits-risgd-tau50-elastic4-node2-mu0.5-s0"
    assert run("elastic.workers=4", "run_name=mine").name == "mine"
    # an elastic run started before the tag: the same command continues it in its directory
    old = run("elastic.workers=4", "seed=1")
    legacy = os.path.join(str(tmp_path), "digits-risgd-tau50-mu0.5-s1")
    os.makedirs(legacy)
    with open(os.path.join(legacy, "config.yaml"), "w") as f:
        yaml.safe_dump(old.cfg, f)
    again = run("elastic.workers=4", "seed=1")
    assert again.run_dir == legacy and not again.finished
    assert again.notes == [f"note: continuing {legacy}, this run's directory under its name from before elastic "
                           "runs were named -elastic4 (a new elastic run is named "
                           "digits-risgd-tau50-elastic4-mu0.5-s1)"]
    assert run("elastic.workers=4", "seed=1", "elastic.min_workers=2").run_dir == legacy  # operational: the same
    # not where the old name holds another experiment, nor once the new directory exists
    assert run("elastic.workers=4", "seed=1", "optimizer.lr=0.2").name == "digits-risgd-tau50-elastic4-mu0.5-s1"
    os.makedirs(os.path.join(str(tmp_path), "digits-risgd-tau50-elastic4-mu0.5-s1"))
    assert run("elastic.workers=4", "seed=1").name == "digits-risgd-tau50-elastic4-mu0.5-s1"


def test_a_node_whose_store_port_is_taken_is_refused_in_one_line():
    """Issue 46: two nodes on one machine without their own --master-port both took 29500 and one died with a
    30-line EADDRINUSE traceback. The port is checked before anything starts: one line naming --master-port."""
    import socket

    from risgd_tools.elastic_launch import LaunchError, parse

    argv = ["--lighthouse", "http://127.0.0.1:1", "--master-port"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(LaunchError) as e:
            parse([*argv, str(port), "--", "--recipe", "digits", "elastic.workers=2"])
        assert str(e.value) == (f"port {port} on 127.0.0.1 is taken (another node on this machine?): give each node "
                                "on one machine its own --master-port")
    args, _ = parse([*argv, str(port), "--", "--recipe", "digits", "elastic.workers=2"])  # free again
    assert args.master_port == port


def test_torchft_is_quiet_unless_asked():
    """Issue 45 item 5: torchft logs every quorum (each member's address) and commit at INFO. A node keeps its
    warnings and errors only (RUST_LOG=error for its Rust side, unless the user set RUST_LOG; its Python loggers
    at WARNING); RISGD_VERBOSE=1, or risgd-elastic --verbose, which sets it for the node's ranks, shows them."""
    import logging

    from risgd_ext.live import TORCHFT_LOGGERS, VERBOSE_ENV, torchft_logging
    from risgd_tools import elastic_launch

    loggers = [logging.getLogger(name) for name in TORCHFT_LOGGERS]
    kept = [(lg.level, list(lg.handlers), lg.propagate) for lg in loggers]
    try:
        for env in ({}, {VERBOSE_ENV: "0"}, {VERBOSE_ENV: ""}):
            assert not torchft_logging(env) and env.get("RUST_LOG") == "error"
            assert all(not lg.isEnabledFor(logging.INFO) and lg.isEnabledFor(logging.WARNING) for lg in loggers)
        env = {"RUST_LOG": "torchft=debug"}  # the user's own: kept
        assert not torchft_logging(env) and env["RUST_LOG"] == "torchft=debug"
        env = {VERBOSE_ENV: "1"}
        assert torchft_logging(env) and "RUST_LOG" not in env  # torchft's Rust default: INFO
        assert all(lg.isEnabledFor(logging.INFO) and lg.handlers for lg in loggers)  # shown (a handler of their own)
    finally:
        for lg, (level, handlers, propagate) in zip(loggers, kept):
            lg.setLevel(level)
            lg.handlers[:] = handlers
            lg.propagate = propagate
    # risgd-elastic --verbose: the same variable, for the ranks it starts
    assert elastic_launch.VERBOSE_ENV == VERBOSE_ENV
    argv = ["--master-port", str(free_port()), "--lighthouse", "http://127.0.0.1:1", "--", "elastic.workers=2"]
    assert elastic_launch.parse(["--verbose", *argv])[0].verbose and not elastic_launch.parse(argv)[0].verbose


def test_a_node_behind_the_run_may_not_write_and_a_finished_run_is_over_for_a_node_short_of_its_end(digits_dir,
                                                                                                   tmp_path):
    """Issue 43 item 3: an elastic node whose step is below the run's latest checkpoint (back from a freeze or a
    partition) may write nothing; once the others have finished the run (its summary.json, of the same steps) a
    node short of the end is told so in one line, a node at the end finishes as usual."""
    import json

    from risgd_data.manifest import load_manifest
    from risgd_hosts.elastic_local import prepare_replicas
    from risgd_trainer.elastic import ElasticNodes

    manifest, _ = prepare_replicas(digits_dir, str(tmp_path / "rep"), workers=2, mu=0.5, partition="label_sorted")
    run = resolve(tmp_path, "elastic.workers=2", "algorithm=risgd", "mu=0.5", "data.partition=label_sorted",
                  f"data.manifest={manifest}", "steps=300", world_size=1)
    nodes = ElasticNodes(run, load_manifest(manifest), {}, 0)
    assert nodes.behind(120) is None and nodes.over(120) is None
    os.makedirs(os.path.join(run.run_dir, "checkpoints"))
    with open(os.path.join(run.run_dir, "checkpoints", "latest"), "w") as f:
        f.write("step100")
    assert nodes.behind(100) is None and nodes.behind(120) is None
    assert nodes.behind(90) == "the run's latest checkpoint is at step 100, past this node's step 90"
    with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
        json.dump({"steps": 200}, f)  # not this run's end: not finished
    assert nodes.over(120) is None
    with open(os.path.join(run.run_dir, "summary.json"), "w") as f:
        json.dump({"steps": 300}, f)
    said = f"{run.run_dir}: the run finished at step 300 (by the other nodes): nothing to do"
    assert nodes.over(120) == said and nodes.behind(120) == said
    assert nodes.over(300) is None and nodes.behind(300) is None
