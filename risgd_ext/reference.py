"""The algorithm in one process: what every worker's model must be after every step of a run.

This is RI-SGD as docs/engine.md defines it, written apart from the engine so that a defect of the
engine is not copied here: its schedule, rounds, membership, residual bookkeeping and outer step are
its own code. It borrows only the codecs' ``encode``/``decode`` (tested on their own) and the user's
pieces: the initial parameters, a gradient function and an optimizer factory. The composition matrix
(``tests/test_reference.py``, ``benchmarks/bench_matrix.py``) runs the real engine on real gloo
groups and compares every worker's model after every step with :func:`run`'s.

The algorithm, for ``W`` workers (nodes) of ``k`` ranks each, on a flat parameter vector:

- a step: every live rank computes its gradient at its model; a warm-up step (the first
  ``warmup`` steps) averages the gradients over all ranks, a local step over the node's ranks only
  (``k`` > 1: the node is one synchronous worker); then the user's optimizer steps;
- a round closes after every ``tau``-th step past the warm-up, among the workers the membership
  schedule keeps (``down(r)``: those out of round r) whose displacement ``d_w = x_w - a`` from the
  anchor ``a`` (the last average) is finite: ``x̄ = a + (sum_w d_w) / n`` over those ``n``
  contributions, summed in worker order;
- with a codec, ``d_w`` crosses as the two-phase round sends it: each bucket cut into one chunk
  per cross-node rank, a rank's chunk encoded with its own residual added (what it dropped is kept),
  the chunk's owner summing the decoded chunks in rank order, adding its own residual and encoding
  the sum once more (keeping what that dropped); every worker decodes the same owner sums;
- the anchor then moves: ``a <- x̄``, or the outer step (SGD with momentum/Nesterov on ``a`` with
  the pseudo-gradient ``a - x̄``); a worker takes the new anchor (blocking), or with ``overlap`` the
  round's average is applied ``delay`` steps after its start as ``x <- a' + (x - x_sent)``;
- a worker late at a round's deadline (``deadline_margin``) takes no step after its last one in the round (no
  gradient, no optimizer step) and contributes nothing to it, as a worker out of the round;
- a worker out of a round, or whose contribution was not finite, contributes nothing; a non-finite
  worker takes the new anchor whole (its progress is not finite either) and restarts the
  non-finite entries of its optimizer state from zero: it is healed from the average.

Where the engine sums in the same order (two contributions, or the codecs' rank-order sums) the
comparison is bitwise. fp32 all-reduces of more than two contributions are summed by gloo in its
own order: there the comparison allows a few units in the last place (``rtol`` 1e-5).

What is not modelled yet: BatchNorm buffers (models here have none), the averaged optimizer state,
``tau_intra`` > 0, live (torchft) membership with quorums, and the data draw (the loader's plan is
checked against its own rule in the data tests).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .codec import CODECS


@dataclass
class Setup:
    """One composition: the layout, the schedule and the round's form."""

    workers: int
    node_size: int = 1
    tau: int = 1
    warmup: int = 0
    overlap: bool = False
    delay: int = 0                  # overlap: steps from a round's start to its apply (0: tau)
    outer_lr: float = 1.0
    outer_momentum: float = 0.0
    outer_nesterov: bool = False
    compress: str = "none"
    error_feedback: bool = True
    bucket_values: int = 25 * 2 ** 18  # fp32 values in one bucket (bucket_mb * 2**20 / 4)
    extra: int = 2                  # values after the parameters in the engine's flat buffer (its slot)
    down: Callable[[int], frozenset[int]] = field(default=lambda r: frozenset())  # workers out of round r
    # workers late at round r's deadline -> the local steps each took in it before it stopped (it skips the rest)
    late: Callable[[int], dict[int, int]] = field(default=lambda r: {})

    @property
    def apply_after(self) -> int:
        return self.delay or self.tau

    def is_round_step(self, step: int) -> bool:
        return step > self.warmup and (step - self.warmup) % self.tau == 0


@dataclass
class Trace:
    """What a run must produce: every worker's model after every step, and what each round saw."""

    models: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # step -> one model per worker
    rounds: list[dict] = field(default_factory=list)  # per round: step, contributors, left out (non-finite)


def _chunks(n: int, ranks: int) -> int:
    return max(1, -(-n // ranks))


class _Codec:
    """The two-phase round of one codec, with both residuals: per (worker, position) and per
    (owner, bucket)."""

    def __init__(self, setup: Setup, size: int):
        self.codec = CODECS[setup.compress]
        self.ef = setup.error_feedback
        self.setup = setup
        self.mine: dict[int, torch.Tensor] = {}          # worker -> its residual over the parameters
        self.owner: dict[tuple, torch.Tensor] = {}        # (piece, bucket, owner) -> owner's residual

    def _lossy(self, x: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(self.codec.encode(x), x.numel())

    def pieces(self, params: int) -> list[tuple[int, int]]:
        """The cross-node pieces ``[lo, hi)`` of the parameters: one per rank of a node (the node's ranks
        each carry a near-equal slice of the whole flat buffer, parameters and what follows)."""
        k, total = self.setup.node_size, params + self.setup.extra
        out = []
        for local in range(k):
            lo, hi = total * local // k, total * (local + 1) // k
            out.append((lo, min(hi, params)))
        return out

    def sum(self, displacements: dict[int, torch.Tensor], workers: int, contributing: set[int]) -> torch.Tensor:
        """sum_w d_w over ``contributing`` as the compressed round computes it (``displacements`` has every
        worker's; the others send zeros)."""
        params = next(iter(displacements.values())).numel()
        out = torch.zeros(params)
        for piece, (lo, hi) in enumerate(self.pieces(params)):
            for b, start in enumerate(range(lo, hi, self.setup.bucket_values)):
                end = min(start + self.setup.bucket_values, hi)
                n = end - start
                c = _chunks(n, workers)
                decoded = torch.zeros(workers, workers, c)  # [owner][sender]
                for w in range(workers):
                    if w in contributing:
                        d = displacements[w][start:end]
                        if self.ef:
                            r = self.mine.setdefault(w, torch.zeros(params))[start:end]
                            d = d + r
                    else:
                        d = torch.zeros(n)
                    padded = torch.zeros(workers * c)
                    padded[:n] = d
                    for owner in range(workers):
                        sent = self._lossy(padded[owner * c:(owner + 1) * c])
                        decoded[owner, w] = sent
                        if self.ef and w in contributing:
                            lo_o, hi_o = owner * c, min((owner + 1) * c, n)
                            if hi_o > lo_o:
                                self.mine[w][start + lo_o:start + hi_o] = \
                                    padded[lo_o:hi_o] - sent[:hi_o - lo_o]
                gathered = torch.zeros(workers * c)
                for owner in range(workers):
                    total = decoded[owner, 0].clone()
                    for w in range(1, workers):
                        total = total + decoded[owner, w]
                    if self.ef:
                        key = (piece, b, owner, workers)
                        r = self.owner.setdefault(key, torch.zeros(c))
                        total = total + r
                        sent = self._lossy(total)
                        self.owner[key] = total - sent
                    else:
                        sent = self._lossy(total)
                    gathered[owner * c:(owner + 1) * c] = sent
                out[start:end] = gathered[:n]
        return out


def run(setup: Setup, x0: torch.Tensor, grad: Callable[[int, int, int, torch.Tensor], torch.Tensor],
        optimizer: Callable[[torch.Tensor], torch.optim.Optimizer], steps: int,
        corrupt: Callable[[int, int, torch.Tensor], None] | None = None) -> Trace:
    """Every worker's flat model after each of ``steps`` steps, from ``x0``.

    ``grad(worker, local_rank, step, x)``: that rank's gradient at ``x`` for step ``step`` (1-based);
    ``optimizer(p)``: the user's optimizer over one flat parameter; ``corrupt(worker, step, x)``: may
    change worker ``worker``'s model in place after step ``step`` (a fault between two steps)."""
    W, k = setup.workers, setup.node_size
    xs = [x0.clone() for _ in range(W)]
    opts = []
    for x in xs:
        x.grad = None
        opts.append(optimizer(x))
    anchor = x0.clone()
    momentum: torch.Tensor | None = None
    codec = _Codec(setup, W) if setup.compress != "none" else None
    pending: dict | None = None  # overlap: the round in flight
    trace = Trace()
    rounds = 0

    def grads_of(w: int, step: int) -> list[torch.Tensor]:
        return [grad(w, r, step, xs[w].detach()) for r in range(k)]

    def mean(gs: list[torch.Tensor]) -> torch.Tensor:
        total = gs[0].clone()
        for g in gs[1:]:
            total = total + g
        return total / len(gs)

    def close(contributors: set[int], d: dict[int, torch.Tensor]) -> torch.Tensor:
        """The round's new anchor from the contributions ``d``."""
        nonlocal anchor, momentum
        if codec is not None:
            s = codec.sum(d, W, contributors)
        else:
            s = torch.zeros_like(anchor)
            for w in sorted(contributors):
                s = s + d[w]
        n = len(contributors)
        xbar = anchor + s / n
        if setup.outer_lr == 1.0 and setup.outer_momentum == 0.0:
            anchor = xbar
        else:
            # SGD on the anchor with the pseudo-gradient, in torch.optim.SGD's formula and operations
            g = torch.sub(anchor, xbar)
            if setup.outer_momentum:
                if momentum is None:
                    momentum = g.clone()
                else:
                    momentum = momentum.mul(setup.outer_momentum).add(g)
                g = g.add(momentum, alpha=setup.outer_momentum) if setup.outer_nesterov else momentum
            anchor = anchor.add(g, alpha=-setup.outer_lr)
        return anchor

    def heal(w: int, new: torch.Tensor) -> None:
        xs[w].data.copy_(new)
        for state in opts[w].state.values():
            for v in state.values():
                if torch.is_tensor(v) and v.is_floating_point():
                    v.masked_fill_(~torch.isfinite(v), 0.0)

    with torch.no_grad():
        for step in range(1, steps + 1):
            sync = step <= setup.warmup
            with torch.enable_grad():
                per = [grads_of(w, step) for w in range(W)]
            if sync:
                g = mean([g for gs in per for g in gs])
                for w in range(W):
                    xs[w].grad = g.clone()
            else:
                for w in range(W):
                    xs[w].grad = mean(per[w])
            late = {} if sync else setup.late(rounds)
            position = 0 if sync else (step - setup.warmup - 1) % setup.tau + 1  # the step's place in its round
            for w in range(W):
                if w not in late or position <= late[w]:
                    opts[w].step()
                xs[w].grad = None
            if sync:
                if step == setup.warmup:
                    anchor = xs[0].detach().clone()
            else:
                if pending is not None and pending["apply"] == step:
                    new = close(pending["contributors"], pending["d"])
                    for w in range(W):
                        if w in pending["bad"]:
                            heal(w, new)
                        else:
                            xs[w].data.copy_(new + (xs[w].data - pending["sent"][w]))
                    pending = None
                if setup.is_round_step(step):
                    down = setup.down(rounds)
                    d = {w: xs[w].detach() - anchor for w in range(W)}
                    bad = {w for w in range(W)
                           if w not in down and w not in late and not bool(torch.isfinite(d[w]).all())}
                    contributors = set(range(W)) - set(down) - bad - set(late)
                    if not contributors:
                        raise RuntimeError(f"step {step}: no finite contribution")
                    trace.rounds.append({"step": step, "contributors": sorted(contributors),
                                         "non_finite": sorted(bad), "late": sorted(late)})
                    rounds += 1
                    if setup.overlap:
                        pending = {"apply": step + setup.apply_after, "contributors": contributors, "d": d,
                                   "bad": bad, "sent": [x.detach().clone() for x in xs]}
                    else:
                        new = close(contributors, d)
                        for w in range(W):
                            heal(w, new) if w in bad else xs[w].data.copy_(new)
            if corrupt is not None:  # a fault between this step and the next
                for w in range(W):
                    corrupt(w, step, xs[w].data)
            trace.models[step] = [x.detach().clone() for x in xs]
    return trace
