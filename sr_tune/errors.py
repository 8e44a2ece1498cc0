"""The errors whose message is for the user. The CLI prints an ``SrTuneError`` as its one line (the traceback
only with ``SR_TUNE_DEBUG=1``) and exits with the code it carries; anything else is a bug, shown with its
traceback."""

from __future__ import annotations


class SrTuneError(Exception):
    """An error for the user, with the command's exit code."""

    exit_code = 2


class InputError(SrTuneError, ValueError):
    """Something the user gave cannot be used: a file, a value, a checkpoint, a weight file (exit code 2)."""
