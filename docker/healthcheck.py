"""The container's HEALTHCHECK: exit 0 when /readyz answers 200 (stdlib only, no curl)."""

import os
import sys
import urllib.error
import urllib.request

port = os.environ.get("DFINE_PORT", "8000")
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except (urllib.error.URLError, OSError):
    sys.exit(1)
