"""Per-layer key/value caches for incremental decoding.

Both caches take keys and values of shape ``(B, n_kv_heads, L, head_dim)``
after RoPE, store them, and return everything a query may attend to. They
keep ``offset``, the number of tokens seen so far, which is also the RoPE
position of the next token; it stays right across several generate calls on
the same cache, so a conversation can go on turn after turn.
"""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """An unbounded cache in preallocated buffers that grow ``step`` tokens at a
    time, so decoding writes into place instead of concatenating per token."""

    step = 256

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    def update_and_fetch(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array]:
        prev, L = self.offset, keys.shape[2]
        if self.keys is None or prev + L > self.keys.shape[2]:
            self._grow(keys, values, prev + L)
        self.offset += L
        self.keys[..., prev : self.offset, :] = keys
        self.values[..., prev : self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def _grow(self, keys: mx.array, values: mx.array, needed: int) -> None:
        B, n_kv_heads, _, k_dim = keys.shape
        capacity = -(-needed // self.step) * self.step
        new_keys = mx.zeros((B, n_kv_heads, capacity, k_dim), keys.dtype)
        new_values = mx.zeros((B, n_kv_heads, capacity, values.shape[3]), values.dtype)
        if self.keys is not None:
            new_keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_values[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_keys, new_values

    def trim(self, n: int) -> int:
        """Forget the last ``n`` tokens; returns how many were dropped."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self.keys[..., : self.offset, :], self.values[..., : self.offset, :]]


class RotatingKVCache:
    """A cache bounded to ``max_size`` tokens: the first ``keep`` tokens (the
    start of the prompt, which attention leans on heavily) plus a window of the
    most recent ones, overwritten in a ring once full.

    While fewer than ``max_size`` tokens have been seen it returns exactly what
    ``KVCache`` returns, so outputs match a full cache until the window is
    exceeded. After that, a query at position ``p`` sees the ``keep`` first
    tokens and positions ``p - (max_size - keep) + 1 .. p``.
    """

    step = 256

    def __init__(self, max_size: int, keep: int = 4) -> None:
        if max_size <= keep:
            raise ValueError(
                f"max_kv_size must be larger than {keep} (the tokens always "
                f"kept from the start of the prompt); got {max_size}"
            )
        self.max_size = max_size
        self.keep = keep
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        # Where the next single-token write goes in the buffers.
        self._idx = 0

    @property
    def window(self) -> int:
        return self.max_size - self.keep

    def _stored(self) -> int:
        return min(self.offset, self.max_size)

    def update_and_fetch(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array]:
        if keys.shape[2] == 1 and self.keys is not None:
            return self._update_in_place(keys, values)
        return self._update_concat(keys, values)

    def _temporal_order(self, x: mx.array) -> mx.array:
        """The stored tokens oldest first (undo the ring's rotation)."""
        n = self._stored()
        if self._idx >= n:
            return x[..., :n, :]
        return mx.concatenate(
            [
                x[..., : self.keep, :],
                x[..., self._idx : n, :],
                x[..., self.keep : self._idx, :],
            ],
            axis=2,
        )

    def _update_concat(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array]:
        # A prompt chunk: attend over the stored tokens plus the whole chunk
        # (the mask hides what falls out of the window), then keep the
        # first `keep` and the newest tokens.
        if self.keys is not None:
            keys = mx.concatenate([self._temporal_order(self.keys), keys], axis=2)
            values = mx.concatenate([self._temporal_order(self.values), values], axis=2)
        self.offset += keys.shape[2] - (self._stored() if self.keys is not None else 0)
        if keys.shape[2] > self.max_size:
            cut = keys.shape[2] - self.window
            self.keys = mx.concatenate(
                [keys[..., : self.keep, :], keys[..., cut:, :]], axis=2
            )
            self.values = mx.concatenate(
                [values[..., : self.keep, :], values[..., cut:, :]], axis=2
            )
        else:
            self.keys, self.values = keys, values
        self._idx = self.keys.shape[2]
        return keys, values

    def _update_in_place(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array]:
        size = self.keys.shape[2]
        if self._idx == size and size < self.max_size:
            grow = min(self.step, self.max_size - size)
            B, n_kv_heads, _, k_dim = self.keys.shape
            v_dim = self.values.shape[3]
            self.keys = mx.concatenate(
                [self.keys, mx.zeros((B, n_kv_heads, grow, k_dim), keys.dtype)], axis=2
            )
            self.values = mx.concatenate(
                [self.values, mx.zeros((B, n_kv_heads, grow, v_dim), values.dtype)],
                axis=2,
            )
        if self._idx == self.max_size:
            self._idx = self.keep
        self.keys[..., self._idx : self._idx + 1, :] = keys
        self.values[..., self._idx : self._idx + 1, :] = values
        self._idx += 1
        self.offset += 1
        n = self._stored()
        return self.keys[..., :n, :], self.values[..., :n, :]

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
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    @property
    def state(self) -> list[mx.array]:
        if self.keys is None:
            return []
        return [self._temporal_order(self.keys), self._temporal_order(self.values)]
