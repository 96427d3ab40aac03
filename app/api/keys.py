"""API keys, one rule for REST and gRPC: a key comes as ``X-API-Key`` or ``Authorization:
Bearer``, is compared in constant time, and an empty one is no key.

Two keys: API_KEY opens inference and reading; CONTROL_API_KEY alone opens the calls that
change what is served (the repository's load and unload), so that a client that may infer
cannot swap models.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from app.config import Settings
from app.errors import Forbidden, Unauthorized


def presented_key(headers: Mapping[str, str]) -> str:
    """The key a request carries ('' for none); ``headers`` with lower-case names."""
    given = headers.get("x-api-key") or None  # an empty header is no key
    if given is None:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
    return given


def _matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def authorize(settings: Settings, headers: Mapping[str, str]) -> None:
    """Inference and reading: the API key, where one is set."""
    if settings.api_key and not _matches(presented_key(headers), settings.api_key):
        raise Unauthorized()


def authorize_control(settings: Settings, headers: Mapping[str, str]) -> None:
    """Loading and unloading models: the control key alone (the API key is not asked for as
    well, and OPEN_PATHS never opens these calls). The API key is refused with 403, so that
    the inference key never swaps models; without a control key such calls are open only on
    a service with no key at all. Any other key, or none, is a 401."""
    given = presented_key(headers)
    if settings.control_api_key and _matches(given, settings.control_api_key):
        return
    if settings.api_key and _matches(given, settings.api_key):
        raise Forbidden("the API key does not open model control calls: they need "
                        "CONTROL_API_KEY" + ("" if settings.control_api_key else
                                             ", which this service does not set"))
    if settings.control_api_key or settings.api_key:
        raise Unauthorized("unauthorized: model control calls need CONTROL_API_KEY")
