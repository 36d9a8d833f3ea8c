"""Stop signals from the first instruction: a SIGTERM or SIGUSR1 that arrives while the
process is still starting (importing torch, reading data, building the model: seconds to
minutes) is remembered instead of killing it silently (exit 138 for SIGUSR1).

The CLI calls ``catch_early`` before anything else; the trainer's handlers
(``largebatch.train.preemption``) take over and act on a remembered signal with
``take_early`` (the run checkpoints at its first step boundary and exits 0, so a requeued
job resumes). A command that does not train calls ``release_early``: the default handlers
come back and a signal that came meanwhile acts as it would have. Standard library only, so
that importing it costs nothing.
"""
from __future__ import annotations

import signal
from typing import Any, Optional

#: The signals a training run answers with a checkpoint and exit 0 (SIGINT stays Python's
#: KeyboardInterrupt until the trainer's handlers are in place: exit 130).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # stop signals that came before the trainer's handlers, in order


def _remember(signum: int, frame: Any) -> None:
    _received.append(signum)


def catch_early() -> None:
    """Remember the stop signals from now on (only where their handler is the default one:
    an embedding application's own, or an inherited SIG_IGN, is left alone)."""
    for sig in STOP_SIGNALS:
        try:
            if signal.getsignal(sig) == signal.SIG_DFL:
                signal.signal(sig, _remember)
        except ValueError:  # not the main thread: nothing can be installed
            return


def is_early_handler(handler: Any) -> bool:
    """Whether ``handler`` is the one ``catch_early`` installed (it stands for the default)."""
    return handler is _remember


def take_early() -> Optional[int]:
    """The first stop signal remembered (then forgotten), or None."""
    first = _received[0] if _received else None
    _received.clear()
    return first


def release_early() -> None:
    """The default handlers back; a signal remembered meanwhile is raised again now."""
    for sig in STOP_SIGNALS:
        try:
            if is_early_handler(signal.getsignal(sig)):
                signal.signal(sig, signal.SIG_DFL)
        except ValueError:
            return
    first = take_early()
    if first is not None:
        signal.raise_signal(first)
