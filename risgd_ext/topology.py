"""The process groups of the node level, built from a :class:`~risgd_common.layout.Layout`.

Two kinds of subgroups are made, each by every rank in the same order
(``torch.distributed.new_group`` is collective):

- the node group: the k ranks of one node, on the fast intra-node link;
- the cross group of local index l: rank l of every node. A round across nodes all-reduces slice l
  of the model in cross group l, so the k slices cross the slow network in parallel and each
  node's link carries one model's worth of payload, not k.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

from risgd_common.layout import Layout


@dataclass(frozen=True)
class NodeGroups:
    layout: Layout
    local: int                     # this rank's index in its node
    node_ranks: tuple[int, ...]    # global ranks of this rank's node, by local index
    node_group: dist.ProcessGroup
    cross_group: dist.ProcessGroup


def build_node_groups(layout: Layout, rank: int) -> NodeGroups:
    """Make every node group and cross group (collective: every rank calls, in the same order)."""
    timeout = world_timeout()
    node_groups = [dist.new_group(list(layout.ranks_of(w)), timeout=timeout) for w in range(layout.workers)]
    cross_groups = [dist.new_group(layout.cross_ranks(local), timeout=timeout) for local in range(layout.node_size)]
    worker, local = layout.worker_of(rank), layout.local_of(rank)
    return NodeGroups(layout, local, tuple(layout.ranks_of(worker)), node_groups[worker], cross_groups[local])


def world_timeout() -> datetime.timedelta | None:
    """The timeout the default process group was started with (``init_process_group(timeout=)``),
    or None when it cannot be read (another backend, an older torch)."""
    try:
        pg = dist.distributed_c10d._get_default_group()
        return pg._get_backend(torch.device("cpu")).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None


def inherit_world_timeout(group: dist.ProcessGroup | None) -> None:
    """Give ``group`` the default group's timeout.

    ``new_group`` without ``timeout=`` takes torch's default (30 min for gloo), not the world's,
    so DeepSpeed's data-parallel group would wait 30 min on a peer that is gone without a word (a
    power cut: its link down, no reset), whatever ``init_distributed(timeout=)`` said. With the
    world's timeout, the round fails after it and an elastic agent restarts the survivors.
    """
    timeout = world_timeout()
    if group is None or timeout is None or dist.get_world_size(group) == 1:
        return
    setter = getattr(dist, "set_timeout", None) or dist.distributed_c10d._set_pg_timeout
    setter(timeout, group)


def part(buf: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """Slice ``index`` of ``count`` near-equal contiguous slices of a flat tensor."""
    n = buf.numel()
    return buf[n * index // count: n * (index + 1) // count]


def slices(buf: torch.Tensor, bucket_bytes: int) -> list[torch.Tensor]:
    """A flat tensor cut into contiguous buckets of ``bucket_bytes`` (the last one shorter), each a
    collective's payload."""
    step = max(1, bucket_bytes // buf.element_size())
    return [buf[i:i + step] for i in range(0, buf.numel(), step)]
