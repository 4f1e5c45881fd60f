"""The job process's entry point: it asks to die with its worker before anything heavy is
imported (the repair stack takes seconds to import; a worker killed meanwhile must not leave
a job running), then runs :func:`adapter_repair.hub.bot.job.main`.

Only the standard library is imported before the parent-death signal is set.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys


def die_with_worker() -> bool:
    """Linux: SIGKILL this process when its worker dies; exit now if it already has.
    Returns whether the signal is set."""
    worker = int(os.environ.get("ADAPTER_REPAIR_WORKER_PID", "0"))
    try:
        ok = ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL) == 0
    except (OSError, AttributeError):
        ok = False  # not Linux: the worker kills its children when it stops
    if worker and os.getppid() != worker:
        sys.exit("the worker that started this job is gone")
    return ok


if __name__ == "__main__":
    armed = die_with_worker()
    from adapter_repair.hub.bot.job import main

    main(death_signal=armed)
