"""SIGINT / SIGTERM during training: stop at a step boundary, resumable, with one line.

The handler only sets a flag. At the next step boundary the trainer writes last.pt with
the mid-epoch state (what `checkpoint_every` writes, so a resume is bit-identical) and
raises `TrainingInterrupted` (a SystemExit with status 130 / 143), which ends the
process after a one-line message. A second signal stops at once (the previous last.pt
stays: writes are atomic). The previous handlers are restored when training returns.
Under torchrun the ranks agree on the signal at every step boundary (one tiny
all-reduce), so all of them stop at the same step.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .. import distributed


class TrainingInterrupted(SystemExit):
    """SIGINT/SIGTERM stopped training at a step boundary after last.pt was written.

    A SystemExit whose status is 128 + the signal number (130 for SIGINT, 143 for
    SIGTERM), so that a command line exits with the conventional status without a
    traceback; `message` (also str()) is the one line printed, `path` the checkpoint.
    """

    def __init__(self, signum: int, message: str, path: Path):
        super().__init__(128 + int(signum))
        self.signum, self.message, self.path = int(signum), message, path

    def __str__(self) -> str:
        return self.message


class SignalWatch:
    """The signal received during training (0: none), acted on at step boundaries."""

    def __init__(self, ctx: distributed.DistContext):
        self.ctx = ctx
        self.received = 0

    @contextmanager
    def installed(self):
        """SIGINT/SIGTERM set `received`; a second signal stops at once. Only the main thread
        can install handlers: elsewhere, none; ignored signals (SIG_IGN) are left ignored.
        The previous handlers come back on exit."""
        self.received = 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        wanted = [signal.SIGINT] + ([signal.SIGTERM] if hasattr(signal, "SIGTERM") else [])
        previous = {s: signal.getsignal(s) for s in wanted}
        # a signal the process was told to ignore (a background job's SIGINT) stays ignored
        previous = {s: h for s, h in previous.items() if h is not signal.SIG_IGN}
        wanted = list(previous)

        def handler(signum, frame):
            if self.received:                # asked twice: stop now, the last checkpoint stays
                for s, h in previous.items():
                    signal.signal(s, h if h is not None else signal.SIG_DFL)
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                raise SystemExit(128 + signum)
            self.received = signum

        try:
            for s in wanted:
                signal.signal(s, handler)
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)

    def pending(self) -> int:
        """The signal to act on now; under torchrun every rank agrees."""
        return distributed.all_reduce_max(self.received, self.ctx)

    def interruption(self, signum: int, where: str, path: Path) -> TrainingInterrupted:
        """The exception ending training, after its one line (printed by rank 0)."""
        name = signal.Signals(signum).name
        message = (f"training interrupted by {name} at {where}; saved {path}; to continue, run "
                   f"the same train command with --resume")
        if self.ctx.is_main:
            print(message, file=sys.stderr, flush=True)
        return TrainingInterrupted(signum, message, path)
