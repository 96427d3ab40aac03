"""MkDocs hook: the settings page's table, generated from app.config.Settings at build time."""

from __future__ import annotations

from typing import Any

from app.config import settings_markdown

MARKER = "<!-- the settings table: generated from app.config.Settings (docs/hooks.py) -->"


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, settings_markdown())
    return markdown
