from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Server, run_server


def require(tool: str) -> str:
    """The path of a tool that ``make test`` installs; a missing one fails, never skips."""
    # The venv's own bin first: make test runs its python without activating the venv.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", ""),
                              "/usr/sbin"])  # nginx lies there, outside some users' PATH
    path = shutil.which(tool, path=search)
    if path is None:
        pytest.fail(f"{tool} is not installed: run `make test`, which installs it")
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("live")) as running:
        yield running


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
