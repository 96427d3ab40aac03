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


def test_the_settings_page_is_generated_from_every_setting() -> None:
    from app.config import Settings, flag_of, settings_markdown

    table = settings_markdown()
    missing = [name for name in Settings.model_fields
               if f"| `DFINE_{name.upper()}` | `{flag_of(name)}` |" not in table]
    assert not missing, f"settings missing from the generated table: {missing}"
    assert "| `DFINE_MAX_QUEUE` | `--max-queue` | `32` |" in table
    assert "| `DFINE_MODEL_PATH` | `--model-path` | `models/dfine_n_shapes.onnx` |" in table
    page = (ROOT / "docs" / "settings.md").read_text()
    hooks = (ROOT / "docs" / "hooks.py").read_text()
    marker = next(line for line in hooks.splitlines() if line.startswith("MARKER = "))
    assert marker.split("=", 1)[1].strip().strip('"') in page  # the hook fills it in
    assert "| `DFINE_" not in page  # no hand-kept copy that could drift


def test_the_built_site_has_every_page_and_setting() -> None:
    """`make docs` (run by `make test` before pytest) built it with --strict."""
    from app.config import Settings

    site = ROOT / "build" / "site"
    if not (site / "index.html").exists():
        pytest.fail("build/site is missing: run `make docs` (make test does)")
    settings = (site / "settings" / "index.html").read_text()
    assert all(f"DFINE_{name.upper()}" in settings for name in Settings.model_fields)
    for page in ("api", "open-inference-protocol", "models-and-versions", "deployment",
                 "performance", "accuracy", "limits-and-reliability", "development"):
        assert (site / page / "index.html").exists(), page


def test_the_service_imports_and_serves_http_alone_without_grpc_installed() -> None:
    """The GPU check's kit carries no grpcio: with GRPC_PORT=0 nothing may import it."""
    import subprocess
    import sys

    script = ("import sys; sys.modules['grpc'] = sys.modules['tritonclient'] = None\n"
              "from app.cli import main  # noqa\n"
              "from app.config import Settings\n"
              "from app.main import create_app\n"
              "create_app(Settings(grpc_port=0))\n"
              "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
