"""The two ways a source fails: for good (fix the recipe or the data) or for now (retry it)."""

from tuneline.errors import UserError


class SourceError(UserError, RuntimeError):
    """A source that cannot be read at all: missing file, unreachable URL, unknown format."""


class SourceUnreachable(SourceError):
    """A network failure worth retrying (timeouts, connection errors, 5xx)."""
