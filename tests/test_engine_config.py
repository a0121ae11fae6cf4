"""Every config error is refused before DeepSpeed starts, with one line naming the key and the fix."""

from __future__ import annotations

import json
import os

import pytest

import risgd_ext
from risgd_ext.config import ConfigError, RandomFailure, StaticFailure, check_world, parse_block, split_config
from risgd_ext.failures import failed_workers


@pytest.mark.parametrize("block, words", [
    ({"tau": 0}, "risgd.tau must be an int >= 1"),
    ({"tau": 2.5}, "risgd.tau must be an int >= 1"),
    ({"tau": True}, "risgd.tau must be an int >= 1"),
    ({"warmup_sync_steps": -1}, "risgd.warmup_sync_steps must be an int >= 0"),
    ({"average_buffers": "yes"}, "risgd.average_buffers must be true or false"),
    ({"average_optimizer_state": 1}, "risgd.average_optimizer_state must be true or false"),
    ({"bucket_mb": 0}, "risgd.bucket_mb must be a number > 0"),
    ({"tau": 4, "taus": 5}, "unknown key(s) ['taus']"),
    ({"failures": {"ranks": [1]}}, "risgd.failures must be a list"),
    ({"failures": [{"ranks": []}]}, "risgd.failures[0].ranks must be a non-empty list"),
    ({"failures": [{"ranks": [1], "start_round": 5, "end_round": 5}]}, "risgd.failures[0].end_round must be"),
    ({"failures": [{"ranks": [1], "when": 3}]}, "risgd.failures[0] has unknown key(s) ['when']"),
    ({"failures": [{"count": 1, "prob": 1.5}]}, "risgd.failures[0].prob must be a probability"),
    ({"failures": [{"prob": 0.5}]}, "needs either 'ranks'"),
    ([], "must be a JSON object"),
])
def test_block_errors(block, words):
    with pytest.raises(ConfigError) as e:
        parse_block(block)
    assert words in str(e.value)
    assert "\n" not in str(e.value)


def test_defaults():
    cfg = parse_block({})
    assert (cfg.tau, cfg.warmup_sync_steps, cfg.average_buffers, cfg.average_optimizer_state) == (1, 0, True, False)
    assert cfg.bucket_bytes == 25 * 2**20


@pytest.mark.parametrize("extra, words", [
    ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage=1 partitions optimizer state"),
    ({"zero_optimization": {"stage": 3}}, "set zero_optimization.stage to 0"),
    ({"fp16": {"enabled": True}}, "'fp16.enabled' wraps the optimizer"),
    ({"bf16": {"enabled": True}}, "use \"torch_autocast\""),
])
def test_deepspeed_features_that_cannot_take_local_steps(extra, words):
    with pytest.raises(ConfigError) as e:
        split_config({"train_micro_batch_size_per_gpu": 1, "risgd": {"tau": 2}, **extra})
    assert words in str(e.value)


def test_plain_config_passes_through_unchanged():
    cfg = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2}}
    assert split_config(cfg) == (cfg, None)


def test_initialize_refuses_before_deepspeed_starts(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "risgd": {"tau": 0}}))
    with pytest.raises(ConfigError, match="risgd.tau"):
        risgd_ext.initialize(model=None, config=str(path))
    with pytest.raises(ConfigError, match="not found"):
        risgd_ext.initialize(model=None, config=str(tmp_path / "missing.json"))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        risgd_ext.initialize(model=None, config=str(path))


def test_world_checks():
    with pytest.raises(ConfigError, match=r"ranks \[4\] do not exist in a world of 4"):
        check_world(parse_block({"failures": [{"ranks": [4]}]}), 4)
    with pytest.raises(ConfigError, match="fails all 2 ranks"):
        check_world(parse_block({"failures": [{"ranks": [0, 1]}]}), 2)
    with pytest.raises(ConfigError, match="count=4 must be < the world size 4"):
        check_world(parse_block({"failures": [{"count": 4, "prob": 0.1}]}), 4)


def test_failure_schedule():
    cfg = parse_block({"failures": [{"ranks": [2], "start_round": 3, "end_round": 5},
                                    {"count": 1, "prob": 0.5, "seed": 7, "start_round": 10}]})
    assert isinstance(cfg.failures[0], StaticFailure) and isinstance(cfg.failures[1], RandomFailure)
    assert [failed_workers(cfg, r, 4) for r in range(6)] == [frozenset()] * 3 + [frozenset({2})] * 2 + [frozenset()]
    random_rounds = [failed_workers(cfg, r, 4) for r in range(10, 210)]
    hit = sum(1 for d in random_rounds if d)
    assert 60 < hit < 140  # about half the rounds, one rank each
    assert all(len(d) <= 1 for d in random_rounds)
    # a pure function of the round: a resumed run draws the same failures
    assert random_rounds == [failed_workers(cfg, r, 4) for r in range(10, 210)]


def test_gpu_check_refuses_without_a_gpu_in_one_line():
    import os
    import subprocess
    import sys

    import torch

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "benchmarks", "gpu_check.py")
    assert subprocess.run([sys.executable, script, "--help"], capture_output=True).returncode == 0
    bad = subprocess.run([sys.executable, script, "--steps", "30"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == ("error: --steps 30 must be a multiple of --tau 50 "
                                                          "(the run ends on an average)")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no CUDA GPU on this machine") and proc.stderr.count("\n") == 1


def test_node_level_and_overlap_keys():
    cfg = parse_block({"tau": 8, "node_size": 4, "tau_intra": 2, "overlap": True, "overlap_delay": 3})
    assert (cfg.node_size, cfg.tau_intra, cfg.overlap, cfg.delay, cfg.workers(16)) == (4, 2, True, 3, 4)
    assert parse_block({"tau": 8, "overlap": True}).delay == 8  # 0: the next round
    flat = parse_block({"tau": 8})
    assert (flat.node_size, flat.tau_intra, flat.overlap, flat.hierarchical) == (1, 0, False, False)
    assert [s for s in range(1, 17) if cfg.is_intra_average_step(s)] == [2, 4, 6, 10, 12, 14]
    for block, message in (
        ({"tau_intra": 2, "tau": 4}, "needs a node level"),
        ({"node_size": 2, "tau_intra": 3, "tau": 4}, "tau=4 must be a multiple of risgd.tau_intra=3"),
        ({"overlap_delay": 2, "tau": 4}, "only applies with risgd.overlap=true"),
        ({"overlap": True, "overlap_delay": 5, "tau": 4}, "must be <= tau=4"),
        ({"overlap": True, "average_optimizer_state": True}, "not supported with node_size > 1 or overlap"),
        ({"node_size": 0}, "node_size must be an int >= 1"),
        ({"overlap": "yes"}, "overlap must be true or false"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_block(block)


def test_node_level_world_checks():
    with pytest.raises(ConfigError, match="node_size=3 does not divide the 4 ranks"):
        check_world(parse_block({"node_size": 3}), 4)
    # with the node level, failures name workers (nodes): 2 of them in a world of 4 ranks
    check_world(parse_block({"node_size": 2, "failures": [{"ranks": [1]}]}), 4)
    with pytest.raises(ConfigError, match=r"ranks \[2\] do not exist in a world of 2 workers"):
        check_world(parse_block({"node_size": 2, "failures": [{"ranks": [2]}]}), 4)
    with pytest.raises(ConfigError, match=r"count=2 must be < the world size 2 \(workers"):
        check_world(parse_block({"node_size": 2, "failures": [{"count": 2, "prob": 0.5}]}), 4)


def test_the_docs_table_of_engine_keys_is_made_from_the_declarations():
    from risgd_ext.config import keys_table

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "engine.md")).read()
    table = readme.split("<!-- keys_table -->\n", 1)[1].split("\n<!-- /keys_table -->", 1)[0]
    assert table == keys_table()


def test_recipe_engine_keys_and_block_writer_come_from_the_declarations():
    from dataclasses import fields

    from risgd_ext.config import KEYS, RISGDConfig, block_from_recipe, recipe_keys
    from risgd_trainer.run_config import SCHEMA

    assert [f.name for f in fields(RISGDConfig)] == list(KEYS)
    assert all(SCHEMA[k] == v for k, v in recipe_keys().items())  # the recipe's defaults are the engine's
    values = dict(recipe_keys(), tau=50)
    assert block_from_recipe(values) == {"tau": 50, "warmup_sync_steps": 0, "average_optimizer_state": False,
                                         "failures": []}  # a flat run's block: node keys only when set
    assert block_from_recipe(dict(values, node_size=2))["node_size"] == 2
    with pytest.raises(ConfigError, match="risgd.overlap must be true or false"):
        parse_block({"overlap": "yes"})


def test_the_docs_risgd_block_is_valid_json_the_engine_accepts():
    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "engine.md")).read()
    start = readme.index('```json\n{\n  "risgd"') + len("```json\n")
    block = json.loads(readme[start:readme.index("```", start)])["risgd"]
    from risgd_ext.config import KEYS

    assert set(block) == set(KEYS)  # every key shown, each accepted
    assert parse_block(block).tau == 50


def test_the_docs_stats_table_names_every_key_stats_returns():
    """Issue 34: `stats()` returned keys its table lacked. The table's first column, against the keys
    an engine's stats() builds (read from the controller's source: the counters and out[...] keys)."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    from risgd_ext import controller

    src = open(controller.__file__).read()
    body = src[src.index("    def stats(self)"):src.index("    def state_dict(") if "    def state_dict(" in src
               else len(src)]
    keys = set(controller._COUNTERS) | set(controller._COUNTERS_2) | set(controller._COUNTERS_3)
    keys |= set(re.findall(r'out\["(\w+)"\]', body))
    doc = open(os.path.join(root, "docs", "engine.md")).read()
    table = doc.split("`engine.risgd.stats()` returns these keys:", 1)[1].split("\n\n", 2)[1]
    documented = {k for row in table.splitlines()[2:] for k in re.findall(r"`(\w+)`", row.split("|")[1])}
    assert keys - documented == set() and "comm_rounds" in keys
