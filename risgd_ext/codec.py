"""Compressed payloads for the cross-node part of a round: bf16, int8 and int4 with block scales.

A codec turns fp32 values into a flat ``uint8`` payload of a size fixed by their number (so every
rank's payload for the same piece has the same shape, and gloo and NCCL carry it alike), and back.

The compressed round is a two-phase all-reduce (:func:`risgd_ext.reduce.Reducer`; torchft's
``allreduce_quantized`` and DeepSpeed's 1-bit compressed all-reduce do it the same way): each bucket
is cut into N chunks, one per rank of the cross-node group; every rank encodes its N chunks and sends
chunk j to rank j (all_to_all); rank j decodes the N payloads of its chunk and sums them in fp32 in
rank order, adds what its last re-encoding dropped (the owner's residual), re-encodes the sum once;
an all_gather hands every rank the same N encoded sums, which every rank decodes: the same bits
everywhere. Each rank moves 2(N-1) chunk payloads, i.e. 2(N-1)/N of the bucket's payload, as a ring
all_reduce does with fp32 (:func:`two_phase_payload`: the bytes one round of a bucket counts).

int8: one fp32 scale (absmax / 127) per block of :data:`INT8_BLOCK` = 256 consecutive values, round
to nearest; 4/256 = 1.6% of scales, 3.94x fewer bytes than fp32. int4: two values in a byte (offset
by 8, in [1, 15]), one fp32 scale (absmax / 7) per block of :data:`INT4_BLOCK` = 128 values: 7.53x
fewer bytes. Blocks rather than one scale per bucket because a bucket spans many layers whose
displacements differ by orders of magnitude. bf16: round to nearest even, 2x fewer bytes. Encoding
and decoding are whole-tensor operations (no Python loop over blocks), on the tensor's own device.

Where codecs plug in: :data:`CODECS`, the one registry. A codec is a :class:`Codec` subclass with a
``name`` (the ``compress`` value), its ``block``, its byte count ``nbytes(n)`` and ``encode``/
``decode``, registered by :func:`register`; the ``risgd`` block's validator (``compress`` must name
one), the engine, the stats and the cost model (``risgd_ext.cost_model.payload_bytes``) all read it,
so the byte formulas are written once, here. ``none`` is the fp32 all_reduce (no payload to encode).
torch is imported when a codec encodes or decodes, so the validator and the cost model import none
of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INT8_BLOCK = 256  # values per fp32 scale of the int8 codec
INT4_BLOCK = 128  # values per fp32 scale of the int4 codec


class Codec:
    """One ``compress`` value: a payload of ``nbytes(n)`` bytes for ``n`` fp32 values."""

    name = ""
    block = 1  # values that share one scale (a bucket must hold one block with its scale)
    # whether this project measured the codec's accuracy (docs/wide-area.md); the cost model recommends
    # only codecs that it did
    accuracy_measured = True

    def nbytes(self, n: float) -> float:
        """Payload bytes of a bucket of ``n`` fp32 values (an int for an int ``n``)."""
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError

    def encode_lossy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encode(x), decode(encode(x)))``, the second the same values without a decoding pass where
        the codec has them at hand (error feedback needs what was sent)."""
        payload = self.encode(x)
        return payload, self.decode(payload, x.numel())


CODECS: dict[str, Codec] = {}  # compress value -> codec, in registration order


def _quantize(x: torch.Tensor, block: int, levels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scaling: one fp32 scale (absmax / levels) per ``block`` values and the values rounded to
    integers in [-levels, levels] (as fp32, in rows of ``block``, zeros past ``x``)."""
    import torch

    n = x.numel()
    blocks = -(-n // block)
    padded = torch.zeros(blocks * block, dtype=torch.float32, device=x.device)
    padded[:n] = x
    rows = padded.view(blocks, block)
    scale = rows.abs().amax(dim=1) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, torch.round(rows / safe[:, None]).clamp_(-levels, levels)


def _aligned(payload: torch.Tensor, size: int) -> torch.Tensor:
    """``payload`` where its bytes can be viewed as ``size``-byte values (a payload inside a received
    buffer of several may start anywhere: then a copy)."""
    return payload if payload.storage_offset() % size == 0 else payload.clone()


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

        return _aligned(payload, 2).view(torch.bfloat16).float()

    def encode_lossy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        half = x.to(torch.bfloat16)
        return half.view(torch.uint8), half.float()


class _BlockScaled(Codec):
    """Integers in [-levels, levels] with one fp32 scale (absmax / levels) per ``block`` values: the
    scales first (aligned), then the values as the subclass packs them (``_pack`` / ``_unpack``)."""

    levels = 0.0

    def __init__(self, block: int):
        self.block = block

    def _blocks(self, n: float) -> int:
        return int(-(-n // self.block))

    def _value_bytes(self, n: float) -> float:
        raise NotImplementedError

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        """The rounded values (fp32 integers) as payload bytes."""
        raise NotImplementedError

    def _unpack(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """Payload bytes back to the ``n`` rounded values, as fp32."""
        raise NotImplementedError

    def nbytes(self, n: float) -> float:
        return 4 * self._blocks(n) + self._value_bytes(n)  # one fp32 scale per block, then the values

    def _encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the payload, the scales, the rounded values in rows of a block)."""
        import torch

        scale, q = _quantize(x, self.block, self.levels)
        return torch.cat([scale.view(torch.uint8), self._pack(q.view(-1)[:x.numel()])]), scale, q

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode(x)[0]

    def encode_lossy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        payload, scale, q = self._encode(x)
        return payload, (q * scale[:, None]).view(-1)[:x.numel()]

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        import torch

        b, blocks = self.block, self._blocks(n)
        payload = _aligned(payload, 4)
        scale = payload[:4 * blocks].view(torch.float32)
        padded = torch.zeros(blocks * b, dtype=torch.float32, device=payload.device)
        padded[:n] = self._unpack(payload[4 * blocks:4 * blocks + int(self._value_bytes(n))], n)
        return (padded.view(blocks, b) * scale[:, None]).view(-1)[:n]


@register
class Int8(_BlockScaled):
    name = "int8"
    levels = 127.0

    def __init__(self, block: int = INT8_BLOCK):
        super().__init__(block)

    def _value_bytes(self, n: float) -> float:
        return n

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        import torch

        return q.to(torch.int8).view(torch.uint8)

    def _unpack(self, values: torch.Tensor, n: int) -> torch.Tensor:
        import torch

        return values.view(torch.int8).float()


@register
class Int4(_BlockScaled):
    """Two 4-bit values a byte (low nibble first), each ``round(x / scale) + 8`` in [1, 15], and one fp32
    scale (absmax / 7) per block."""

    name = "int4"
    levels = 7.0
    accuracy_measured = False  # not yet: only a 100 Mbit/s subset of the wide-area sweep has run it

    def __init__(self, block: int = INT4_BLOCK):
        super().__init__(block)

    def _value_bytes(self, n: float) -> float:
        return -(-n // 2)

    def _pack(self, q: torch.Tensor) -> torch.Tensor:
        import torch

        q = (q + 8).to(torch.uint8)
        if q.numel() % 2:
            q = torch.cat([q, q.new_full((1,), 8)])  # an odd count: the last byte's high nibble is a zero
        return q[0::2] | (q[1::2] << 4)

    def _unpack(self, values: torch.Tensor, n: int) -> torch.Tensor:
        import torch

        return torch.stack([values & 15, values >> 4], dim=1).view(-1)[:n].to(torch.float32) - 8.0


def chunk_len(codec: Codec, n: int, ranks: int) -> int:
    """Values in each of the ``ranks`` chunks of a two-phase round of ``n`` values: ``ceil(n / ranks)``,
    the last chunks padded with zeros, so that every chunk's payload has the same size (each chunk has
    its own blocks: at most one partial block, one scale, per chunk)."""
    return max(1, -(-n // max(ranks, 1)))


def two_phase_payload(codec: Codec, n: int, ranks: int) -> int:
    """The payload a two-phase round of ``n`` values counts: ``ranks`` chunk payloads (a ring all_reduce
    of it moves 2(N-1)/N of it per rank, as the two phases do: N-1 chunk payloads each way)."""
    return ranks * int(codec.nbytes(chunk_len(codec, n, ranks)))


def make_codec(name: str) -> Codec | None:
    """The codec of a ``compress`` value for the engine (None for ``none``: the fp32 all_reduce)."""
    return None if name == "none" else CODECS[name]
