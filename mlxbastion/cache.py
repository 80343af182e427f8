"""Per-layer key/value caches for incremental decoding.

Both caches take keys and values of shape ``(B, n_kv_heads, L, head_dim)``
after RoPE, store them, and return everything a query may attend to. They
keep ``offset``, the number of tokens seen so far, which is also the RoPE
position of the next token; it stays right across several generate calls on
the same cache, so a conversation can go on turn after turn.

Either cache can store its keys and values quantized (``bits`` 4 or 8). Each
cached tensor is then the ``(codes, scales, biases)`` triple ``mx.quantize``
returns, grouped along head_dim, and the small helpers below apply every
slice, write and concatenation to the three arrays alike, so both caches keep
one code path for plain and quantized storage. Attention over a quantized
cache goes through ``model.quantized_attention``.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx

from .config import ModelArgs

KV_BITS = (4, 8)
# Largest first: kv_group_size_for falls back along this order.
KV_GROUP_SIZES = (128, 64, 32)

# A cached keys or values tensor, (B, n_kv_heads, slots, ...): a plain array,
# or the (codes, scales, biases) of a quantized one.
Stored = mx.array | tuple[mx.array, ...]


def _parts(x: Stored) -> tuple[mx.array, ...]:
    return x if isinstance(x, tuple) else (x,)


def _map(fn: Callable[[mx.array], mx.array], x: Stored) -> Stored:
    return tuple(fn(a) for a in x) if isinstance(x, tuple) else fn(x)


def _slots(x: Stored, start: int, stop: int | None) -> Stored:
    return _map(lambda a: a[..., start:stop, :], x)


def _concat(pieces: list[Stored]) -> Stored:
    """Join along the token axis."""
    if isinstance(pieces[0], tuple):
        return tuple(
            mx.concatenate(group, axis=2) for group in zip(*pieces, strict=True)
        )
    return mx.concatenate(pieces, axis=2)


def _zeros(like: Stored, n: int) -> Stored:
    """``n`` empty slots shaped and typed like ``like``."""
    return _map(lambda a: mx.zeros((*a.shape[:2], n, a.shape[3]), a.dtype), like)


def _write(dst: Stored, start: int, src: Stored) -> None:
    """Write ``src`` into ``dst`` in place, from slot ``start`` on."""
    for d, s in zip(_parts(dst), _parts(src), strict=True):
        d[..., start : start + s.shape[2], :] = s


def _length(x: Stored) -> int:
    return _parts(x)[0].shape[2]


def kv_group_size_for(head_dim: int, group_size: int = 64) -> int:
    """The quantization group size a cache can use for ``head_dim``.

    ``group_size`` itself when it divides head_dim, otherwise the largest
    smaller one of 64 and 32 that does (a head_dim of 96 gets 32).

    Raises:
        ValueError: ``group_size`` is not 32, 64 or 128, or head_dim is not a
            multiple of 32 (stories260K's head_dim of 8, say), which
            ``mx.quantize`` cannot group.
    """
    _check_group_size(group_size)
    for size in KV_GROUP_SIZES:
        if size <= group_size and head_dim % size == 0:
            return size
    raise ValueError(
        f"--kv-bits needs head_dim divisible by 32; this model's head_dim is {head_dim}"
    )


def kv_cache_bytes(
    args: ModelArgs,
    context_length: int,
    *,
    kv_bits: int | None = None,
    kv_group_size: int = 64,
    dtype_bytes: int = 2,
) -> int:
    """Bytes the keys and values of ``context_length`` tokens take, all layers.

    Unquantized, each head's vector takes ``head_dim * dtype_bytes``.
    Quantized, it takes ``head_dim * kv_bits / 8`` bytes of codes plus a scale
    and a bias per group, both in the activations' dtype. Real caches allocate
    slots in steps (256 for ``KVCache``), so their ``nbytes`` is this figure
    for the rounded up length.

    Args:
        args: the model's config.
        context_length: tokens held, for one sequence.
        kv_bits: 4 or 8 for a quantized cache; None for a plain one.
        kv_group_size: the group size asked for; the one
            ``kv_group_size_for`` picks is counted.
        dtype_bytes: bytes per number of the activations (2 for float16).

    Raises:
        ValueError: as ``kv_group_size_for``, or ``kv_bits`` not 4 or 8.
    """
    head_dim = args.head_dim
    per_head = head_dim * dtype_bytes
    if kv_bits is not None:
        _check_bits(kv_bits)
        groups = head_dim // kv_group_size_for(head_dim, kv_group_size)
        per_head = head_dim * kv_bits // 8 + 2 * groups * dtype_bytes
    n_vectors = 2 * args.num_hidden_layers * args.num_key_value_heads
    return n_vectors * context_length * per_head


def _check_bits(bits: int | None) -> None:
    if bits is not None and bits not in KV_BITS:
        raise ValueError(f"kv_bits must be 4 or 8; got {bits}")


def _check_group_size(group_size: int) -> None:
    if group_size not in KV_GROUP_SIZES:
        raise ValueError(f"kv_group_size must be one of 32, 64, 128; got {group_size}")


class _Storage:
    """What both caches share: the stored tensors, plain or quantized."""

    def __init__(self, bits: int | None, group_size: int) -> None:
        _check_bits(bits)
        _check_group_size(group_size)
        self.bits = bits
        self.group_size = group_size
        self.keys: Stored | None = None
        self.values: Stored | None = None
        self.offset = 0

    def _encode(self, x: mx.array) -> Stored:
        if self.bits is None:
            return x
        if x.shape[-1] % self.group_size:
            raise ValueError(
                f"kv group size {self.group_size} does not divide head_dim "
                f"{x.shape[-1]}; pick one with kv_group_size_for"
            )
        # Limitation: the prompt's own keys are quantized as they are written,
        # so at 4 bits with group 64 small models drift from the first token
        # (SmolLM2-135M); 8 bits, or 4 bits with group 32, keep their tokens.
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    @property
    def nbytes(self) -> int:
        """Bytes of the stored arrays, unused allocated slots included."""
        if self.keys is None:
            return 0
        arrays = _parts(self.keys) + _parts(self.values)
        return sum(a.nbytes for a in arrays)

    @property
    def unquantized_nbytes(self) -> int:
        """What the same slots would take unquantized, in the dtype the keys
        came in (the dtype of the scales); ``nbytes`` for a plain cache."""
        if self.keys is None or self.bits is None:
            return self.nbytes
        numbers_per_code = 32 // self.bits
        return sum(
            codes.size * numbers_per_code * scales.itemsize
            for codes, scales, _ in (self.keys, self.values)
        )


class KVCache(_Storage):
    """An unbounded cache in preallocated buffers that grow ``step`` tokens at a
    time, so decoding writes into place instead of concatenating per token.

    Args:
        bits: store keys and values quantized to 4 or 8 bits; None keeps them
            as they come.
        group_size: numbers along head_dim sharing one scale and bias.
    """

    step = 256

    def __init__(self, *, bits: int | None = None, group_size: int = 64) -> None:
        super().__init__(bits, group_size)

    def update_and_fetch(
        self, keys: mx.array, values: mx.array
    ) -> tuple[Stored, Stored]:
        keys, values = self._encode(keys), self._encode(values)
        prev, L = self.offset, _length(keys)
        if self.keys is None or prev + L > _length(self.keys):
            self._grow(keys, values, prev + L)
        self.offset += L
        _write(self.keys, prev, keys)
        _write(self.values, prev, values)
        return _slots(self.keys, 0, self.offset), _slots(self.values, 0, self.offset)

    def _grow(self, keys: Stored, values: Stored, needed: int) -> None:
        capacity = -(-needed // self.step) * self.step
        new_keys, new_values = _zeros(keys, capacity), _zeros(values, capacity)
        if self.keys is not None:
            _write(new_keys, 0, _slots(self.keys, 0, self.offset))
            _write(new_values, 0, _slots(self.values, 0, self.offset))
        self.keys, self.values = new_keys, new_values

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def state(self) -> list[Stored]:
        if self.keys is None:
            return []
        return [_slots(self.keys, 0, self.offset), _slots(self.values, 0, self.offset)]


class RotatingKVCache(_Storage):
    """A cache bounded to ``max_size`` tokens: the first ``keep`` tokens (the
    start of the prompt, which attention leans on heavily) plus a window of the
    most recent ones, overwritten in a ring once full.

    While fewer than ``max_size`` tokens have been seen it returns exactly what
    ``KVCache`` returns, so outputs match a full cache until the window is
    exceeded. After that, a query at position ``p`` sees the ``keep`` first
    tokens and positions ``p - (max_size - keep) + 1 .. p``.

    ``bits`` and ``group_size`` quantize the stored tensors as in ``KVCache``.
    """

    step = 256

    def __init__(
        self,
        max_size: int,
        keep: int = 4,
        *,
        bits: int | None = None,
        group_size: int = 64,
    ) -> None:
        if max_size <= keep:
            raise ValueError(
                f"max_kv_size must be larger than {keep} (the tokens always "
                f"kept from the start of the prompt); got {max_size}"
            )
        super().__init__(bits, group_size)
        self.max_size = max_size
        self.keep = keep
        # Where the next single-token write goes in the buffers.
        self._idx = 0

    @property
    def window(self) -> int:
        return self.max_size - self.keep

    def _stored(self) -> int:
        return min(self.offset, self.max_size)

    def update_and_fetch(
        self, keys: mx.array, values: mx.array
    ) -> tuple[Stored, Stored]:
        keys, values = self._encode(keys), self._encode(values)
        if _length(keys) == 1 and self.keys is not None:
            return self._update_in_place(keys, values)
        return self._update_concat(keys, values)

    def _temporal_order(self, x: Stored) -> Stored:
        """The stored tokens oldest first (undo the ring's rotation)."""
        n = self._stored()
        if self._idx >= n:
            return _slots(x, 0, n)
        return _concat(
            [
                _slots(x, 0, self.keep),
                _slots(x, self._idx, n),
                _slots(x, self.keep, self._idx),
            ]
        )

    def _update_concat(self, keys: Stored, values: Stored) -> tuple[Stored, Stored]:
        # A prompt chunk: attend over the stored tokens plus the whole chunk
        # (the mask hides what falls out of the window), then keep the
        # first `keep` and the newest tokens.
        if self.keys is not None:
            keys = _concat([self._temporal_order(self.keys), keys])
            values = _concat([self._temporal_order(self.values), values])
        self.offset += _length(keys) - (self._stored() if self.keys is not None else 0)
        if _length(keys) > self.max_size:
            cut = _length(keys) - self.window
            self.keys = _concat([_slots(keys, 0, self.keep), _slots(keys, cut, None)])
            self.values = _concat(
                [_slots(values, 0, self.keep), _slots(values, cut, None)]
            )
        else:
            self.keys, self.values = keys, values
        self._idx = _length(self.keys)
        return keys, values

    def _update_in_place(self, keys: Stored, values: Stored) -> tuple[Stored, Stored]:
        size = _length(self.keys)
        if self._idx == size and size < self.max_size:
            grow = min(self.step, self.max_size - size)
            self.keys = _concat([self.keys, _zeros(self.keys, grow)])
            self.values = _concat([self.values, _zeros(self.values, grow)])
        if self._idx == self.max_size:
            self._idx = self.keep
        _write(self.keys, self._idx, keys)
        _write(self.values, self._idx, values)
        self._idx += 1
        self.offset += 1
        n = self._stored()
        return _slots(self.keys, 0, n), _slots(self.values, 0, n)

    def make_mask(self, L: int, window: int | None = None) -> mx.array | str | None:
        """The mask for ``L`` new tokens, computed before they are added.

        Args:
            L: number of new tokens.
            window: the model's own sliding window, if it has one.
        """
        if L == 1:
            return self._decode_mask(window)
        n = self._stored() if self.keys is not None else 0
        if self.offset + L <= self.max_size and (
            window is None or self.offset + L <= window
        ):
            return "causal"
        # Absolute positions of the keys update_and_fetch will return.
        if n == self.offset:
            k_pos = mx.arange(self.offset + L)
        else:
            k_pos = mx.concatenate(
                [
                    mx.arange(self.keep),
                    mx.arange(self.offset - (n - self.keep), self.offset + L),
                ]
            )
        q_pos = mx.arange(self.offset, self.offset + L)[:, None]
        k_pos = k_pos[None]
        distance = q_pos - k_pos
        mask = (distance >= 0) & ((distance < self.window) | (k_pos < self.keep))
        if window is not None:
            mask = mask & (distance < window)
        return mask

    def _decode_mask(self, window: int | None) -> mx.array | None:
        """The mask for one new token, over the buffer slots it will see.

        Slots are in ring order, not time order, so each slot's position is
        worked out from where the new token will be written.
        """
        if window is None or self.offset < window:
            return None
        n = min(self.offset + 1, self.max_size)
        idx = self.keep if self._idx == self.max_size else self._idx
        slots = mx.arange(n)
        k_pos = self.offset - (idx - slots) % (self.max_size - self.keep)
        k_pos = mx.where(slots < self.keep, slots, k_pos)
        return (self.offset - k_pos < window)[None]

    def trim(self, n: int) -> int:
        # Rotated-out tokens cannot be brought back, so trimming is refused.
        return 0

    @property
    def state(self) -> list[Stored]:
        if self.keys is None:
            return []
        return [self._temporal_order(self.keys), self._temporal_order(self.values)]
