"""Pre-emption: SIGTERM, SIGUSR1 and a first Ctrl-C ask the run to checkpoint and stop.

SIGTERM comes from Slurm's pre-emption and time limit and from torchrun's agent forwarding;
SIGUSR1 from ``--signal=USR1@T``; SIGINT from a person at the terminal. The handler only asks
(``Trainer.request_stop``): the step finishes, the ranks agree in the step's collective (one
signalled rank is enough), every rank checkpoints the same step, and the process exits 0 (to
be requeued, or resumed by hand). A second Ctrl-C is Python's own: it aborts at once.

A SIGTERM or SIGUSR1 that arrived during start-up, before these handlers (the CLI remembers
it from its first instruction, ``largebatch.signals``), is a request like any other: the
run checkpoints at its first step boundary and exits 0, with one line saying so.
"""
from __future__ import annotations

import signal
import weakref
from typing import Any

from largebatch.signals import is_early_handler, take_early


def watch_preemption(trainer: Any) -> None:
    """Install the handlers for ``trainer`` (a no-op off the main thread)."""
    previous = {}
    # Weakly: the handler outlives the run, and must not keep its trainer (the model, the engine
    # and the process group with its threads) alive after train() returns.
    trainer_ref = weakref.ref(trainer)

    def request_stop(signum: int, frame: Any) -> None:
        trainer = trainer_ref()
        if trainer is not None and trainer.request_stop():
            if signum == signal.SIGINT:  # the next Ctrl-C aborts, as without largebatch
                signal.signal(signum, previous[signum] or signal.default_int_handler)
                if trainer.engine.is_main:
                    print("largebatch: Ctrl-C: checkpointing after this step, then stopping "
                          "(Ctrl-C again to abort without a checkpoint)", flush=True)
            return
        # Training is over (a host process calling train() lives on): the old handler again
        # (the start-up one stood for the default).
        old = previous[signum]
        signal.signal(signum, signal.SIG_DFL if is_early_handler(old) else old or signal.SIG_DFL)
        signal.raise_signal(signum)
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, request_stop)
        except ValueError:  # not the main thread (e.g. embedded in another app): no handler
            return
    early = take_early()
    if early is not None and trainer.request_stop() and trainer.engine.is_main:
        print(f"largebatch: {signal.Signals(early).name} during start-up: checkpointing after "
              f"the first step, then stopping", flush=True)
