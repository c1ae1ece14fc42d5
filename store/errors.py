"""StoreError (one clear line: what went wrong and how to fix it) and credential masking."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# user:password@ in any scheme://...; the password part is what we hide.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/@\s]*)(?::(?P<pw>[^@/\s]*))?@")


class StoreError(Exception):
    """A persistence failure the user can act on; str() is one line without secrets."""

    def __init__(self, message: str, *secrets: str | None) -> None:
        text = " ".join(str(message).split())  # one line, whatever the cause contained
        for s in secrets:
            if s:
                text = text.replace(s, "***")
        super().__init__(mask_text(text))


class StoreUsageError(StoreError):
    """The request named something that is not there or is malformed (CLI exit 2, not 1)."""


def mask_url(url: str | None) -> str | None:
    """Hide the password (and any secret-looking query values) of a URL; None stays None."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return mask_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"{user}@{host}"
    query = re.sub(r"(?i)\b(password|secret|token|key|sig|signature)=([^&]*)", r"\1=***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_text(text: str) -> str:
    """Mask every user:password@ inside free text (driver error messages, reprs)."""
    return _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}{':***' if m['pw'] is not None else ''}@", text)
