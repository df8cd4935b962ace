"""The errors of a conversion: what ``fastssl-convert`` prints as one line, and its exit status."""

from __future__ import annotations

from pathlib import Path


class ConvertError(Exception):
    """A user error (bad SRC, DST already converted, bad option): main() prints it without a traceback."""

    exit_code = 2


class OutputError(ConvertError):
    """Writing DST failed (disk full, I/O error): the message names the file; exit status 1."""

    exit_code = 1


class VerifyError(ConvertError):
    """``--verify`` found a file that disagrees with the manifest; the message names it; exit status 1."""

    exit_code = 1


def output_error(e: OSError, path: Path) -> OutputError:
    """A write failure as a one-line error naming the file (the OS often names none, e.g. for ENOSPC)."""
    name = e.filename if e.filename else path
    return OutputError(f"{name}: cannot write: {e.strerror or e}")
