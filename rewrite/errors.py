"""Errors that name the site and the fix."""


class RewriteError(RuntimeError):
    """Base class of rewrite's own errors."""


class RewriteMismatch(RewriteError):
    """verify=True found a rewritten site that differs from the original."""
