"""StoreError (one clear line: what went wrong and how to fix it) and credential masking.

`mask_text` is the one masking function: every URL or setting that is printed, logged or stored
goes through it (`mask_url` is the same rule for one URL, None kept). It hides
- the password of any `scheme://user:password@host` (a password may hold `/`, `:`, `@`, `?`, `#`:
  everything up to the last `@` of the URL is taken as userinfo, so a malformed URL is over-masked,
  never under-masked), and
- the value of secret-looking query or conninfo parameters (`?password=`, `&X-Amz-Signature=`,
  `X-Amz-Credential`, `X-Amz-Security-Token`, `access_token`, `sslpassword`, `api_key`, ...).
"""

from __future__ import annotations

import re

# scheme://REST, REST running to the next whitespace (a URL cannot hold a raw space)
_URL = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<rest>[^\s]+)")
# parameter names whose values are secrets: in a URL query (after ? & ;) or a libpq conninfo
_SECRET_KEY = (r"(?:[\w.\-]*(?:pass(?:word|wd)?|pwd|secret|token|signature|credential|api[_\-]?key|access[_\-]?key"
               r"|auth)[\w.\-]*|key|sig)")
_PARAM = re.compile(rf"(?i)(?:[?&;]{_SECRET_KEY}|(?:^|(?<=\s))(?:ssl)?password)=(?P<val>[^&#;\s'\"]*)")


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


def _mask_userinfo(m: re.Match) -> str:
    rest = m["rest"]
    at = rest.rfind("@")
    if at < 0:
        return m[0]
    userinfo = rest[:at]
    if ":" not in userinfo:  # a user name alone (or hf://org/name@revision): nothing secret
        return m[0]
    return f"{m['scheme']}{userinfo.split(':', 1)[0]}:***{rest[at:]}"


def mask_text(text: str) -> str:
    """Text with every URL password and secret-looking parameter value replaced by ***."""
    if not text:
        return text
    text = _URL.sub(_mask_userinfo, text)
    return _PARAM.sub(lambda m: m[0] if m["val"] in ("", "***") else m[0][: m.start("val") - m.start()] + "***", text)


def is_secret_name(name: str) -> bool:
    """True for a parameter name whose value the masking rule hides (password, X-Amz-Signature, ...)."""
    return re.fullmatch(f"(?i){_SECRET_KEY}", name) is not None


def mask_url(url: str | None) -> str | None:
    """mask_text for one URL (the same rule); None stays None."""
    return None if url is None else mask_text(url)
