"""The model as a round sees it: flat buffers, the anchor, and the arithmetic of an average.

At start the parameters (and floating-point buffers such as BatchNorm statistics) are re-pointed
into one flat buffer per dtype and device, as DeepSpeed's and Apex's flat master weights do. Each
flat buffer is laid out ``[params | buffers | (slot)]``: the parameter prefix, over which the
divergence is measured, then the buffers, and :data:`SLOT` extra floats at the end of the first one
(the slot) that carry ``||d_j||²`` and the rank's count (1: it contributes; 0: it is down or its
contribution is not finite, and sends zeros) through the round's collective: every rank divides by
the summed count, so a contribution left out needs no other message.

The anchor ``a`` is the previous average, bit-identical on every rank (the parameters DeepSpeed
broadcast at start, then each round's result). A round reduces each rank's displacement
``d_j = x_j - a`` and the slot, so that the reduced buffer holds everything the measurement needs,
and the average itself:

    S = sum_j d_j,   x̄ = a + S/n,   slot = sum_j ||d_j||²
    mean_j ||x_j - x̄||² = slot/n - ||S/n||²

After the collective: the division by n (which every round makes), a dot product, ``x̄ = a + S/n``,
another dot product and the copy ``a <- x̄``. The dot products read data the previous pass left in
cache, and nothing is read back to the host until one conversion of three scalars at the end
(measuring ``||x - a||`` and ``||x̄ - a||`` as two distances, slow two-input reductions on a CPU,
with four readbacks, took twice as long). Every rank runs the same elementwise operations on the
same reduced values and the same anchor, so ranks end bit-identical; summing displacements, which
are small, also loses less precision than summing the parameters.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

SLOT = 2  # floats at the end of the first flat buffer: ||d||² and the contribution count


@dataclass
class Flat:
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


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """``||x||²`` as a 0-d tensor on x's device (no host synchronisation)."""
    if x.dtype in (torch.float32, torch.float64):
        return torch.dot(x, x)
    return torch.linalg.vector_norm(x, dtype=torch.float32).square()


class FlatModel:
    """``params`` and ``buffers`` re-pointed into flat buffers, with the anchor of the next round.

    ``params`` must be identical on every rank when this is built (DeepSpeed broadcasts them at
    initialisation): they are the first anchor.
    """

    def __init__(self, params: list[torch.Tensor], buffers: list[torch.Tensor]):
        self.flats: list[Flat] = []
        kinds = list(dict.fromkeys((t.dtype, t.device) for t in params + buffers))
        for i, kind in enumerate(kinds):
            ps = [p for p in params if (p.dtype, p.device) == kind]
            bs = [b for b in buffers if (b.dtype, b.device) == kind]
            slot = SLOT if i == 0 else 0
            self.flats.append(Flat(_flatten_into(ps + bs, slot), sum(p.numel() for p in ps)))
        self.anchors = [f.params.clone() for f in self.flats]
        self.slot = self.flats[0].buffer[-SLOT:]  # [||d||², count]
        self.outer: torch.optim.SGD | None = None  # the outer step on the anchors (None: a <- x̄)
        self._scratch: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    @property
    def buffers(self) -> list[torch.Tensor]:
        """The flat buffers, one per dtype and device (the model's tensors are views into them)."""
        return [f.buffer for f in self.flats]

    def scratch(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Two sets of buffers laid out as :attr:`buffers`, allocated once and reused by every
        overlapped round (only one is in flight at a time)."""
        if self._scratch is None:
            self._scratch = ([torch.empty_like(b) for b in self.buffers], [torch.empty_like(b) for b in self.buffers])
        return self._scratch

    def set_outer(self, lr: float, momentum: float, nesterov: bool) -> None:
        """End every round with ``torch.optim.SGD(lr, momentum, nesterov)`` on the anchors, whose
        gradient is the round's pseudo-gradient ``a - x̄`` (DiLoCo's and SlowMo's outer step);
        the model then starts the next round from the new anchor. BatchNorm buffers keep their mean."""
        self.outer = torch.optim.SGD(self.anchors, lr=lr, momentum=momentum, nesterov=nesterov)

    def _move_anchors(self, means: list[torch.Tensor], outer: torch.optim.SGD | None = None,
                      anchors: list[torch.Tensor] | None = None, plain: bool = False) -> None:
        """The anchor update once ``means[i]`` (views of the parameter prefixes) hold ``x̄``:
        ``a <- x̄``, or the outer step, after which ``means`` hold the new anchor. ``plain``: ``a <- x̄``
        whatever the outer step (a warm-up step's round: synchronous SGD has no outer step)."""
        anchors = self.anchors if anchors is None else anchors
        outer = self.outer if outer is None and anchors is self.anchors else outer
        if outer is None or plain:
            for a, m in zip(anchors, means):
                a.copy_(m)
            return
        for a, m in zip(anchors, means):
            a.grad = torch.sub(a, m)  # the pseudo-gradient a - x̄
        outer.step()
        for a, m in zip(anchors, means):
            a.grad = None
            m.copy_(a)

    def set_anchor(self) -> None:
        """Take the current (rank-identical) parameters as the anchor."""
        for anchor, flat in zip(self.anchors, self.flats):
            anchor.copy_(flat.params)

    @torch.no_grad()
    def displace(self, out: list[torch.Tensor] | None = None, src: list[torch.Tensor] | None = None) -> None:
        """``d = x - a`` over the parameters (in place, or into ``out``) and ``||d||²`` into the slot;
        ``src``: buffers laid out as the model's to take ``x`` from instead of the model (with ``out``)."""
        my_sq = None
        for i, (f, a) in enumerate(zip(self.flats, self.anchors)):
            if f.num_param_elems:
                if out is None:
                    d = f.params.sub_(a)  # the displacement from the last average, in place
                else:
                    x = f.params if src is None else src[i][: f.num_param_elems]
                    d = torch.sub(x, a, out=out[i][: f.num_param_elems])
                sq = sq_norm(d).to(self.slot.dtype)
                my_sq = sq if my_sq is None else my_sq + sq.to(my_sq.device)
        slot = self.slot[:1] if out is None else out[0][-SLOT:-SLOT + 1]
        if my_sq is None:
            slot.zero_()
        else:
            slot.copy_(my_sq)

    @torch.no_grad()
    def finish(self, sums: list[torch.Tensor], num_live: int, plain: bool = False) -> float:
        """From the reduced sums (``S = sum_j d_j`` over the parameters, sums of buffers, the slot):
        the mean, in place (``x̄ = a + S/n``; buffers: their mean), the anchor update, and the
        divergence. ``sums[i]`` is laid out as ``flats[i].buffer``."""
        drift, norms, means = [], [], []
        for buf, f, a in zip(sums, self.flats, self.anchors):
            buf.div_(num_live)  # params: S/n = x̄ - a; buffers and the slot: the mean
            if not f.num_param_elems:
                continue
            mean_d = buf[: f.num_param_elems]
            drift.append(sq_norm(mean_d))  # ||x̄ - a||²
            mean_d.add_(a)  # x̄ = a + S/n: the same correctly rounded operations on every rank
            norms.append(sq_norm(mean_d))
            means.append(mean_d)
        self._move_anchors(means, plain=plain)
        scalars = [sums[0][-SLOT], *drift, *norms]
        dev = scalars[0].device
        values = torch.stack([s.to(device=dev, dtype=torch.float64) for s in scalars]).tolist()  # one readback
        mean_sq, k = values[0], len(drift)  # mean_j ||x_j - a||²
        drift_sq, norm = sum(values[1:1 + k]), sum(values[1 + k:])
        # mean_j ||x_j - x̄||² = mean_j ||x_j - a||² - ||x̄ - a||²  (clamped: rounding can dip below 0)
        spread = max(mean_sq - drift_sq, 0.0)
        if not math.isfinite(mean_sq + drift_sq + norm):
            return float("nan")  # not computable: never reported as 0
        return spread / norm if norm > 0 else 0.0

    @torch.no_grad()
    def finish_unmeasured(self, sums: list[torch.Tensor], num_live: int, plain: bool = False) -> None:
        """:meth:`finish` without the divergence: ``x̄ = a + S/n`` and the anchor update."""
        for s, f, a in zip(sums, self.flats, self.anchors):
            s.div_(num_live)
            s[: f.num_param_elems].add_(a)
        self._move_anchors([s[: f.num_param_elems] for s, f in zip(sums, self.flats)], plain=plain)

    @torch.no_grad()
    def mean_of(self, sums: list[torch.Tensor], num_live: int, plain: bool = False) -> list[torch.Tensor]:
        """The averaged model (flat buffers) that :meth:`finish` will make of ``sums``, computed
        into new tensors without changing any state."""
        out = []
        for s, f, a in zip(sums, self.flats, self.anchors):
            v = torch.div(s, num_live)
            if f.num_param_elems:
                v[: f.num_param_elems].add_(a)
            out.append(v)
        if self.outer is not None and not plain:  # the outer step on copies: the new anchor, the optimizer untouched
            anchors = [a.clone() for a in self.anchors]
            outer = torch.optim.SGD(anchors, **{k: self.outer.defaults[k] for k in ("lr", "momentum", "nesterov")})
            outer.load_state_dict(copy.deepcopy(self.outer.state_dict()))
            self._move_anchors([v[: f.num_param_elems] for v, f in zip(out, self.flats)], outer, anchors)
        return out
