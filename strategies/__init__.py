"""Pure IDSync decision logic: one module per strategy, no I/O, no store.

`strategy_for(name)` returns the module-level strategy object for a workspace's `strategy` setting.
"""

from __future__ import annotations

from strategies.best_match import BEST_MATCH
from strategies.model import Strategy
from strategies.profile_conversion import DEFAULT, PROFILE_CONVERSION
from strategies.profile_isolation import PROFILE_ISOLATION
from strategies.profile_link import PROFILE_LINK

_BY_NAME: dict[str, Strategy] = {
    s.name: s for s in (DEFAULT, PROFILE_CONVERSION, PROFILE_LINK, PROFILE_ISOLATION, BEST_MATCH)
}


def strategy_for(name: str) -> Strategy:
    return _BY_NAME[name]
