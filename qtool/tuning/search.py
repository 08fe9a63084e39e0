"""Phase 3 of ``qtool tune``: which precision each layer group gets, from the measured sensitivities.

Sizes (bytes) of a group of ``n`` weights at ``b`` bits, as the converters store them:

- 32: ``4 n`` (float);
- 8 in the int8 schemes: ``n`` (+ one float scale per output channel, ignored);
- weight-only ``b`` bits in blocks of ``bs`` (also a Conv below 8 bits): ``n s / 8 + 4 n
  ceil(k / bs) / k`` with ``s`` the storage width (3-bit codes are stored in 4-bit
  containers) and ``k`` the blocked axis (K, D or C/g; a shorter last block still has a
  scale), one float32 scale per block; ``4 n / bs`` when the members' ``k`` differ.

The search orders single-step moves (one group one precision lower) greedily by bytes
saved per unit of estimated loss, where a move's loss is its measured metric drop
(clamped at 0) plus ``budget * dN / N_all``: ``dN`` the move's added output noise power
(from the SQNR proxy, ``N = 10^(-SQNR/10)``, noise powers of independent layers add up)
and ``N_all`` the noise of every group at its lowest precision. The noise term ranks moves
that a small split's metric cannot tell apart. Applying the first ``k`` moves of that
order gives a chain of candidates from float (k = 0) to all-lowest; the tuner measures
prefixes of the chain and keeps the longest whose drop is within the budget (``max-drop``,
a bisection), or the shortest whose estimated size is within it (``target-size``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from qtool.tuning.frontier import Candidate
from qtool.tuning.groups import Group
from qtool.tuning.options import Budget, Clock
from qtool.tuning.sensitivity import Measurer, Sensitivities


def storage_bits(bits: int) -> int:
    return 4 if bits == 3 else bits


def group_bytes(group: Group, bits: int, scheme: str, block_size: int) -> float:
    """Estimated stored bytes of ``group`` at ``bits`` (see module doc)."""
    n = group.params
    if bits >= 32:
        return 4.0 * n
    if bits == 16:
        return 2.0 * n
    if bits == 8 and scheme != "weight-only":
        return float(n)
    blocks = n / group.k * math.ceil(group.k / block_size) if group.k else n / block_size
    return n * storage_bits(bits) / 8.0 + 4.0 * blocks


@dataclass(frozen=True)
class Move:
    """Lower ``group`` (an index) from ``src`` to ``dst`` bits."""

    group: int
    src: int
    dst: int
    saved: float  # bytes
    cost: float  # estimated loss, metric units


def noise_power(sqnr_db: float) -> float:
    """Relative output noise power 10^(-SQNR/10) (0 for an exact output)."""
    if not np.isfinite(sqnr_db):
        return 0.0 if sqnr_db > 0 else 1.0
    return float(10.0 ** (-sqnr_db / 10.0))


def order_moves(groups: Sequence[Group], drops: dict[tuple[int, int], float],
                sqnrs: dict[tuple[int, int], float], budget: float, scheme: str,
                block_size: int) -> list[Move]:
    """The greedy chain of moves from all-float to every group at its lowest precision.

    ``drops[(g, bits)]`` / ``sqnrs[(g, bits)]``: group g alone at ``bits``. A pair that
    was not measured (the time budget ran out) makes that move and those below it unavailable.
    """
    lowest_noise = 0.0
    for g, group in enumerate(groups):
        measured = [b for b in group.choices[1:] if (g, b) in sqnrs]
        if measured:
            lowest_noise += noise_power(sqnrs[(g, min(measured))])
    scale = budget / lowest_noise if lowest_noise > 0 else 0.0

    def loss(g: int, bits: int) -> float:
        if bits >= 32:
            return 0.0
        return max(drops[(g, bits)], 0.0) + scale * noise_power(sqnrs[(g, bits)])

    current = [group.choices[0] for group in groups]
    chain: list[Move] = []
    while True:
        best, best_ratio = None, -1.0
        for g, group in enumerate(groups):
            i = group.choices.index(current[g])
            if i + 1 >= len(group.choices):
                continue
            dst = group.choices[i + 1]
            if (g, dst) not in drops:
                continue
            saved = group_bytes(group, current[g], scheme, block_size) - group_bytes(group, dst, scheme, block_size)
            cost = max(loss(g, dst) - loss(g, current[g]), 0.0)
            ratio = saved / (cost + 1e-12)
            if ratio > best_ratio:
                best, best_ratio = Move(g, current[g], dst, saved, cost), ratio
        if best is None:
            return chain
        chain.append(best)
        current[best.group] = best.dst


def assignment_after(groups: Sequence[Group], chain: Sequence[Move], k: int) -> list[int]:
    """Bits per group after the first ``k`` moves of ``chain``."""
    bits = [group.choices[0] for group in groups]
    for move in chain[:k]:
        bits[move.group] = move.dst
    return bits


def estimated_bytes(groups: Sequence[Group], bits: Sequence[int], other_bytes: float, scheme: str,
                    block_size: int) -> float:
    """Estimated model size: the bytes outside the groups plus every group at its bits."""
    return other_bytes + sum(group_bytes(g, b, scheme, block_size) for g, b in zip(groups, bits))


def raise_most_sensitive(groups: Sequence[Group], bits: list[int], drops: dict[tuple[int, int], float],
                         sqnrs: dict[tuple[int, int], float]) -> list[int] | None:
    """Fallback step: one precision up for the lowered group whose current setting hurts most.

    "Hurts most" = largest measured drop, then lowest SQNR. None when every group is float.
    """
    worst, worst_key = None, None
    for g, group in enumerate(groups):
        if bits[g] >= group.choices[0]:
            continue
        key = (drops.get((g, bits[g]), 0.0), -sqnrs.get((g, bits[g]), 0.0))
        if worst_key is None or key > worst_key:
            worst, worst_key = g, key
    if worst is None:
        return None
    out = list(bits)
    i = groups[worst].choices.index(bits[worst])
    out[worst] = groups[worst].choices[i - 1]
    return out


@dataclass(frozen=True)
class SizeModel:
    """Estimated model bytes of an assignment: ``other_bytes`` outside the groups plus each group."""

    groups: Sequence[Group]
    other_bytes: float
    scheme: str
    block_size: int

    def estimate(self, bits: Sequence[int]) -> float:
        return estimated_bytes(self.groups, bits, self.other_bytes, self.scheme, self.block_size)


@dataclass
class ChainSearch:
    """The chain, the prefix ``k`` the search kept, and every prefix it measured."""

    chain: list[Move]
    size: SizeModel
    measurer: Measurer
    budget: float  # metric units (max-drop) or bytes (target-size)
    k: int = 0
    candidates: list[Candidate] = field(default_factory=list)
    out_of_time: bool = False
    notes: list[str] = field(default_factory=list)

    def assignment(self, k: int) -> list[int]:
        return assignment_after(self.size.groups, self.chain, k)

    def fits(self, k: int) -> bool:
        """Measure the first ``k`` moves on the search split: is the drop within the budget?"""
        bits = self.assignment(k)
        score = self.measurer.measure(bits, f"chain[{k}]")
        drop = self.measurer.scorer.drop(score)
        self.candidates.append(Candidate.scored(f"chain {k}/{len(self.chain)}", "search", self.size.estimate(bits),
                                                score, drop, bits))
        return drop <= self.budget

    def longest_within(self, clock: Clock, advance) -> None:
        """Bisect for the longest prefix within the drop budget (float, k = 0, if none is)."""
        lo, hi = 0, len(self.chain)
        if self.chain and self.fits(hi):
            lo = hi
        advance(1)
        while hi - lo > 1:
            if clock.short_of(5):
                self.out_of_time = True
                self.notes.append("time budget: the chain search stopped early (kept the last prefix within budget)")
                break
            mid = (lo + hi) // 2
            if self.fits(mid):
                lo = mid
            else:
                hi = mid
            advance(1)
        self.k = lo

    def shortest_under(self, target_mb: float, advance) -> None:
        """The shortest prefix whose estimated size is within the budget (all of it if none is)."""
        sizes = [self.size.estimate(self.assignment(i)) for i in range(len(self.chain) + 1)]
        self.k = next((i for i, size in enumerate(sizes) if size <= self.budget), len(self.chain))
        if sizes[self.k] > self.budget:
            self.notes.append(f"even every group at its lowest precision is estimated above {target_mb} MB")
        self.fits(self.k)
        advance(1)


def search(sens: Sensitivities, size: SizeModel, measurer: Measurer, budget: float, spec: Budget, clock: Clock,
           progress) -> ChainSearch:
    """Order the moves (see the module doc) and keep the prefix of the chain the budget allows."""
    chain = order_moves(size.groups, sens.drops, sens.sqnrs, budget if spec.mode == "max-drop" else 1.0,
                        size.scheme, size.block_size)
    found = ChainSearch(chain, size, measurer, budget)
    with progress("search", None, "candidates") as advance:
        if spec.mode == "max-drop":
            found.longest_within(clock, advance)
        else:
            found.shortest_under(spec.target_mb, advance)
    return found

