"""A short atheris run on the decode path in CI (`make fuzz` runs a long one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FUZZER = Path(__file__).with_name("fuzz_decode.py")


def test_decode_survives_a_short_fuzzing_run(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(FUZZER), str(tmp_path / "corpus"), "-runs=3000",
         "-max_total_time=60", f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=180, cwd=FUZZER.parents[2])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
