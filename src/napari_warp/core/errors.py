"""Exception types: one per failure kind, each naming the file and what was wrong."""

from __future__ import annotations

import os


class NapariWarpError(Exception):
    """Base class of every error napari-warp raises on purpose."""


class UnreadableFileError(NapariWarpError, OSError):
    """A file that cannot be read as what it claims to be.

    The message always starts with the path, followed by the reason, e.g.
    ``movie.tif: truncated: 12 of 40 frames``.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # picklable across processes (Dask workers)
        return (type(self), (self.path, self.reason))


class UnreadableMovieError(UnreadableFileError):
    """A movie, micrograph or volume that cannot be read (bad header, truncated, unsupported mode, ...)."""


class GainReferenceError(UnreadableFileError):
    """A gain reference or defect map that cannot be read or does not fit the movie."""


class MetadataError(UnreadableFileError):
    """A metadata file (XML, STAR, mdoc, ...) that cannot be parsed."""


class Cancelled(NapariWarpError):
    """Long work stopped on request.

    Cancellation has one mechanism: every long core function takes a ``progress(done, total)`` callback and lets
    this exception, raised from that callback, propagate. A widget's or CLI's callback raises it when its cancel
    flag is set; nothing half-done is written because outputs are written atomically at the end.
    """
