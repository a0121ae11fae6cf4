"""Compressed payloads for the cross-node part of a round: bf16, int8 and int4 with block scales, and the
registry of every codec (``int2`` and ``topk``, below 4 bits, are files of their own:
:mod:`risgd_ext.codec_int2`, :mod:`risgd_ext.codec_topk`).

A codec turns fp32 values into a flat ``uint8`` payload of a size fixed by their number (so every
rank's payload for the same piece has the same shape, and gloo and NCCL carry it alike), and back.

The compressed round is a two-phase all-reduce (:mod:`risgd_ext.twophase`; torchft's
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
and decoding are whole-tensor operations on rows of chunks (no Python loop over blocks or chunks), on
the tensor's own device, into buffers the round keeps (``encode_rows``/``decode_rows``): int8 encodes
in 4 passes over the values and decodes in 2, and allocates nothing of their size (a fresh tensor of
100 MB costs a CPU more than the arithmetic: ``benchmarks/bench_codec.py`` prints both ways).

Where codecs plug in: :data:`CODECS`, the one registry. A codec is a :class:`Codec` subclass with a
``name`` (the ``compress`` value), its ``block``, its byte count ``nbytes(n)`` and ``encode_rows``/
``decode_rows`` (or just ``encode``/``decode``: the rows then run chunk by chunk), registered by
:func:`register` (a codec in a file of its own is registered when ``risgd_ext.config`` imports that
file); a codec with a parameter names its variants through ``variant(arg)`` (``topk0.01``), which
the registry resolves without listing them. The ``risgd`` block's validator (``compress`` must name
one), the engine, the stats, the reference and the planner (``risgd_planner.payload_bytes``) all read
it, so the byte formulas are written once, with each codec. ``none`` is the fp32 all_reduce (no
payload to encode). torch is imported when a codec encodes or decodes, so the validator and the cost model import none
of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INT8_BLOCK = 256  # values per fp32 scale of the int8 codec
INT4_BLOCK = 128  # values per fp32 scale of the int4 codec


class Codec:
    """One ``compress`` value: a payload of ``nbytes(n)`` bytes for ``n`` fp32 values.

    The work is done on rows: :meth:`encode_rows` encodes R chunks of ``c`` values at once, each
    chunk on its own (its own blocks and scales), into R payloads, and :meth:`decode_rows` decodes
    them, into buffers the caller keeps between rounds (no allocation of a bucket's size per round:
    a fresh 100 MB tensor costs the CPU more than the arithmetic on it). A chunk's rows are
    ``padded(c)`` long with zeros past ``c``. :meth:`encode`, :meth:`decode` and :meth:`encode_lossy`
    are the same code for one chunk in fresh buffers."""

    name = ""
    block = 1  # values that share one scale (a bucket must hold one block with its scale)
    # whether this project measured the codec's accuracy (docs/wide-area-sweep.md): True (both shapes), False,
    # or the shapes it was measured on ("flat", "node"); the cost model recommends a codec only on a shape
    # it was measured on (measured_on)
    accuracy_measured: bool | tuple[str, ...] = True

    def measured_on(self, shape: str) -> bool:
        """Whether the codec's accuracy was measured on ``shape``: "flat" rounds or the "node" level."""
        m = self.accuracy_measured
        return shape in m if isinstance(m, tuple) else bool(m)

    def nbytes(self, n: float) -> float:
        """Payload bytes of a bucket of ``n`` fp32 values (an int for an int ``n``)."""
        raise NotImplementedError

    def padded(self, c: int) -> int:
        """The length of a chunk of ``c`` values in rows: whole blocks."""
        return -(-c // self.block) * self.block

    def encode_rows(self, x: torch.Tensor, c: int, out: torch.Tensor, tmp: torch.Tensor,
                    lossy: bool = False) -> torch.Tensor | None:
        """Encode the rows of ``x`` ((R, padded(c)) fp32, zeros past ``c``) into ``out`` ((R, nbytes(c))
        uint8), using ``tmp`` (like ``x``); ``lossy``: return the values the payloads decode to, in
        ``tmp`` (error feedback needs what was sent). This default encodes row by row with the
        subclass's own :meth:`encode` (a new codec may define just ``nbytes``, ``encode`` and ``decode``)."""
        if type(self).encode is Codec.encode:
            raise NotImplementedError(f"codec {self.name!r} defines neither encode_rows nor encode")
        for r in range(x.shape[0]):
            out[r].copy_(self.encode(x[r, :c]))
        return self.decode_rows(out, c, tmp) if lossy else None

    def decode_rows(self, payload: torch.Tensor, c: int, out: torch.Tensor) -> torch.Tensor:
        """Decode the rows of ``payload`` ((R, nbytes(c)) uint8) into ``out`` ((R, padded(c)) fp32;
        zeros past ``c``); returns ``out``. This default decodes row by row with :meth:`decode`."""
        if type(self).decode is Codec.decode:
            raise NotImplementedError(f"codec {self.name!r} defines neither decode_rows nor decode")
        for r in range(payload.shape[0]):
            out[r, :c].copy_(self.decode(payload[r], c))
        out[:, c:].zero_()
        return out

    def _row(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        n = x.numel()
        row = torch.zeros(1, self.padded(n), dtype=torch.float32, device=x.device)
        row[0, :n] = x.reshape(-1)
        out = torch.empty(1, int(self.nbytes(n)), dtype=torch.uint8, device=x.device)
        return row, out, torch.empty_like(row)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        row, out, tmp = self._row(x)
        self.encode_rows(row, x.numel(), out, tmp)
        return out.view(-1)

    def encode_lossy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(encode(x), decode(encode(x)))``, the second from the encoder's own values (no decoding pass)."""
        row, out, tmp = self._row(x)
        sent = self.encode_rows(row, x.numel(), out, tmp, lossy=True)
        return out.view(-1), sent[0, :x.numel()]

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        import torch

        out = torch.empty(1, self.padded(n), dtype=torch.float32, device=payload.device)
        return self.decode_rows(_aligned(payload, 4).view(1, -1), n, out)[0, :n]


class _Registry(dict):
    """``compress`` value -> codec, in registration order. A registered codec with a ``variant(arg)``
    method (and a ``variants`` line saying what they are) also names its variants, ``name + arg``
    (``topk0.01``: :class:`risgd_ext.codec_topk.TopK`): looked up and tested with ``in`` like the
    registered names, never listed among them."""

    def __init__(self):
        super().__init__()
        self._variants: dict[str, Codec] = {}

    def _variant(self, key: object) -> Codec | None:
        if not isinstance(key, str):
            return None
        if key not in self._variants:
            for name, codec in self.items():
                make = getattr(codec, "variant", None)
                if make is not None and key.startswith(name) and len(key) > len(name):
                    found = make(key[len(name):])
                    if found is not None:
                        self._variants[key] = found
                    break
        return self._variants.get(key)

    def __missing__(self, key: str) -> Codec:
        codec = self._variant(key)
        if codec is None:
            raise KeyError(key)
        return codec

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or self._variant(key) is not None

    def described(self) -> str:
        """The registered names and, after them, what the variants are (for a one-line error)."""
        variants = [c.variants for c in self.values() if getattr(c, "variant", None) is not None]
        return ", ".join(self) + "".join(f" (or {v})" for v in variants)


CODECS: dict[str, Codec] = _Registry()  # compress value -> codec, in registration order


def _aligned(payload: torch.Tensor, size: int) -> torch.Tensor:
    """``payload`` where its bytes can be viewed as ``size``-byte values (a payload inside a received
    buffer of several may start anywhere: then a copy)."""
    return payload if payload.storage_offset() % size == 0 else payload.clone()


def _as_floats(raw: torch.Tensor) -> torch.Tensor:
    """The (R, 4k) bytes ``raw`` as (R, k) fp32 (a copy where rows or start are not 4-byte aligned)."""
    import torch

    if raw.stride(0) % 4 or raw.storage_offset() % 4 or raw.stride(-1) != 1:
        raw = raw.clone(memory_format=torch.contiguous_format)  # the scales: 1/64 of the payload or less
    return raw.view(torch.float32)


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: add a codec to :data:`CODECS` under its ``name``."""
    if not cls.name or dict.__contains__(CODECS, cls.name):
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
    """bf16, round to nearest even: 2 bytes a value."""

    name = "bf16"

    def nbytes(self, n: float) -> float:
        return 2 * n

    def encode_rows(self, x, c, out, tmp, lossy=False):
        import torch

        half = out.view(torch.bfloat16)  # (R, c)
        half.copy_(x[:, :c])
        if not lossy:
            return None
        tmp[:, :c].copy_(half)
        return tmp

    def decode_rows(self, payload, c, out):
        import torch

        if payload.stride(0) % 2 or payload.storage_offset() % 2:
            payload = payload.clone()
        out.copy_(payload.view(torch.bfloat16))
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # no blocks: no padded row to build
        import torch

        return x.reshape(-1).to(torch.bfloat16).view(torch.uint8)

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        import torch

        return _aligned(payload, 2).view(torch.bfloat16).float()

    def encode_lossy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        half = x.reshape(-1).to(torch.bfloat16)
        return half.view(torch.uint8), half.float()


class _BlockScaled(Codec):
    """Integers in [-levels, levels] with one fp32 scale (absmax / levels) per ``block`` values: per
    chunk, its scales first, then its values as the subclass packs them (``_pack`` / ``_unpack``).
    Encoding: |x| into ``tmp``, the blocks' absmax, ``round(x * levels / absmax)`` into ``tmp``
    (within [-levels, levels] without a clamp), packed into the payload: 4 passes over the values
    and no allocation of their size."""

    levels = 0.0

    def __init__(self, block: int):
        self.block = block

    def _blocks(self, n: float) -> int:
        return int(-(-n // self.block))

    def _value_bytes(self, n: float) -> float:
        raise NotImplementedError

    def _pack(self, q: torch.Tensor, c: int, out: torch.Tensor) -> None:
        """The rounded values ``q`` ((R, padded(c)) fp32 integers, left as they are) into the value bytes
        ``out`` ((R, _value_bytes(c)) uint8)."""
        raise NotImplementedError

    def _unpack(self, values: torch.Tensor, c: int, out: torch.Tensor) -> None:
        """The value bytes back to the rounded values, as fp32, into ``out`` ((R, padded(c)), zeros past c)."""
        raise NotImplementedError

    def nbytes(self, n: float) -> float:
        return 4 * self._blocks(n) + self._value_bytes(n)  # one fp32 scale per block, then the values

    def encode_rows(self, x, c, out, tmp, lossy=False):
        import torch

        b, rows = self.block, x.shape[0]
        sb = 4 * self._blocks(c)
        torch.abs(x, out=tmp)
        amax = tmp.view(-1, b).amax(dim=1)
        scale = amax / self.levels
        inv = self.levels / amax
        # a block of zeros, or one whose absmax is so small (subnormal) that levels/absmax overflows, is sent
        # as zeros: inf * 0 would be NaN, and error feedback would carry it into every later round
        inv = torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))
        torch.mul(x.view(-1, b), inv[:, None], out=tmp.view(-1, b))
        tmp.round_()  # |x * levels / absmax| <= levels (1 + eps): within [-levels, levels] once rounded
        out[:, :sb].copy_(scale.view(rows, -1).view(torch.uint8))
        self._pack(tmp, c, out[:, sb:])
        if not lossy:
            return None
        tmp.view(-1, b).mul_(scale[:, None])
        return tmp

    def decode_rows(self, payload, c, out):
        sb = 4 * self._blocks(c)
        scale = _as_floats(payload[:, :sb])
        self._unpack(payload[:, sb:], c, out)
        out.view(-1, self.block).mul_(scale.reshape(-1, 1))
        return out


@register
class Int8(_BlockScaled):
    """One int8 a value, one fp32 scale (absmax / 127) per :data:`INT8_BLOCK` values."""

    name = "int8"
    levels = 127.0

    def __init__(self, block: int = INT8_BLOCK):
        super().__init__(block)

    def _value_bytes(self, n: float) -> float:
        return n

    def _pack(self, q, c, out):
        import torch

        out.view(torch.int8).copy_(q[:, :c])

    def _unpack(self, values, c, out):
        import torch

        out[:, :c].copy_(values.view(torch.int8))
        out[:, c:].zero_()


@register
class Int4(_BlockScaled):
    """Two 4-bit values a byte (low nibble first), each ``round(x / scale) + 8`` in [1, 15], and one fp32
    scale (absmax / 7) per block; an odd chunk's last high nibble is an 8 (a zero)."""

    name = "int4"
    levels = 7.0
    # measured: within 0.3 pt of fp32 on both shapes of the wide-area sweep, 3 seeds (docs/wide-area.md)

    def __init__(self, block: int = INT4_BLOCK):
        super().__init__(block)

    def _value_bytes(self, n: float) -> float:
        return -(-n // 2)

    def _pack(self, q, c, out):
        import torch

        nb = out.shape[1]
        pairs = q.view(q.shape[0], -1, 2)[:, :nb]  # past c: zeros, i.e. an 8
        # q + 8 in [1, 15] as bytes: through int8 (a negative float to uint8 is undefined), + 8 mod 256
        low = pairs[..., 0].to(torch.int8).view(torch.uint8).add_(8)
        high = pairs[..., 1].to(torch.int8).view(torch.uint8).add_(8).bitwise_left_shift_(4)
        torch.bitwise_or(low, high, out=out)

    def _unpack(self, values, c, out):
        nb = values.shape[1]
        pairs = out.view(out.shape[0], -1, 2)
        pairs[:, :nb, 0].copy_(values & 15)
        pairs[:, :nb, 1].copy_(values >> 4)
        pairs[:, nb:].fill_(8)
        out.sub_(8)


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
