"""Draft probabilities carried over to the target vocabulary, after alignment and before verification.

`transfer_top_k` builds TokenTiming's q~ along the DTW path; it is NOT the law of the proxy
tokens and feeds only the approximate rule. `shared_vocabulary_map` serves the exact DRAFT_PROBS rule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# q~(x_j) when no aligned draft alternative has x_j's bytes (a split the draft never made, an
# EOS, an empty A(j)): the reference code's one-hot transfer, so min(1, p/q~) = p(x_j) there and
# that position falls back to the point-mass acceptance instead of an arbitrary small floor,
# which would accept almost everything.
UNMATCHED_PROXY_PROB = 1.0


def transfer_top_k(
    draft_top_k: Sequence[Sequence[tuple[bytes, float]]],
    draft_positions: Sequence[Sequence[int]],
    proxy_ids: Sequence[int],
    target_id_by_bytes: Mapping[bytes, int],
) -> list[dict[int, float]]:
    """q~_j for every proxy position j: the mean over i in A(j) of draft i's top-k mass, by bytes.

    An alternative whose bytes are exactly one target token moves its probability there; any
    other alternative's mass is dropped, so q~_j may sum to less than 1. A(j) with several draft
    positions (many-to-one) averages them; a draft position in several A(j) (one-to-many) gives
    its mass to each. proxy_ids[j] always keeps positive mass (UNMATCHED_PROXY_PROB if none).
    """
    if len(draft_positions) != len(proxy_ids):
        raise ValueError(f"{len(draft_positions)} aligned position sets for {len(proxy_ids)} proxy tokens")
    transferred: list[dict[int, float]] = []
    for positions, proxy_id in zip(draft_positions, proxy_ids):
        mass: dict[int, float] = {}
        for draft_position in positions:
            for alternative_bytes, probability in draft_top_k[draft_position]:
                target_id = target_id_by_bytes.get(alternative_bytes)
                if target_id is not None:
                    mass[target_id] = mass.get(target_id, 0.0) + probability / len(positions)
        if mass.get(proxy_id, 0.0) <= 0.0:
            mass[proxy_id] = UNMATCHED_PROXY_PROB
        transferred.append(mass)
    return transferred


def shared_vocabulary_map(draft_token_bytes: Sequence[bytes], target_id_by_bytes: Mapping[bytes, int]) -> dict[int, int]:
    """Draft id -> target id for every non-empty draft token whose bytes are one target token."""
    return {
        draft_id: target_id_by_bytes[data]
        for draft_id, data in enumerate(draft_token_bytes)
        if data and data in target_id_by_bytes
    }
