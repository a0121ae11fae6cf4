"""Shared fixtures for the data tests: one digits shard set per session (written for real)."""

from __future__ import annotations

import pytest

from risgd_data.make_shards import make_shards


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("digits"))
    make_shards("digits", out, shard_size=250, seed=0, progress=False)
    return out
