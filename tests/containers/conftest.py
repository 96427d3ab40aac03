"""The container tests' shared state."""

from __future__ import annotations

import pytest

CONFIG: list[pytest.Config] = []  # for figures printed past pytest's capture


@pytest.fixture(scope="session", autouse=True)
def _keep_config(pytestconfig: pytest.Config) -> None:
    CONFIG[:] = [pytestconfig]
