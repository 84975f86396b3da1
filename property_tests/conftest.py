import os
import sys

import pytest
from hypothesis import HealthCheck, settings

# property_tests is a package (its conftest must not share the module name "conftest" with tests/'s when
# pytest collects conftest files as doctest modules); its helpers and tests/'s are imported by bare name.
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "long", max_examples=1000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)

#: Per-test time limit under the long profile (pytest-timeout's 300 s suits the ci profile's 25 examples,
#: not 1000: a long run is slow, not stuck).
LONG_TIMEOUT_S = 3600
_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if PROFILE != "long":
        return
    for item in items:
        if str(item.path).startswith(_HERE + os.sep) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_S))
