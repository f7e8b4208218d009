"""The verifier's KV memory: a byte budget that admits sessions by what they may grow to, and the caches
finished sessions leave, kept for a follow-up turn that starts with the same tokens.

Admission (session_registry.py) reserves a session's whole KV (prompt + max_new_tokens positions) when it
opens, so nothing admitted is ever slowed or evicted; kept caches fill what live sessions leave and are
dropped, oldest first, whenever a reservation needs their room.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import psutil
import torch

from cloud_verifier.errors import CapacityError
from cloud_verifier.kv_cache import RowCache

# The default budget: this share of the memory free when the verifier starts (CPU: available RAM; CUDA:
# free device memory less CUDA_HEADROOM_BYTES for activations and the allocator's fragments).
DEFAULT_BUDGET_SHARE = 0.5
CUDA_HEADROOM_BYTES = 2 << 30


def default_budget_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return max(0, int(DEFAULT_BUDGET_SHARE * (free_bytes - CUDA_HEADROOM_BYTES)))
    return int(DEFAULT_BUDGET_SHARE * psutil.virtual_memory().available)


@dataclass
class _KeptCache:
    ids: tuple[int, ...]  # the ids whose keys/values the cache holds, position by position
    cache: RowCache
    nbytes: int


class KvPool:
    """Reservations of live sessions and an LRU of finished sessions' caches, within `budget_bytes`."""

    def __init__(self, budget_bytes: int, bytes_per_token: int, keeps_finished: bool = True) -> None:
        if budget_bytes < 0 or bytes_per_token < 1:
            raise ValueError(f"a KV budget of {budget_bytes} bytes at {bytes_per_token} bytes a token")
        self.budget_bytes = budget_bytes
        self.bytes_per_token = bytes_per_token
        self.keeps_finished = keeps_finished
        self.reserved_bytes = 0
        self.kept_bytes = 0
        self._kept: OrderedDict[int, _KeptCache] = OrderedDict()
        self._next_key = 0
        self._lock = threading.Lock()  # sessions open on the engine's CPU threads and close on the event loop

    def reserve(self, tokens: int) -> int:
        """Reserve the KV of `tokens` positions (dropping kept caches if need be); its bytes, for `release`."""
        needed = tokens * self.bytes_per_token
        with self._lock:
            while self._kept and self.reserved_bytes + self.kept_bytes + needed > self.budget_bytes:
                self._drop_oldest()
            if self.reserved_bytes + needed > self.budget_bytes:
                raise CapacityError(f"the verifier's KV cache budget is spent ({self.reserved_bytes >> 20} of "
                                    f"{self.budget_bytes >> 20} MiB reserved; this session needs {needed >> 20} MiB more); "
                                    f"retry later")
            self.reserved_bytes += needed
        return needed

    def release(self, reserved_bytes: int) -> None:
        with self._lock:
            self.reserved_bytes -= reserved_bytes

    def keep(self, ids: Sequence[int], cache: RowCache) -> None:
        """Keep a finished session's cache of `ids` (its committed ids), if the budget has room for it."""
        ids = tuple(ids[: cache.length])
        if not ids or not self.keeps_finished:
            return
        nbytes = cache.nbytes
        with self._lock:
            while self._kept and self.reserved_bytes + self.kept_bytes + nbytes > self.budget_bytes:
                self._drop_oldest()
            if self.reserved_bytes + nbytes > self.budget_bytes:
                return
            self._kept[self._next_key] = _KeptCache(ids, cache, nbytes)
            self._next_key += 1
            self.kept_bytes += nbytes

    def take_prefix(self, ids: Sequence[int], capacity_tokens: int) -> tuple[RowCache, int]:
        """A cache for a session on `ids` and the positions it already holds: the kept cache sharing the
        longest prefix, cropped to it, else a new one.

        It never holds all of `ids`: a forward needs at least one new token to give the next token's logits.
        Positions up to the common prefix depend on those ids alone, so they are what a prefill would compute.
        """
        with self._lock:
            best_key, best_length = None, 0
            for key, kept in self._kept.items():
                length = _common_prefix_length(kept.ids, ids)
                if length > best_length:
                    best_key, best_length = key, length
            if best_key is None:
                return RowCache(capacity_tokens), 0
            kept = self._kept.pop(best_key)
            self.kept_bytes -= kept.nbytes
            reused = min(best_length, len(ids) - 1)
        kept.cache.crop(reused)
        kept.cache.reserve(capacity_tokens)
        return kept.cache, reused

    def _drop_oldest(self) -> None:
        _, kept = self._kept.popitem(last=False)
        self.kept_bytes -= kept.nbytes


def _common_prefix_length(first: Sequence[int], second: Sequence[int]) -> int:
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length
