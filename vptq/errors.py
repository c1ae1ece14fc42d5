"""Errors more than one module of the method raises; this module imports nothing, so that any
module can use them without an import cycle (vptq.io raises SourceError, vptq.source loads
through vptq.io)."""


class SourceError(ValueError):
    """The model source cannot be used; the message says what and how to fix it."""


class DependencyError(RuntimeError):
    """An installed library's version is outside what this project supports (a broken environment, not a
    bad request); the message says what to install."""
