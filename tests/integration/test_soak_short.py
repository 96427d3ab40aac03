"""The short soak of CI (`make soak` runs 20,000 requests)."""

from __future__ import annotations

from tests.soak import soak


def test_short_soak_keeps_memory_and_file_descriptors_flat() -> None:
    result = soak(requests=1500, warmup=500, concurrency=8)
    print(result)
    assert result["ok"] == 1500
    assert result["rss_growth"] < 0.10
    assert result["fds_after"] <= result["fds_before"]
