"""The log's writer thread: records written in order, and when it falls behind, dropped and
said so (never an unbounded queue). In a subprocess: logging is the process's."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT

SCRIPT = """
import logging, time
from app import logs
logs.MAX_WAITING_RECORDS = 5
logs.configure("info", "text")
log = logging.getLogger("t")
for i in range(3000):
    log.info("record %d", i)
time.sleep(0.2)
log.info("last")
"""


def test_records_beyond_the_bound_are_dropped_and_counted_and_the_rest_written_in_order(
        ) -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    lines = done.stderr.splitlines()
    numbers = [int(line.rsplit(" ", 1)[1]) for line in lines if "INFO t: record" in line]
    assert numbers == sorted(numbers) and numbers[0] == 0 and len(numbers) < 3000
    dropped = sum(int(line.split("WARNING dfine.logs: ")[1].split()[0]) for line in lines
                  if "log records dropped" in line)
    assert dropped == 3000 - len(numbers)
    assert lines[-1].endswith("INFO t: last")  # written before the process ended


LATER = """
import logging, time
from app import logs
logs.configure("info", "json")
log = logging.getLogger("t")
for i in range(50):
    logs.log_later(log, logging.INFO, "later %d %s", (i, "x"), {"n": i, "path": "/p"})
    log.info("now %d", i)
logs.log_later(log, logging.DEBUG, "below the level", (), {})
logs.log_later(log, logging.INFO, "cannot be made", (), {"message": "a reserved name"})
log.info("the writer goes on")
"""


def test_records_made_later_by_the_writer_keep_their_order_fields_and_level() -> None:
    import json

    done = subprocess.run([sys.executable, "-c", LATER], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=True)
    entries = [json.loads(line) for line in done.stderr.splitlines()]
    assert [e["message"] for e in entries[:100]] == [
        m for i in range(50) for m in (f"later {i} x", f"now {i}")]
    assert entries[100]["level"] == "error" and "could not be made" in entries[100]["message"]
    assert [e["message"] for e in entries[101:]] == ["the writer goes on"]
    later = [e for e in entries if e["message"].startswith("later")]
    assert all(e["n"] == i and e["path"] == "/p" and e["logger"] == "t" and e["level"] == "info"
               for i, e in enumerate(later))
