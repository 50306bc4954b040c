"""The CLI's error boundary: every error a user or the machine can cause, as one line.

`acf-fast` promises one line `acf-fast: error: ...` and exit status 2 for bad input and a
hostile environment. acf_fast's own errors already say what is wrong, with which file,
and what to do; errors that come straight from the standard library, numpy, h5py or
torch (a full disk, a file of the wrong kind, a truncated archive, a missing key, too
little memory) are given the same shape here: what happened, the file (the error's own
`filename`, else the file being read when it happened, found in the traceback),
and the usual fix. Only programming errors (AttributeError, NameError, ...)
keep their traceback: those are bugs to report, not something a user can fix.
"""

from __future__ import annotations

import csv
import os
import pickle
import struct
import zipfile
from pathlib import Path

from ..utils.outputs import os_error_reason

# a file missing an entry or shorter than it says (KeyError, IndexError), damaged archives
# and pickles, a full or read-only disk (OSError), too little memory
DAMAGED = (KeyError, IndexError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError,
           struct.error, csv.Error)
USER_ERRORS = (ValueError, TypeError, RuntimeError, OSError, MemoryError, OverflowError) + DAMAGED

PACKAGE = Path(__file__).resolve().parents[1]
PATH_NAMES = ("path", "filename", "file", "fname")
MEMORY_WORDS = ("out of memory", "can't allocate memory", "not enough memory")


def file_in_traceback(exc: BaseException) -> str | None:
    """The file being read when `exc` was raised: a local named like a path that names an
    existing file, in the frames from where it was raised out to the first acf_fast frame
    (library frames inside it included; frames further out are about other things)."""
    tb, frames = exc.__traceback__, []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for name in PATH_NAMES:
            value = frame.f_locals.get(name)
            if isinstance(value, (str, os.PathLike)) and os.path.isfile(value):
                return os.fspath(value)
        if frame.f_code.co_filename.startswith(str(PACKAGE)):
            return None
    return None


def describe_error(exc: BaseException) -> str:
    """One line for any of USER_ERRORS (see the module docstring)."""
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        name = exc.filename or file_in_traceback(exc)
        fix = os_error_reason(exc).partition("; ")[2]
        text = f"{exc.strerror or exc}" + (f": {name}" if name else "") + (f"; {fix}" if fix else "")
    elif isinstance(exc, MemoryError) or any(w in text.lower() for w in MEMORY_WORDS):
        said = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        text = (f"out of memory ({said}); lower train's --batch-size or "
                "evaluate's --memory-mb, use --feature-dtype float16, ask for fewer --users at a "
                "time, or use a machine with more memory")
    elif isinstance(exc, DAMAGED):
        name = file_in_traceback(exc)
        fix = ("write it again (run the step that made it)" if name else
               "run with --traceback to see which file, and write it again")
        if isinstance(exc, KeyError):
            text = (f"{name or 'a file'} lacks the entry {text} (damaged, or written in another "
                    f"format); {fix}")
        else:
            text = f"{name or 'a file'} is damaged or truncated ({type(exc).__name__}: {text}); {fix}"
    else:
        text = text or type(exc).__name__
    return " ".join(text.split())       # one line, whatever the message held
