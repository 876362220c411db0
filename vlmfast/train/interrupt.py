"""Ctrl-C (SIGINT) during training: finish the step, save a checkpoint, then stop.

    with StopAfterStep(enabled=True, log=print) as stop:
        trainer.fit(callback=lambda t: stop.check(t))

The first SIGINT only raises a flag (a step cut in the middle would leave the weights and the
optimizer out of step with the step counter: nothing consistent to save); `check`, called after
each completed step, then saves the trainer's checkpoint and raises KeyboardInterrupt, so that a
rerun resumes there, whatever --checkpoint-every says. A second SIGINT stops at once. Off under
data parallel (the checkpoint is a collective: every rank would have to stop at the same step) and
outside the main thread (Python only lets it install signal handlers).
"""

from __future__ import annotations

import signal
import threading


class StopAfterStep:
    def __init__(self, *, enabled: bool = True, log=None):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.log = log or (lambda message: None)
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:  # the second Ctrl-C: stop now
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)
            raise KeyboardInterrupt
        self.requested = True
        self.log("interrupt: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self) -> StopAfterStep:
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)

    def check(self, trainer) -> None:
        """After a completed step: when an interrupt was asked for, checkpoint and stop."""
        if self.requested:
            trainer.save_checkpoint()
            raise KeyboardInterrupt(f"stopped after step {trainer.step}; checkpoint saved")
