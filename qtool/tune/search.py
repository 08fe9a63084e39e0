"""Search: which precision each layer group gets, from the measured sensitivities.

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
prefixes of the chain and keeps the longest whose drop is within the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from qtool.tune.sensitivity import Group


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
