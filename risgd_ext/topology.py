"""The process groups of the node level, built from a :class:`~risgd_common.layout.Layout`.

Two kinds of subgroups are made, each by every rank in the same order
(``torch.distributed.new_group`` is collective):

- the node group: the k ranks of one node, on the fast intra-node link;
- the cross group of local index l: rank l of every node. A round across nodes all-reduces slice l
  of the model in cross group l, so the k slices cross the slow network in parallel and each
  node's link carries one model's worth of payload, not k.
"""

from __future__ import annotations

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
    node_groups = [dist.new_group(list(layout.ranks_of(w))) for w in range(layout.workers)]
    cross_groups = [dist.new_group(layout.cross_ranks(local)) for local in range(layout.node_size)]
    worker, local = layout.worker_of(rank), layout.local_of(rank)
    return NodeGroups(layout, local, tuple(layout.ranks_of(worker)), node_groups[worker], cross_groups[local])


def part(buf: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """Slice ``index`` of ``count`` near-equal contiguous slices of a flat tensor."""
    n = buf.numel()
    return buf[n * index // count: n * (index + 1) // count]
