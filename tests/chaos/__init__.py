"""`just chaos`: the DESIGN.md invariants under faults and load, with figures (see __main__)."""

from __future__ import annotations

import attrs


@attrs.define
class Result:
    scenario: str
    ok: bool
    figures: dict[str, object]
    broken: list[str] = attrs.field(factory=list)  # invariants that did not hold
