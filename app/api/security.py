"""Security headers on every response (plain ASGI): no MIME sniffing, no referrer, no
framing, and a Content-Security-Policy per kind of answer.

The web page keeps its one inline script and style: the policy allows exactly those by their
SHA-256, computed from the file at startup. Swagger UI (/docs) loads only files of this
service (app/static/swagger) and sets inline styles, which its policy allows.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_POLICY = "default-src 'none'; frame-ancestors 'none'"
DOCS_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
               "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
               "base-uri 'none'; form-action 'none'")


def _hashes(html: str, tag: str) -> str:
    """CSP sources for the inline ``<tag>`` blocks of ``html``."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.DOTALL)
    return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()
                    + "'" for b in blocks)


def page_policy(page: Path) -> str:
    html = page.read_text()
    return (f"default-src 'self'; script-src 'self' {_hashes(html, 'script')}; "
            f"style-src 'self' {_hashes(html, 'style')}; img-src 'self' blob: data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


class SecurityHeaders:
    def __init__(self, app: ASGIApp, page: Path) -> None:
        self.app = app
        self.policies = {"/": page_policy(page).encode(), "/docs": DOCS_POLICY.encode()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policies.get(scope["path"], API_POLICY.encode())

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"content-security-policy", policy),
                                      (b"x-content-type-options", b"nosniff"),
                                      (b"referrer-policy", b"no-referrer"),
                                      (b"x-frame-options", b"DENY")]
            await send(message)

        await self.app(scope, receive, send_with_headers)
