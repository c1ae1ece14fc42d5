"""Errors more than one module of the method raises; this module imports nothing, so that any
module can use them without an import cycle (vptq.io raises SourceError, vptq.source loads
through vptq.io)."""


class SourceError(ValueError):
    """The model source cannot be used; the message says what and how to fix it."""


class DependencyError(RuntimeError):
    """An installed library's version is outside what this project supports (a broken environment, not a
    bad request); the message says what to install."""


def first_line(e: BaseException) -> str:
    """`Type: first line of the message` (the type alone when the message is empty): an exception in one line."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
