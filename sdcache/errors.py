"""One error hierarchy for sdcache.

Each class inherits the matching Python built-in, so callers that already
handle ``FileNotFoundError`` or ``PermissionError`` handle ours too, and
carries its errno, its gRPC status code name and its HTTP status. One table
(:data:`ERRORS`) translates between them in both directions; nothing decides
an error's kind from its message text.
"""

from __future__ import annotations

import errno as _errno


class SdcacheError(Exception):
    """Base of every sdcache error."""

    errno: int = _errno.EIO
    grpc_code: str = "INTERNAL"  # name of a grpc.StatusCode member
    http_status: int = 500

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(SdcacheError, FileNotFoundError):
    """A path, chunk or node that does not exist."""

    errno = _errno.ENOENT
    grpc_code = "NOT_FOUND"
    http_status = 404


class AlreadyExists(SdcacheError, FileExistsError):
    errno = _errno.EEXIST
    grpc_code = "ALREADY_EXISTS"
    http_status = 409


class InvalidPath(SdcacheError, ValueError):
    """A cache path with ``..``, NUL, an empty component or no leading slash."""

    errno = _errno.EINVAL
    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class InvalidArgument(SdcacheError, ValueError):
    errno = _errno.EINVAL
    grpc_code = "INVALID_ARGUMENT"
    http_status = 400


class IsADirectory(SdcacheError, IsADirectoryError):
    errno = _errno.EISDIR
    grpc_code = "FAILED_PRECONDITION"
    http_status = 409


class NotADirectory(SdcacheError, NotADirectoryError):
    errno = _errno.ENOTDIR
    grpc_code = "FAILED_PRECONDITION"
    http_status = 409


class StaleSource(SdcacheError, OSError):
    """The under-store changed or vanished since the file was imported.

    Raised instead of ever returning bytes of another version.
    """

    errno = _errno.ESTALE
    grpc_code = "DATA_LOSS"
    http_status = 410


class CorruptChunk(SdcacheError, OSError):
    """Bytes whose hash does not match their chunk id."""

    errno = _errno.EIO
    grpc_code = "DATA_LOSS"
    http_status = 502


class CapacityExceeded(SdcacheError, OSError):
    """More bytes than a pool can hold (everything left is pinned or in use)."""

    errno = _errno.ENOSPC
    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 507


class Unavailable(SdcacheError, ConnectionError):
    """The metadata service, every node and the under-store were unreachable."""

    errno = _errno.EIO
    grpc_code = "UNAVAILABLE"
    http_status = 503


class Unauthenticated(SdcacheError, PermissionError):
    """No token, or one that is malformed, tampered with, expired or revoked."""

    errno = _errno.EACCES
    grpc_code = "UNAUTHENTICATED"
    http_status = 401


class PermissionDenied(SdcacheError, PermissionError):
    """A valid token whose role may not do this."""

    errno = _errno.EACCES
    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class Overloaded(SdcacheError, ConnectionError):
    """A server at its bound of in-flight work; try again shortly or elsewhere.

    HTTP answers carry ``Retry-After``.
    """

    errno = _errno.EAGAIN
    grpc_code = "RESOURCE_EXHAUSTED"
    http_status = 503


class QueueFull(Overloaded):
    """A serving queue at its bound: HTTP 429 with ``Retry-After`` (as rate limiters answer)."""

    http_status = 429


class DeadlineExceeded(SdcacheError, TimeoutError):
    """Work that did not finish within the time it was given."""

    errno = _errno.ETIMEDOUT
    grpc_code = "DEADLINE_EXCEEDED"
    http_status = 504


class ReadOnly(SdcacheError, PermissionError):
    errno = _errno.EROFS
    grpc_code = "PERMISSION_DENIED"
    http_status = 403


class SchemaTooNew(SdcacheError, OSError):
    """A metadata store written by a newer sdcache: this one cannot read it and changes nothing.

    Run the newer sdcache (or restore a backup taken before the upgrade).
    """

    errno = _errno.EPROTONOSUPPORT
    grpc_code = "FAILED_PRECONDITION"
    http_status = 500


class Busy(SdcacheError, OSError):
    """Still in use: a mount with open files (unmount it lazily, or close them)."""

    errno = _errno.EBUSY
    grpc_code = "FAILED_PRECONDITION"
    http_status = 409


#: Every concrete error class, in the order used to translate codes back.
ERRORS: tuple[type[SdcacheError], ...] = (
    NotFound,
    AlreadyExists,
    InvalidPath,
    InvalidArgument,
    IsADirectory,
    NotADirectory,
    StaleSource,
    CorruptChunk,
    CapacityExceeded,
    Unavailable,
    Unauthenticated,
    PermissionDenied,
    ReadOnly,
    Overloaded,
    Busy,
    SchemaTooNew,
    QueueFull,
    DeadlineExceeded,
)

_BY_NAME = {cls.__name__: cls for cls in ERRORS}


def error_name(exc: SdcacheError) -> str:
    """The wire name of an error, sent beside its message (gRPC trailer, HTTP header)."""
    return type(exc).__name__


def from_wire(name: str | None, message: str, *, grpc_code: str | None = None) -> SdcacheError:
    """Rebuild an error from its wire name, else from its gRPC code, else generic."""
    if name and name in _BY_NAME:
        return _BY_NAME[name](message)
    if grpc_code:
        for cls in ERRORS:
            if cls.grpc_code == grpc_code:
                return cls(message)
    return SdcacheError(message)


def from_errno(code: int, message: str) -> SdcacheError:
    """The error for an errno a system call or tool reported: the class that alone carries it, else generic.

    Several classes share ``EIO`` and ``EACCES``; for those (and errnos no class
    carries) the result is a plain :class:`SdcacheError` with ``errno`` set to *code*.
    """
    matches = [cls for cls in ERRORS if cls.errno == code]
    if len(matches) == 1:
        return matches[0](message)
    err = SdcacheError(message)
    err.errno = code
    return err
