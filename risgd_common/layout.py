"""Which ranks make up which RI-SGD worker: the one place the layout of a run is computed.

Ranks are numbered node by node, as the deepspeed launcher (and torchrun) number them: rank =
node * node_size + local. With ``node_size`` = 1 (a flat run) every rank is one worker, a layout
of one-rank nodes; with ``node_size`` = k > 1 a node's k ranks are one worker and split its data.

The recipe config, the engine (its process groups and rounds), the loader shares, the cost model
and the namespace test hosts all ask a :class:`Layout`; none divides the world size itself.
"""

from __future__ import annotations

from dataclasses import dataclass


class LayoutError(ValueError):
    """A world size that the node size does not divide."""


@dataclass(frozen=True)
class Layout:
    world_size: int     # ranks
    node_size: int = 1  # ranks per node (= per worker)

    def __post_init__(self) -> None:
        if self.node_size < 1 or self.world_size < 1 or self.world_size % self.node_size:
            raise LayoutError(f"node_size={self.node_size} does not divide the {self.world_size} ranks")

    @property
    def workers(self) -> int:
        """RI-SGD workers: ranks, or nodes with ``node_size`` > 1 (the manifest's ``--workers``)."""
        return self.world_size // self.node_size

    @property
    def hierarchical(self) -> bool:
        return self.node_size > 1

    def worker_of(self, rank: int) -> int:
        """The worker (= node) that ``rank`` belongs to."""
        return rank // self.node_size

    def local_of(self, rank: int) -> int:
        """``rank``'s index among its worker's ranks (its share of the worker's batch)."""
        return rank % self.node_size

    def ranks_of(self, worker: int) -> range:
        """The global ranks of ``worker`` (its node), by local index."""
        return range(worker * self.node_size, (worker + 1) * self.node_size)

    def ranks_of_workers(self, workers) -> list[int]:
        """The global ranks of a set of workers, sorted."""
        return sorted(r for w in workers for r in self.ranks_of(w))

    def cross_ranks(self, local: int) -> list[int]:
        """Rank ``local`` of every node: the ranks of one cross-node group."""
        return [w * self.node_size + local for w in range(self.workers)]
