"""Averaging of model state across ranks: one all_reduce per bucket, no packing copies.

At start the parameters (and floating-point buffers such as BatchNorm statistics) are re-pointed
into one flat buffer per dtype, as DeepSpeed's and Apex's flat master weights do. A round is then
``all_reduce`` of bucket-sized slices of that buffer, in place, and one division by the number of
live ranks: every rank divides the same reduced values, so all ranks end bit-identical. Optimizer
state (optional) is created lazily by the optimizer, so it is packed into its own flat buffer.

The model divergence ``mean_j ||x_j - x̄||² / ||x̄||²`` rides in the same collective. The anchor ``a``
is the previous average, bit-identical on every rank (the parameters DeepSpeed broadcast at start,
then each round's result). With the divergence measured, each rank reduces its displacement
``d_j = x_j - a`` (formed in place) instead of ``x_j``, and one extra float, a slot at the end of the
first flat buffer, carries ``||d_j||²``. The reduced buffer then holds everything the measurement
needs, and the average itself:

    S = sum_j d_j,   x̄ = a + S/n,   slot = sum_j ||d_j||²
    mean_j ||x_j - x̄||² = slot/n - ||S/n||²

so a round makes these passes over the parameters: ``x -= a`` and its dot product before the
collective; the division by n (which every round makes), a dot product, ``x̄ = a + S/n``, another
dot product and the copy ``a <- x̄`` after it. The dot products read data the previous pass left in
cache, and nothing is read back to the host until one conversion of three scalars at the end
(measuring ``||x - a||`` and ``||x̄ - a||`` as two distances, slow two-input reductions on a CPU,
with four readbacks, took twice as long). Every rank runs the same elementwise operations on the
same reduced values and the same anchor, so ranks still end bit-identical; summing displacements,
which are small, also loses less precision than summing the parameters.
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


def is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s strides pack its elements into one block without gaps or overlaps (any
    permutation of dimensions: contiguous, channels_last, ...)."""
    expected = 1
    dims = sorted(((st, sz) for sz, st in zip(t.size(), t.stride()) if sz != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def _flatten_into(tensors: list[torch.Tensor], extra: int) -> torch.Tensor:
    """A flat buffer holding ``tensors``, which become views into it (their values are kept). Each
    keeps its strides (a channels_last weight stays channels_last: a convolution would otherwise
    convert it, and its gradient, on every step); a tensor that is not dense becomes contiguous."""
    flat = torch.zeros(sum(t.numel() for t in tensors) + extra, dtype=tensors[0].dtype, device=tensors[0].device)
    offset = 0
    for t in tensors:
        if is_dense(t):
            view = torch.as_strided(flat, t.size(), t.stride(), offset)
        else:
            view = flat[offset:offset + t.numel()].view_as(t)
        view.copy_(t.detach())
        t.data = view
        offset += t.numel()
    return flat


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||²`` as a 0-d tensor on x's device (no host synchronisation)."""
    if x.dtype in (torch.float32, torch.float64):
        return torch.dot(x, x)
    return torch.linalg.vector_norm(x, dtype=torch.float32).square()


def _slices(buf: torch.Tensor, bucket_bytes: int) -> list[torch.Tensor]:
    step = max(1, bucket_bytes // buf.element_size())
    return [buf[i:i + step] for i in range(0, buf.numel(), step)]


class BucketAverager:
    """Averages ``params`` and ``buffers`` (and, per call, extra tensors) over a process group.

    ``params`` must be identical on every rank when the averager is built (DeepSpeed broadcasts
    them at initialisation): they are the first anchor.
    """

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
        self._slot = self.flats[0].buffer[-1:]
        self._flat_buckets = [s for f in self.flats for s in _slices(f.buffer, bucket_bytes)]
        self._packed: torch.Tensor | None = None

    def set_anchor(self) -> None:
        """Take the current (rank-identical) parameters as the divergence reference."""
        for anchor, flat in zip(self.anchors, self.flats):
            anchor.copy_(flat.params)

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
        buckets = self._flat_buckets
        if extras:
            self._pack(extras, live)
            buckets = buckets + _slices(self._packed, self.bucket_bytes)
        measure = self.measure_divergence
        if not live:
            for f in self.flats:
                f.buffer.zero_()  # a failed rank contributes weight 0 and takes the average
        elif measure:
            my_sq = None
            for f, a in zip(self.flats, self.anchors):
                if f.num_param_elems:
                    d = f.params.sub_(a)  # the displacement from the last average, in place
                    sq = _sq_norm(d).to(self._slot.dtype)
                    my_sq = sq if my_sq is None else my_sq + sq.to(my_sq.device)
            if my_sq is None:
                self._slot.zero_()
            else:
                self._slot.copy_(my_sq)
        else:
            self._slot.zero_()

        # Device work queued so far is the round's own, not communication: wait for it first, then
        # time the collectives as a whole (one synchronize before and one after, not per bucket).
        self._synchronize()
        t0 = time.perf_counter()
        for bucket in buckets:
            dist.all_reduce(bucket, group=self.group)
        self._synchronize()
        comm = time.perf_counter() - t0
        nbytes = sum(b.numel() * b.element_size() for b in buckets)

        if extras:
            self._packed.div_(num_live)
            offset = 0
            for t in extras:
                t.copy_(self._packed[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
        if not measure:
            for f in self.flats:
                f.buffer.div_(num_live)
            return RoundResult(nbytes, comm, float("nan"))

        drift, norms = [], []
        for f, a in zip(self.flats, self.anchors):
            f.buffer.div_(num_live)  # params: S/n = x̄ - a; buffers and the slot: the mean
            if not f.num_param_elems:
                continue
            mean_d = f.params
            drift.append(_sq_norm(mean_d))  # ||x̄ - a||²
            mean_d.add_(a)  # x̄ = a + S/n: the same correctly rounded operations on every rank
            norms.append(_sq_norm(mean_d))
            a.copy_(mean_d)
        scalars = [self._slot[0], *drift, *norms]
        dev = scalars[0].device
        values = torch.stack([s.to(device=dev, dtype=torch.float64) for s in scalars]).tolist()  # one readback
        mean_sq, k = values[0], len(drift)  # mean_j ||x_j - a||²
        drift_sq, norm = sum(values[1:1 + k]), sum(values[1 + k:])
        # mean_j ||x_j - x̄||² = mean_j ||x_j - a||² - ||x̄ - a||²  (clamped: rounding can dip below 0)
        spread = max(mean_sq - drift_sq, 0.0)
        return RoundResult(nbytes, comm, spread / norm if norm > 0 else 0.0)
