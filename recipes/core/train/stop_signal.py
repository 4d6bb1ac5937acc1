"""A clean stop on SIGTERM (preemption, `scancel`) or SIGINT (Ctrl-C) while training.

Inside `StopSignals()` the first such signal only sets `requested`: the loop finishes the optimizer step
in progress, all ranks agree on stopping, a checkpoint is written and the process exits with status
EXIT_INTERRUPTED (75, "temporary failure: try again"), so a job script can requeue with
`--resume_from_checkpoint latest`. A second signal of the same kind stops at once. Leaving the context
puts the previous handlers back.
"""

from __future__ import annotations

import signal
import sys

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.requested = True
        signal.signal(signum, signal.SIG_DFL)  # a second one stops at once
        print(
            f"received {signal.Signals(signum).name}: finishing this optimizer step, then saving a checkpoint",
            file=sys.stderr,
            flush=True,
        )
