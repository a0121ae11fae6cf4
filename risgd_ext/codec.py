"""Compressed payloads for the cross-node part of a round: bf16 and int8 with block scales.

A codec turns one fp32 bucket into a flat ``uint8`` payload of a size fixed by the bucket's length
(so every rank's payload has the same shape and ``all_gather`` can carry it on gloo and NCCL
alike), and back. Sums of int8 values would overflow in an ``all_reduce``, and bf16 sums rounded
at every hop of a ring would drift: the payloads are all-gathered instead and every rank decodes
and sums them in fp32, in rank order, so every rank ends with the same bits.

int8: one fp32 scale (absmax / 127) per block of :data:`INT8_BLOCK` = 256
consecutive values, round to nearest. Blocks rather than one scale per bucket because a bucket
spans many layers whose displacements differ by orders of magnitude; 256 values keep the scales'
overhead at 4/256 = 1.6% (3.94x fewer bytes than fp32) while a block rarely crosses more than one
layer's tail. bf16: round to nearest even, 2x fewer bytes.

Where codecs plug in: :data:`CODECS`, the one registry. A codec is a :class:`Codec` subclass with a
``name`` (the ``compress`` value), its byte count ``nbytes(n)`` and ``encode``/``decode``, registered
by :func:`register`; the ``risgd`` block's validator (``compress`` must name one), the engine, the
stats and the cost model (``risgd_ext.cost_model.payload_bytes``) all read it, so the byte formula
is written once, here. ``none`` is the fp32 all_reduce (no payload to encode). torch is imported
when a codec encodes or decodes, so the validator and the cost model import none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INT8_BLOCK = 256  # values per fp32 scale of the int8 codec


class Codec:
    """One ``compress`` value: a payload of ``nbytes(n)`` bytes for ``n`` fp32 values."""

    name = ""

    def nbytes(self, n: float) -> float:
        """Payload bytes of a bucket of ``n`` fp32 values (an int for an int ``n``)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError


CODECS: dict[str, Codec] = {}  # compress value -> codec, in registration order


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: add a codec to :data:`CODECS` under its ``name``."""
    if not cls.name or cls.name in CODECS:
        raise ValueError(f"codec {cls.__name__} needs a name of its own, got {cls.name!r}")
    CODECS[cls.name] = cls()
    return cls


@register
class FP32(Codec):
    """No compression: the round is the fp32 all_reduce itself (nothing is encoded)."""

    name = "none"

    def nbytes(self, n: float) -> float:
        return 4 * n


@register
class BF16(Codec):
    name = "bf16"

    def nbytes(self, n: float) -> float:
        return 2 * n

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        return x.to(torch.bfloat16).view(torch.uint8)

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        import torch

        return payload.view(torch.bfloat16).float()


@register
class Int8(Codec):
    name = "int8"

    def __init__(self, block: int = INT8_BLOCK):
        self.block = block

    def _blocks(self, n: float) -> int:
        return int(-(-n // self.block))

    def nbytes(self, n: float) -> float:
        return 4 * self._blocks(n) + n  # one fp32 scale per block (first: aligned), then the values

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        n, b = x.numel(), self.block
        blocks = self._blocks(n)
        padded = torch.zeros(blocks * b, dtype=torch.float32, device=x.device)
        padded[:n] = x
        rows = padded.view(blocks, b)
        scale = rows.abs().amax(dim=1) / 127.0
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return torch.cat([scale.view(torch.uint8), q.view(-1)[:n].view(torch.uint8)])

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        import torch

        b, blocks = self.block, self._blocks(n)
        scale = payload[:4 * blocks].view(torch.float32)
        q = payload[4 * blocks:4 * blocks + n].view(torch.int8).float()
        padded = torch.zeros(blocks * b, dtype=torch.float32, device=payload.device)
        padded[:n] = q
        return (padded.view(blocks, b) * scale[:, None]).view(-1)[:n]


def make_codec(name: str) -> Codec | None:
    """The codec of a ``compress`` value for the engine (None for ``none``: the fp32 all_reduce)."""
    return None if name == "none" else CODECS[name]
