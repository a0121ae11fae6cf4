"""Shared fixtures (one digits shard set per session, written for real) and the suite's order."""

from __future__ import annotations

import os

import pytest

from risgd_data.make_shards import make_shards

# `make test` runs the suite on pytest-xdist workers a file at a time (--dist loadfile), in the order
# collected: the files whose launches take longest go first, so that no long file starts last and runs
# alone at the end (longest first: the classic list-scheduling rule). Measured with --durations.
LONGEST_FIRST = ["test_elastic_launch.py", "test_paper.py", "test_netns.py", "test_launch_faults.py",
                 "test_install.py", "test_live.py", "test_defects.py", "test_live_trainer.py", "test_train.py",
                 "test_netns_imagenet.py", "test_outer_compress.py", "test_elastic_checkpoint.py",
                 "test_interrupt.py", "test_hierarchy.py", "test_reference.py", "test_crash.py", "test_train_node.py",
                 "test_live_storm_defects.py", "test_deadline.py", "test_cost_model.py", "test_failures.py",
                 "test_trainer.py"]


def pytest_collection_modifyitems(session, config, items) -> None:
    order = {name: k for k, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(os.path.basename(str(item.path)), len(order)))  # stable within a file


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("digits"))
    make_shards("digits", out, shard_size=250, seed=0, progress=False)
    return out
