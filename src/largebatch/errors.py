"""The one error a user reads: bad input, named in one line (the CLI exits 2, no traceback).

At the bottom of the package so that every layer can raise it without importing the config.
"""
from __future__ import annotations

#: Exit code of a run stopped by a failed write (disk full, a folder gone read-only, a file
#: over the size limit): sysexits.h's EX_IOERR. Distinct from 2 (bad input: fix the command)
#: and from 0 (pre-empted with a set saved: requeue it), so a job script can tell "free some
#: space, then relaunch" apart from both. Earlier complete checkpoint sets are left intact.
STORAGE_EXIT_CODE = 74


class ConfigError(ValueError):
    """A user-facing configuration error: one line that names the key and the values."""

    #: The CLI's exit code for it.
    exit_code = 2


class StorageError(ConfigError):
    """A write the run needed failed mid-run (``ENOSPC``, ``EROFS``, ``EFBIG``, ...): one line
    naming the file and the reason; the CLI exits ``STORAGE_EXIT_CODE``."""

    exit_code = STORAGE_EXIT_CODE
