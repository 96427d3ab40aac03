"""Which sources a stream may read: a stream is a fetch made by the server, so every source is
checked against STREAM_SOURCES (URL prefixes and networks) or VIDEO_DIR before anything is
opened, and nothing is fetched for a refused one."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import SplitResult, unquote, urlsplit, urlunsplit

from app.config import Settings
from app.errors import Forbidden, InvalidRequest

SCHEMES = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
SourceKind = Literal["rtsp", "http", "file"]


class SourceRefused(Forbidden):
    code = "source_refused"


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    target: str  # what is opened: a URL (its host pinned to the checked address) or a path
    shown: str  # what is shown and logged: without credentials
    host: str = ""  # the URL's own host name (HTTP's Host header, TLS's server name)


@dataclass(frozen=True)
class _Prefix:
    scheme: str
    host: str
    port: int
    path: str


@dataclass(frozen=True)
class SourcePolicy:
    prefixes: tuple[_Prefix, ...]
    networks: tuple[Network, ...]
    video_dir: Path | None

    @classmethod
    def of(cls, settings: Settings) -> SourcePolicy:
        prefixes: list[_Prefix] = []
        networks: list[Network] = []
        for item in (part.strip() for part in settings.stream_sources.split(",")):
            if not item:
                continue
            if "://" in item:
                url = _split(item)
                prefixes.append(_Prefix(url.scheme, _host(url), _port(url), url.path or "/"))
            else:
                try:
                    networks.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise ValueError(f"STREAM_SOURCES: {item!r} is neither a URL prefix nor a "
                                     "network") from None
        video_dir = settings.video_dir.resolve() if settings.video_dir is not None else None
        return cls(tuple(prefixes), tuple(networks), video_dir)

    def check(self, text: str) -> Source:
        """The source ``text`` names, if allowed; else SourceRefused (403) or InvalidRequest
        (422: not a source at all). Nothing is fetched; a host name may be resolved (to match
        it against the allowed networks)."""
        text = text.strip()
        if "://" not in text:
            return self._file(text)
        url = _split(text)
        if any(unquote(segment) in (".", "..") for segment in url.path.split("/")):
            raise InvalidRequest("a source URL's path may not have . or .. segments (a server "
                                 "would resolve them outside the allowed prefix)")
        shown = redact(url)
        host, port = _host(url), _port(url)
        if any(p.scheme == url.scheme and p.host == host and p.port == port
               and _under(url.path or "/", p.path) for p in self.prefixes):
            return Source(_kind(url), text, shown, host)
        if self.networks:
            addresses = _resolve(host, port)
            if addresses and all(any(a in n for n in self.networks) for a in addresses):
                # Opened at the address that was checked, so that a second lookup cannot lead
                # elsewhere (HTTPS too: the service's client sends the name for TLS and Host;
                # rtsps, through FFmpeg, keeps the name and resolves it again).
                if url.scheme != "rtsps":
                    return Source(_kind(url), _pin(url, addresses[0]), shown, host)
                return Source(_kind(url), text, shown, host)
        raise SourceRefused(f"the source {shown} is not allowed: STREAM_SOURCES lists the URL "
                            "prefixes and networks a stream may read")

    def _file(self, text: str) -> Source:
        if self.video_dir is None:
            raise SourceRefused("file sources need VIDEO_DIR, which this service does not set")
        path = (self.video_dir / text).resolve()
        if not path.is_relative_to(self.video_dir):
            raise SourceRefused(f"{text!r} is outside VIDEO_DIR")
        if not path.is_file():
            raise InvalidRequest(f"no video file {text!r} under VIDEO_DIR")
        return Source("file", str(path), text)


def _split(text: str) -> SplitResult:
    try:
        url = urlsplit(text)
        url.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise InvalidRequest(f"not a URL: {exc}") from None
    if url.scheme not in SCHEMES:
        raise InvalidRequest(f"unsupported source scheme {url.scheme!r}: use "
                             f"{', '.join(SCHEMES)}, or a file under VIDEO_DIR")
    if not url.hostname:
        raise InvalidRequest("the source URL has no host")
    return url


def _host(url: SplitResult) -> str:
    return (url.hostname or "").lower().rstrip(".")


def _port(url: SplitResult) -> int:
    return url.port or SCHEMES[url.scheme]


def _kind(url: SplitResult) -> SourceKind:
    return "rtsp" if url.scheme.startswith("rtsp") else "http"


def _under(path: str, prefix: str) -> bool:
    return prefix in ("", "/") or path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


def _pin(url: SplitResult, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    literal = f"[{address}]" if address.version == 6 else str(address)
    userinfo = url.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + literal + (f":{url.port}" if url.port else "")
    return urlunsplit((url.scheme, netloc, url.path, url.query, ""))


def redact(url: SplitResult) -> str:
    """The URL without its user name and password, nor its query (which may carry a token)."""
    netloc = url.netloc.rpartition("@")[2]
    return urlunsplit((url.scheme, netloc, url.path, "", ""))
