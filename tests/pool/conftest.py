"""Fixtures of the Queue / Pool / ProcessPoolExecutor suite.

The flavor fixture is named ``impl`` so that the suite's guard applies (watchdog, leftover
children, descriptor leaks) and ``deliberate_difference`` skips the stdlib; ``method`` is
the start method. ``hyperpipe-install`` calls ``install()`` for the test and ``uninstall()``
after it.
"""

from __future__ import annotations

from typing import Iterator

import pytest

import hyperpipe

from pool_support import FLAVORS, START_METHODS, Flavor


@pytest.fixture(params=FLAVORS)
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "hyperpipe-install":
        hyperpipe.install()
        try:
            yield request.param
        finally:
            hyperpipe.uninstall()
    else:
        yield request.param


@pytest.fixture(params=START_METHODS)
def method(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def flavor(impl: str, method: str) -> Flavor:
    return Flavor(impl, method)


@pytest.fixture
def fork_flavor(impl: str) -> Flavor:
    """For what needs no other start method (in-process behaviour)."""
    return Flavor(impl, "fork")
