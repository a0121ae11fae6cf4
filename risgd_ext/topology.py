"""The node level: which ranks share a node, and the process groups of each level.

Ranks are numbered node by node, as the deepspeed launcher does (rank = node_rank * ranks_per_node
+ local_rank), so node n holds ranks ``n*k .. n*k + k-1``. Two kinds of subgroups are made, each by
every rank in the same order (``torch.distributed.new_group`` is collective):

- the node group: the k ranks of one node, on the fast intra-node link;
- the cross group of local index l: rank l of every node. A round across nodes all-reduces slice l
  of the model in cross group l, so the k slices cross the slow network in parallel and each
  node's link carries one model's worth of payload, not k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Topology:
    node_size: int                 # k ranks per node
    nodes: int                     # M nodes (= RI-SGD workers)
    node: int                      # this rank's node
    local: int                     # this rank's index in its node
    node_ranks: tuple[int, ...]    # global ranks of this node, by local index
    node_group: dist.ProcessGroup
    cross_group: dist.ProcessGroup

    @property
    def leader(self) -> bool:
        return self.local == 0


def build_topology(node_size: int) -> Topology:
    """Make the node and cross groups of a world of ``world_size`` ranks (collective: every rank calls)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    nodes = world // node_size
    node_groups = [dist.new_group(list(range(n * node_size, (n + 1) * node_size))) for n in range(nodes)]
    cross_groups = [dist.new_group([n * node_size + local for n in range(nodes)]) for local in range(node_size)]
    node, local = divmod(rank, node_size)
    return Topology(node_size, nodes, node, local, tuple(range(node * node_size, (node + 1) * node_size)),
                    node_groups[node], cross_groups[local])


def part(buf: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """Slice ``index`` of ``count`` near-equal contiguous slices of a flat tensor."""
    n = buf.numel()
    return buf[n * index // count: n * (index + 1) // count]
