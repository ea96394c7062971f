"""Which devices a rollout phase starts: the one rule the engine and the dry run share.

A phase given as a percentage covers that share (rounded up, at least one device) of every
device the rollout has selected so far, counting those the selector names now; a phase given as
a batch starts that many more. Devices are taken in id order (ids are key digests, so the order
is arbitrary but stable: the dry run shows what the rollout will do), skipping devices already in
the rollout and devices busy with another deployment.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

from kernex.api.rollouts.schemas import Phase

# Float percentages such as 10.0 * 30 / 100 may land a hair above the integer they mean.
ROUNDING_SLACK = 1e-9


def phase_goal(phase: Phase, *, population: int, covered: int) -> int:
    """How many devices the rollout covers once this phase started."""
    if phase.percent is not None:
        share = math.ceil(phase.percent * population / 100 - ROUNDING_SLACK)
        return max(covered, min(population, max(1, share)))
    return covered + (phase.devices or 0)


def pick(
    phase: Phase, *, selected: Sequence[str], covered: Collection[str], busy: Collection[str]
) -> list[str]:
    """The devices this phase starts, from those selected now, given those the rollout covered."""
    population = len(set(selected) | set(covered))
    wanted = phase_goal(phase, population=population, covered=len(covered)) - len(covered)
    candidates = [d for d in sorted(selected) if d not in covered and d not in busy]
    return candidates[: max(0, wanted)]


def preview(phases: Sequence[Phase], *, selected: Sequence[str], busy: Collection[str]) -> list[list[str]]:
    """Every phase's devices, were the rollout started now with nobody joining or leaving."""
    covered: list[str] = []
    planned: list[list[str]] = []
    for phase in phases:
        chosen = pick(phase, selected=selected, covered=covered, busy=busy)
        covered += chosen
        planned.append(chosen)
    return planned
