"""Graph rewrites, one per module. Each pass returns a PassReport of what it did."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassReport:
    """What a pass did: counts per rule/op type, nodes left alone and why, free-form notes."""

    name: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> reason
    notes: list[str] = field(default_factory=list)
    # value name -> the name of the input-graph value whose values it now carries (a layer
    # that absorbed the BatchNorm/scale/shift after it); lets a table calibrated on the
    # input graph be applied to the rewritten one.
    carries: dict[str, str] = field(default_factory=dict)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def skip(self, node_name: str, reason: str) -> None:
        self.skipped[node_name] = reason

    @property
    def modified(self) -> bool:
        return any(self.counts.values())
