"""Local fake destinations over real HTTP for the delivery tests: Braze (`FakeBraze`) and Meta custom audiences
(`FakeFacebook`), with seeded fault injection (`FaultPlan`, `Fault`) shared by both.

Test modules import them as `from fakes import FakeBraze` (pytest puts tests/ on sys.path). Code outside tests/
(bench/) adds the tests directory to sys.path first.
"""

from .braze import BrazeConfig, FakeBraze
from .facebook import AudienceView, FacebookConfig, FakeFacebook
from .faults import Fault, FaultInjector, FaultPlan, LoggedRequest
from .server import FakeServer

__all__ = ["AudienceView", "BrazeConfig", "FacebookConfig", "FakeBraze", "FakeFacebook", "FakeServer", "Fault",
           "FaultInjector", "FaultPlan", "LoggedRequest"]
