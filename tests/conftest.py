"""Fixtures shared by the integration and end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import Server, run_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The default model, served by a real uvicorn process on a free port."""
    with run_server(tmp_path_factory.mktemp("server"), "--max-batch-size", "8",
                    "--max-delay-ms", "10") as running:
        yield running


