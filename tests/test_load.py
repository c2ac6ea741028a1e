"""Load in CI (scripts/load.py): one agent pair, 16 small guests, 4 migrations in flight at
once, each guest migrated there and back in mixed modes; every migration completes
verified, every guest passes its ledger check, nothing leaks."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile

import pytest

from testhosts import testhosts  # noqa: F401  (the module-scoped fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("vmem_load", os.path.join(ROOT, "scripts", "load.py"))
load = importlib.util.module_from_spec(_spec)
sys.modules["vmem_load"] = load
_spec.loader.exec_module(load)


@pytest.mark.slow
def test_sixteen_guests_with_four_migrations_in_flight(testhosts):  # noqa: F811
    workdir = tempfile.mkdtemp(prefix=f"vmem-load-test-{os.getpid()}-")
    os.chmod(workdir, 0o700)
    try:
        res = load.run_load(testhosts, workdir, guests=16, in_flight=4, size="8M", rate=2000,
                            modes=("precopy", "postcopy", "hybrid"), seed=5, log=lambda *_: None)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    assert res["completed"] == res["migrations"] == 32, res["failed"][:5]
    assert res["max_in_flight"] == 4  # they really overlapped
    assert res["checks_ok"] == 16 and res["listed_at_the_end"] == 16
    assert not res["leaks"], res["leaks"]
