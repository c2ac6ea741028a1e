"""``python -m vmem.bench.cell``: one bench run in its own process (vmem.bench.runner.run_cell).

Reads ``{"cell": Cell.to_dict(), "seed", "warmup_s", "observe_s"}`` as JSON on stdin,
times the calibration work (vmem.bench.calibrate), migrates, and writes ``{"report": ...,
"calibration_ms": ..., "vmem_root": ...}`` as JSON on stdout (``vmem_root``: the checkout this
process imported vmem from, which run_cell checks) -- the only thing written there: fd 1 is
pointed at stderr first, so nothing the migration or its children print can corrupt it.
Exit status 0 whenever a report was written (whatever its outcome).
"""
from __future__ import annotations

import json
import os
import sys


def main() -> int:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    from vmem.bench.calibrate import calibration_ms
    from vmem.bench.runner import cell_from_dict, migrate_cell
    from vmem.jsonout import json_default

    job = json.load(sys.stdin)
    calibration = calibration_ms()
    report = migrate_cell(cell_from_dict(job["cell"]), seed=job["seed"], warmup_s=job["warmup_s"],
                          observe_s=job["observe_s"])
    import vmem

    root = os.path.dirname(os.path.dirname(os.path.abspath(vmem.__file__)))
    json.dump({"report": report, "calibration_ms": calibration, "vmem_root": root}, out, default=json_default)
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
