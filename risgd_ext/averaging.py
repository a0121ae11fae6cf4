"""Averaging of model state across ranks: one all_reduce per bucket, no packing copies.

At start the parameters (and floating-point buffers such as BatchNorm statistics) are re-pointed
into one flat buffer per dtype, as DeepSpeed's and Apex's flat master weights do. A round is then
``all_reduce`` of bucket-sized slices of that buffer, in place, and one division by the number of
live ranks: every rank divides the same reduced values, so all ranks end bit-identical. Optimizer
state (optional) is created lazily by the optimizer, so it is packed into its own flat buffer.

The model divergence ``mean_j ||x_j - x̄||² / ||x̄||²`` rides in the same collective: with the
previous average ``a`` (identical on all ranks) as anchor,
``sum_j ||x_j - x̄||² = sum_j ||x_j - a||² - n ||x̄ - a||²``, so one extra float per round, a slot at
the end of the first flat buffer, carries ``||x_j - a||²`` and no second collective is needed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class RoundResult:
    bytes_reduced: int
    comm_seconds: float
    divergence: float


@dataclass
class _Flat:
    buffer: torch.Tensor      # [params | buffers | (slot)] of one dtype and device
    num_param_elems: int      # the parameter prefix, over which divergence is measured

    @property
    def params(self) -> torch.Tensor:
        return self.buffer[: self.num_param_elems]


def _flatten_into(tensors: list[torch.Tensor], extra: int) -> torch.Tensor:
    """A flat buffer holding ``tensors``, which become views into it (their values are kept)."""
    flat = torch.zeros(sum(t.numel() for t in tensors) + extra, dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t in tensors:
        view = flat[offset:offset + t.numel()].view_as(t)
        view.copy_(t.detach())
        t.data = view
        offset += t.numel()
    return flat


def _sq_dist(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.dist(x, y)) ** 2  # fused: no temporary for x - y


def _sq_norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x)) ** 2


class BucketAverager:
    """Averages ``params`` and ``buffers`` (and, per call, extra tensors) over a process group."""

    def __init__(self, params: list[torch.Tensor], buffers: list[torch.Tensor], bucket_bytes: int,
                 group: dist.ProcessGroup | None = None, synchronize=None, measure_divergence: bool = True):
        self.bucket_bytes = bucket_bytes
        self.measure_divergence = measure_divergence
        self.group = group
        self._synchronize = synchronize or (lambda: None)
        self.flats: list[_Flat] = []
        kinds = list(dict.fromkeys((t.dtype, t.device) for t in params + buffers))
        for i, kind in enumerate(kinds):
            ps = [p for p in params if (p.dtype, p.device) == kind]
            bs = [b for b in buffers if (b.dtype, b.device) == kind]
            slot = 1 if i == 0 else 0
            self.flats.append(_Flat(_flatten_into(ps + bs, slot), sum(p.numel() for p in ps)))
        self.anchors = [f.params.clone() for f in self.flats]
        self._packed: torch.Tensor | None = None

    def set_anchor(self) -> None:
        """Take the current (rank-identical) parameters as the divergence reference."""
        for anchor, flat in zip(self.anchors, self.flats):
            anchor.copy_(flat.params)

    def _buckets(self, extras: list[torch.Tensor]) -> list[torch.Tensor]:
        slices = []
        for buf in [f.buffer for f in self.flats] + ([self._packed] if extras else []):
            step = max(1, self.bucket_bytes // buf.element_size())
            slices += [buf[i:i + step] for i in range(0, buf.numel(), step)]
        return slices

    def _pack(self, extras: list[torch.Tensor], live: bool) -> None:
        total = sum(t.numel() for t in extras)
        if self._packed is None or self._packed.numel() != total:
            self._packed = torch.empty(total, dtype=extras[0].dtype, device=extras[0].device)
        if live:
            torch.cat([t.detach().flatten() for t in extras], out=self._packed)
        else:
            self._packed.zero_()

    @torch.no_grad()
    def average(self, live: bool, num_live: int, extras: list[torch.Tensor] | None = None) -> RoundResult:
        """Replace every tensor by its mean over live ranks; return bytes, seconds and divergence."""
        extras = extras or []
        if extras:
            self._pack(extras, live)
        measure = self.measure_divergence
        my_sq = sum(_sq_dist(f.params, a) for f, a in zip(self.flats, self.anchors)) if live and measure else 0.0
        if not live:
            for f in self.flats:
                f.buffer.zero_()  # a failed rank contributes weight 0 and takes the average
        self.flats[0].buffer[-1] = my_sq
        comm, nbytes = 0.0, 0
        for bucket in self._buckets(extras):
            self._synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(bucket, group=self.group)
            self._synchronize()
            comm += time.perf_counter() - t0
            nbytes += bucket.numel() * bucket.element_size()
        mean_sq = float(self.flats[0].buffer[-1]) / num_live
        for f in self.flats:
            f.buffer.div_(num_live)
        if extras:
            self._packed.div_(num_live)
            offset = 0
            for t in extras:
                t.copy_(self._packed[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        if not measure:
            return RoundResult(nbytes, comm, float("nan"))
        # sum_j ||x_j - x̄||² / n = mean_j ||x_j - a||² - ||x̄ - a||²  (clamped: rounding can dip below 0)
        spread = max(mean_sq - sum(_sq_dist(f.params, a) for f, a in zip(self.flats, self.anchors)), 0.0)
        norm = sum(_sq_norm(f.params) for f in self.flats)
        self.set_anchor()
        return RoundResult(nbytes, comm, spread / norm if norm > 0 else 0.0)
