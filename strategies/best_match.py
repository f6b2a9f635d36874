"""Best Match: no login ids; every request is an identify that returns the best-ranked match and adds what
it lacks, several values of one type included (G-BM). Login and logout behave as identify (A2.5)."""

from __future__ import annotations

from dataclasses import dataclass

from strategies.lookup import priority_walk, return_or_create
from strategies.model import Decision, ResolveInput


@dataclass(frozen=True)
class BestMatch:
    name: str = "best_match"
    allows_alias: bool = False

    def decide(self, request: ResolveInput) -> Decision:
        match = priority_walk(request, lambda profile: True)
        reason = "best match by priority walk" if match else "no profile matched: new profile"
        return return_or_create(request, match, reason, multi_valued=True)


BEST_MATCH = BestMatch()
