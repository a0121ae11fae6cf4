"""Bucketed averaging of model state across ranks: one all_reduce per bucket.

Tensors are packed into persistent flat buffers (one per bucket, one dtype per bucket), summed
with ``all_reduce``, divided by the number of live ranks and copied back. Every rank divides the
same reduced buffer, so afterwards all ranks hold bit-identical values.

The model divergence ``mean_j ||x_j - x̄||² / ||x̄||²`` is measured in the same collective: with a
common anchor ``a`` (the previous average, identical on all ranks),
``sum_j ||x_j - x̄||² = sum_j ||x_j - a||² - n ||x̄ - a||²``, so one extra float per round, appended
to the first bucket, carries ``||x_j - a||²`` and no second collective is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _Bucket:
    tensors: list[torch.Tensor]
    views: list[torch.Tensor]
    flat: torch.Tensor


@dataclass
class RoundResult:
    bytes_reduced: int
    comm_seconds: float
    divergence: float


def _sq_dist(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> float:
    if not xs:
        return 0.0
    norms = torch._foreach_norm(torch._foreach_sub(xs, ys))
    return float(torch.stack([n.double() for n in norms]).square().sum())


def _sq_norm(xs: list[torch.Tensor]) -> float:
    if not xs:
        return 0.0
    return float(torch.stack([n.double() for n in torch._foreach_norm(xs)]).square().sum())


class BucketAverager:
    """Averages ``params`` (and ``extras``: buffers, optimizer state) over a process group."""

    def __init__(self, bucket_bytes: int, group: dist.ProcessGroup | None = None, synchronize=None):
        self.bucket_bytes = bucket_bytes
        self.group = group
        self._synchronize = synchronize or (lambda: None)
        self._buckets: list[_Bucket] = []
        self._layout: tuple = ()
        self.anchors: list[torch.Tensor] = []

    def set_anchor(self, params: list[torch.Tensor]) -> None:
        """Remember the current (rank-identical) parameters as the divergence reference."""
        self.anchors = [p.detach().clone() for p in params]

    def _plan(self, params: list[torch.Tensor], extras: list[torch.Tensor]) -> None:
        layout = tuple((t.data_ptr(), t.numel(), t.dtype) for t in params + extras)
        if layout == self._layout:
            return
        self._layout = layout
        self._buckets = []
        # The divergence slot rides at the end of the first bucket, which holds parameters.
        tensors = params + extras
        current: list[torch.Tensor] = []
        size = 0
        for t in tensors:
            if current and (t.dtype != current[0].dtype or t.device != current[0].device
                            or size + t.numel() * t.element_size() > self.bucket_bytes):
                self._buckets.append(self._make_bucket(current, extra_slot=not self._buckets))
                current, size = [], 0
            current.append(t)
            size += t.numel() * t.element_size()
        if current:
            self._buckets.append(self._make_bucket(current, extra_slot=not self._buckets))

    @staticmethod
    def _make_bucket(tensors: list[torch.Tensor], extra_slot: bool) -> _Bucket:
        total = sum(t.numel() for t in tensors) + (1 if extra_slot else 0)
        flat = torch.empty(total, dtype=tensors[0].dtype, device=tensors[0].device)
        views, offset = [], 0
        for t in tensors:
            views.append(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        return _Bucket(tensors, views, flat)

    @torch.no_grad()
    def average(self, params: list[torch.Tensor], extras: list[torch.Tensor], live: bool, num_live: int
                ) -> RoundResult:
        """Replace every tensor by the mean over live ranks; return bytes, seconds and divergence."""
        self._plan(params, extras)
        if len(self.anchors) != len(params):
            self.set_anchor(params)
        my_sq = _sq_dist(params, self.anchors) if live else 0.0
        for i, bucket in enumerate(self._buckets):
            if live:
                torch._foreach_copy_(bucket.views, bucket.tensors)
            else:
                bucket.flat.zero_()  # a failed rank contributes weight 0
            if i == 0:
                bucket.flat[-1] = my_sq
        comm = 0.0
        nbytes = 0
        for bucket in self._buckets:
            self._synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(bucket.flat, group=self.group)
            self._synchronize()
            comm += time.perf_counter() - t0
            nbytes += bucket.flat.numel() * bucket.flat.element_size()
        mean_sq = float(self._buckets[0].flat[-1]) / num_live
        for bucket in self._buckets:
            bucket.flat.div_(num_live)
            torch._foreach_copy_(bucket.tensors, bucket.views)
        # sum_j ||x_j - x̄||² / n = mean_j ||x_j - a||² - ||x̄ - a||²  (clamped: rounding can go below 0)
        spread = max(mean_sq - _sq_dist(params, self.anchors), 0.0)
        norm = _sq_norm(params)
        torch._foreach_copy_(self.anchors, params)
        return RoundResult(nbytes, comm, spread / norm if norm > 0 else 0.0)
