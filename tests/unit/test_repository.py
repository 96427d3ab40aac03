"""The tracked tree stays small: the GPU machine takes at most 64 MiB per command (tree and
carried files together), and generated files (profiles, benchmark scratch) do not belong in git."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_FILE_BYTES = 2 * 1024 * 1024  # outside models/
MAX_TREE_BYTES = 40 * 1024 * 1024


def tracked_sizes() -> dict[str, int]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    names = [n for n in listing.decode().split("\0") if n]
    return {n: (ROOT / n).stat().st_size for n in names if (ROOT / n).is_file()}


def test_no_large_file_outside_models() -> None:
    large = {n: s for n, s in tracked_sizes().items()
             if s > MAX_FILE_BYTES and not n.startswith("models/")}
    assert not large, f"tracked files over 2 MB outside models/: {large}"


def test_tracked_tree_under_40_mb() -> None:
    total = sum(tracked_sizes().values())
    assert total <= MAX_TREE_BYTES, f"tracked tree is {total / 1e6:.1f} MB"


def test_every_setting_has_a_row_in_the_readme() -> None:
    from app.config import Settings, flag_of

    text = (ROOT / "README.md").read_text()
    missing = [name for name in Settings.model_fields
               if f"| `DFINE_{name.upper()}` | `{flag_of(name)}` |" not in text]
    assert not missing, f"settings missing from README's table: {missing}"
