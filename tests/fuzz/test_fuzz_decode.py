"""A short atheris run on the decode path in CI (`make fuzz` runs a long, randomly seeded one).

The seed is fixed so that CI is reproducible: a crash found by `make fuzz` becomes a named
regression test (see tests/unit/test_imaging.py), not a red build on someone else's commit.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FUZZER = Path(__file__).with_name("fuzz_decode.py")


def test_decode_survives_a_short_fuzzing_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(FUZZER), str(tmp_path / "corpus"), "-runs=30000", "-seed=1",
         "-max_total_time=60", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=180, cwd=FUZZER.parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
