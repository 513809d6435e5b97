"""The two ways a source fails: for good (fix the recipe or the data) or for now (retry it)."""

from __future__ import annotations

import errno

from tuneline.errors import UserError


class SourceError(UserError, RuntimeError):
    """A source that cannot be read at all: missing file, unreachable URL, unknown format."""


class SourceUnreachable(SourceError):
    """A network failure worth retrying (timeouts, connection errors, 5xx)."""


# OS errors about a path that no retry can fix, in words, with the fix.
FINAL_OS_ERRORS = {
    errno.ELOOP: ("symlink loop", "fix the links or point the source at the real file"),
    errno.EACCES: ("permission denied", "give the user running Tuneline read access to it"),
    errno.EPERM: ("operation not permitted", "give the user running Tuneline read access to it"),
    errno.EISDIR: ("is a folder", "name a file inside it"),
    errno.ENOTDIR: ("a part of the path is not a folder", "fix the source's path"),
    errno.ENOENT: ("does not exist", "fix the source's path"),
    errno.ENAMETOOLONG: ("name too long", "fix the source's path"),
    errno.ENXIO: ("no such device", "name a regular file"),
}


def source_os_error(name: str, path: str, error: OSError) -> SourceError:
    """The error to raise for an OS error while reading a source: a final SourceError naming the
    path, what is wrong and the fix when no retry can change it (symlink loop, permission denied,
    a folder...), else SourceUnreachable (worth a retry)."""
    known = FINAL_OS_ERRORS.get(error.errno)
    if known is None:
        return SourceUnreachable(f"source {name!r}: cannot read {path}: {error}")
    what, fix = known
    return SourceError(f"source {name!r}: {path}: {what} ({error.strerror or error}); {fix}")
