"""Progress bars that suit both a terminal and a log file.

tqdm redraws a bar about ten times a second; written to a log (stderr not a terminal,
e.g. a batch job or `make demo > log`) every redraw is another line, thousands per
epoch. There, a bar updates every 30 s unless its caller says otherwise.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

LOG_INTERVAL_S = 30.0


def bar(*args, **kwargs) -> tqdm:
    """tqdm(*args, **kwargs), updating at most every 30 s when stderr is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if "mininterval" not in kwargs and not getattr(stream, "isatty", lambda: False)():
        kwargs["mininterval"] = LOG_INTERVAL_S
    return tqdm(*args, **kwargs)
