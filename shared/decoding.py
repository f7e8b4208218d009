"""Decoding settings both sides agree on: greedy or sampled, and which exact acceptance rule.

One frozen record travels from the CLI through the wire to the verifier; validation lives here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from shared.errors import UserFacingError


class DecodeMode(Enum):
    GREEDY = "greedy"
    SAMPLE = "sample"


class AcceptanceRule(Enum):
    """How a sampled proposal is accepted (../shared/ALGORITHM.md explains which are exact)."""

    POINT_MASS = "point_mass"  # exact whatever produced the proposal: accept x with probability p(x)
    DRAFT_PROBS = "draft_probs"  # exact: draft samples over the shared vocabulary, min(1, p/q)
    DTW_TRANSFER_APPROX = "dtw_transfer_approx"  # NOT exact: DTW-transferred q in min(1, p/q)


# Logits divided by less overflow float32 (Gemma's soft-capped logits reach +-30: 30 / 1e-2 is far from it;
# 30 / 1e-30 is inf, and inf - inf is the NaN that used to end a session as INTERNAL).
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**64 - 1  # the wire's uint64


class DecodingConfigError(UserFacingError, ValueError):
    """A decoding setting out of its valid range."""


@dataclass(frozen=True)
class DecodingConfig:
    mode: DecodeMode = DecodeMode.GREEDY
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    rule: AcceptanceRule = AcceptanceRule.POINT_MASS

    def __post_init__(self) -> None:
        if not MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE:
            raise DecodingConfigError(f"temperature must lie in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (greedy mode for "
                                      f"less), got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise DecodingConfigError(f"seed must lie in [0, 2**64 - 1], got {self.seed}")
        if self.top_k < 0:
            raise DecodingConfigError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise DecodingConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.mode is DecodeMode.GREEDY and self.rule is not AcceptanceRule.POINT_MASS:
            raise DecodingConfigError(f"acceptance rule {self.rule.value} applies to sampling only")

    @property
    def reads_draft_law(self) -> bool:
        """Whether acceptance reads the draft's top-k laws (greedy and point-mass read the text only)."""
        return self.rule is not AcceptanceRule.POINT_MASS  # greedy always carries POINT_MASS (checked above)

    @property
    def uses_draft_probs(self) -> bool:
        """The DRAFT_PROBS rule: the draft samples over the shared vocabulary and sends that law."""
        return self.rule is AcceptanceRule.DRAFT_PROBS
