"""Where a benchmark puts the verifier and the edge on one machine: disjoint CPU sets.

In deployment the draft runs on the user's device and the target on a server; a benchmark that
lets them share cores measures contention, not the product. The verifier child process is pinned
at spawn (`VerifierProcess(cpus=...)`), the benchmark process itself (edge clients, and the
network simulator's proxies, which are cheap) to the edge's CPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from shared.errors import UserFacingError


class PlacementError(UserFacingError, ValueError):
    """CPU sets that overlap or name CPUs this process may not use."""


@dataclass(frozen=True)
class Placement:
    verifier_cpus: tuple[int, ...]
    edge_cpus: tuple[int, ...]

    def __post_init__(self) -> None:
        available = os.sched_getaffinity(0)
        for name, cpus in (("--verifier-cpus", self.verifier_cpus), ("--edge-cpus", self.edge_cpus)):
            if not cpus:
                raise PlacementError(f"{name} names no CPU")
            missing = sorted(set(cpus) - available)
            if missing:
                raise PlacementError(f"{name} names CPU {missing[0]}, but this process may use only {sorted(available)}")
        shared = sorted(set(self.verifier_cpus) & set(self.edge_cpus))
        if shared:
            raise PlacementError(f"the verifier and the edge must not share CPUs; both name {shared}")

    @property
    def verifier_threads(self) -> int:
        return len(self.verifier_cpus)

    @property
    def edge_threads(self) -> int:
        return len(self.edge_cpus)

    def describe(self) -> str:
        """One line for every table header."""
        return (f"verifier on CPU {_cpu_list(self.verifier_cpus)} ({self.verifier_threads} torch thread(s)), "
                f"edge on CPU {_cpu_list(self.edge_cpus)} ({self.edge_threads} onnxruntime thread(s))")

    @contextmanager
    def edge_pinned(self) -> Iterator[None]:
        """Pin this process (the edge side of a benchmark) to the edge's CPUs for the block, then restore it."""
        before = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.edge_cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, before)


def _cpu_list(cpus: tuple[int, ...]) -> str:
    return ",".join(str(cpu) for cpu in cpus)


@dataclass(frozen=True)
class PlacementSettings:
    """The CPU-set flags of every benchmark that runs both sides on this machine (a config base class)."""

    verifier_cpus: tuple[int, ...] = field(default=(0,), metadata={"help": "CPUs the verifier process is pinned to"})
    edge_cpus: tuple[int, ...] = field(default=(1,), metadata={"help": "CPUs the edge side (this process) is pinned to"})

    def __post_init__(self) -> None:
        self.placement  # validates the CPU sets (PlacementError, a one-line user error)

    @property
    def placement(self) -> Placement:
        return Placement(verifier_cpus=self.verifier_cpus, edge_cpus=self.edge_cpus)
