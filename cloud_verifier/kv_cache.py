"""The verifier's KV layout: each session's keys/values in buffers it keeps across steps, attended row by row.

Between the session (which owns a `RowCache` and crops it on commit) and the target forward (target.py).
A forward appends each row's new keys/values in place, past the row's length, and each row attends over a
view of its own buffer: no step copies a cache, and no row is padded to another row's context. The row's
length moves only once the whole forward has succeeded, so a forward that raises leaves every cache as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import AttentionInterface, Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# The attention implementation a TargetModel installs: per-row attention over RowCache buffers inside the
# verifier's forwards, and plain SDPA (with SDPA's masks) everywhere else, as generate() in the tests.
ROW_ATTENTION = "specbridge_rows"


class RowCache:
    """One session's keys and values: per layer a buffer [1, kv_heads, capacity, head_dim], the first `length` real.

    `capacity_tokens` is the session's reservation (prompt + output + draft room): the buffers are allocated
    once, at the first forward, and grow (doubling) only past it.
    """

    def __init__(self, capacity_tokens: int = 0) -> None:
        self.capacity_tokens = capacity_tokens
        self.length = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def crop(self, keep: int) -> None:
        if not 0 <= keep <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {keep}")
        self.length = keep

    def reserve(self, capacity_tokens: int) -> None:
        """Make room for `capacity_tokens` positions now (a kept cache taken over by a longer session)."""
        self.capacity_tokens = max(self.capacity_tokens, capacity_tokens)
        self._keys = [_grown(k, self.capacity_tokens, self.length) if k.shape[2] < self.capacity_tokens else k for k in self._keys]
        self._values = [_grown(v, self.capacity_tokens, self.length) if v.shape[2] < self.capacity_tokens else v
                        for v in self._values]

    def copy(self) -> RowCache:
        """An independent cache of the same positions."""
        copied = RowCache(self.capacity_tokens)
        copied.length = self.length
        copied._keys = [k.clone() for k in self._keys]
        copied._values = [v.clone() for v in self._values]
        return copied

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers allocated (the reservation once the first forward ran)."""
        return sum(t.element_size() * t.nelement() for t in (*self._keys, *self._values))

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Put [1, kv_heads, n, head_dim] new keys/values after `length`; views of this layer's length + n positions."""
        stop = self.length + keys.shape[2]
        if layer == len(self._keys):
            capacity = max(stop, self.capacity_tokens)
            self._keys.append(keys.new_empty((1, keys.shape[1], capacity, keys.shape[3])))
            self._values.append(values.new_empty((1, values.shape[1], capacity, values.shape[3])))
        elif stop > self._keys[layer].shape[2]:
            # Past the reservation (a caller that reserved nothing): doubling keeps growth O(1) a token.
            size = max(stop, 2 * self._keys[layer].shape[2])
            self._keys[layer] = _grown(self._keys[layer], size, self.length)
            self._values[layer] = _grown(self._values[layer], size, self.length)
        self._keys[layer][:, :, self.length : stop] = keys
        self._values[layer][:, :, self.length : stop] = values
        return self._keys[layer][:, :, :stop], self._values[layer][:, :, :stop]


def _grown(buffer: torch.Tensor, size: int, keep: int) -> torch.Tensor:
    """A buffer of `size` positions holding the first `keep` of `buffer`."""
    grown = buffer.new_empty((*buffer.shape[:2], size, buffer.shape[3]))
    grown[:, :, :keep] = buffer[:, :, :keep]
    return grown


def row_mask(past: int, new: int, window: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive [1, 1, new, past + new] mask of a row whose queries sit at positions past..past + new - 1."""
    keys = torch.arange(past + new)[None, :]
    queries = torch.arange(past, past + new)[:, None]
    allowed = keys <= queries
    if window is not None:
        allowed &= queries - keys < window
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None].to(device)


class RowsForward(Cache):
    """The `Cache` of one verifier forward over several sessions' rows.

    The decoder calls `update` per layer with the batch's new keys/values [B, kv_heads, N, head_dim] (rows
    right-padded to N); each row's real ones go into its own buffer. The attention (`row_attention`) then
    reads each row's buffer view and mask from here, so no key/value tensor of the whole batch exists.
    """

    def __init__(self, rows: Sequence[RowCache], new_lengths: Sequence[int], layer_windows: Sequence[int | None],
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__(layers=[])
        self.rows = rows
        self.new_lengths = new_lengths
        self.layer_windows = layer_windows
        self._row_kv: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        windows = set(layer_windows)
        self._masks = {window: [row_mask(row.length, new, window, dtype, device) for row, new in zip(rows, new_lengths)]
                       for window in windows}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        self._row_kv[layer_idx] = [row.write(layer_idx, key_states[b : b + 1, :, :new], value_states[b : b + 1, :, :new])
                                   for b, (row, new) in enumerate(zip(self.rows, self.new_lengths))]
        return key_states, value_states  # unread: row_attention reads each row's own view

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(row.length for row in self.rows)

    def commit(self) -> None:
        """The forward succeeded: every row's length takes in its new tokens."""
        for row, new in zip(self.rows, self.new_lengths):
            row.length += new

    def attend(self, module: torch.nn.Module, query: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """[B, N, heads, head_dim] attention output, each row's real queries against its own keys only."""
        layer = module.layer_idx
        masks = self._masks[self.layer_windows[layer]]
        output = query.new_zeros((query.shape[0], query.shape[2], query.shape[1], query.shape[3]))
        for b, ((keys, values), new) in enumerate(zip(self._row_kv.pop(layer), self.new_lengths)):
            row_output, _ = sdpa_attention_forward(module, query[b : b + 1, :, :new], keys, values, masks[b], **kwargs)
            output[b, :new] = row_output[0]
        return output


def row_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, rows_forward: RowsForward | None = None,
                  **kwargs: object) -> tuple[torch.Tensor, None]:
    if rows_forward is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return rows_forward.attend(module, query, **kwargs), None


AttentionInterface.register(ROW_ATTENTION, row_attention)
AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)
