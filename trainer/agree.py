"""Setup errors that every rank agrees on, so one clear line is printed and every rank exits 2.

A bad input found on one rank (a corrupt shard on its node, shards that rank 0 cannot make) would
otherwise leave the other ranks blocked in their next collective until the launcher kills them,
each printing a traceback ("Connection closed by peer") over the one line that matters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from risgd_data.errors import DataError
from risgd_ext.config import ConfigError

from .run_config import RecipeError

T = TypeVar("T")
USER_ERRORS = (RecipeError, ConfigError, DataError)


class AgreedError(Exception):
    """A user error raised on at least one rank, now raised on every rank (rank 0 reports it)."""


def agree(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank, then agree: if it raised a user error on any rank, raise
    :class:`AgreedError` with the lowest such rank's message on all ranks. ``fn`` must not run a
    collective after the point where it can fail on some ranks only."""
    error, result = None, None
    try:
        result = fn()
    except USER_ERRORS as e:
        error = str(e)
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e), None)
    if first is not None:
        raise AgreedError(first)
    return result  # type: ignore[return-value]
