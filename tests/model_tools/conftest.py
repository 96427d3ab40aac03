from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch", reason="model tools need the [models] extra")

from models.synthetic import write_split


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A handful of rendered images, as a COCO split folder."""
    root = tmp_path_factory.mktemp("shapes")
    write_split(root, "train", 6, seed=1, workers=1)
    return root / "train"
