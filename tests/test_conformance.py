"""Run the reusable conformance suite (selfattn/testing) against every registered backend.

The tests live in the package so that third parties can run them with
``pytest --pyargs selfattn.testing --selfattn-backend=NAME``; importing them
here makes the project's own test run parametrize them over all backends,
including the entry-point ``loopback`` test backend (see conftest.py).
"""

from selfattn.testing.test_chunks import *  # noqa: F401,F403
from selfattn.testing.test_conformance import *  # noqa: F401,F403
from selfattn.testing.test_features import *  # noqa: F401,F403,E402
