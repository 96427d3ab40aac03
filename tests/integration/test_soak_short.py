"""The short soak of CI (`make soak` runs 20,000 requests)."""

from __future__ import annotations

import pytest

from tests.soak import soak


# 2,000 requests, whose time follows the machine's speed (225 s on a loaded 2-core one):
# pytest's default 300 s guards against hangs, it is no bound on this work.
@pytest.mark.timeout(900)
def test_short_soak_keeps_memory_and_file_descriptors_flat() -> None:
    result = soak(requests=1500, warmup=500, concurrency=8)
    print(result)
    assert result["ok"] == 1500
    assert result["rss_growth"] < 0.10
    assert result["fds_after"] <= result["fds_before"]
