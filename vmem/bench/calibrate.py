"""How fast is this machine right now?  A fixed piece of work, timed before every bench run.

A stored baseline was measured under another load.  On a shared machine the wall-clock
figures of a migration move with the load (measured here: the same commit's migration
time 0.7 s in one session, 4.5 s in another), and no rank test can tell that from a code
change.  So every run first times the same work -- copying 32 MiB with numpy and a short
pure-Python loop, three times (about 30 ms on an idle machine), in the run's own process
just before its guest boots -- and the verdict compares the medians of the two sides'
calibrations: when this run's machine was slower, the thresholds of the timing metrics
in the worse direction grow by that factor (vmem.bench.verdict).
"""
from __future__ import annotations

import time

__all__ = ["calibration_ms", "CALIBRATION_BYTES"]

CALIBRATION_BYTES = 32 << 20


def calibration_ms() -> float:
    """Milliseconds the fixed work took just now (larger: a slower or busier machine)."""
    import numpy as np

    src = np.ones(CALIBRATION_BYTES, dtype=np.uint8)
    dst = np.empty_like(src)
    dst[:] = src  # touch both before timing: page faults are not what we measure
    t0 = time.perf_counter()
    for _ in range(3):
        dst[:] = src
        acc = 0
        for i in range(100_000):
            acc += i
    return round((time.perf_counter() - t0) * 1e3, 3)
