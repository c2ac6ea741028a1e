"""The bench matrix as pytest items: ``pytest --pyargs vmem.testing.bench_cells --vmem-bench
standard [-n N]`` (vmem.testing.plugin).  Each item is one run of one cell; it fails when
the migration did not complete verified.  Verdicts are ``vmem bench --results FILE
--baseline B``'s job."""
from __future__ import annotations


def test_bench_cell(vmem_bench_run):
    rec = vmem_bench_run
    assert rec["valid"], f"{rec['cell']}: {rec['outcome']} ({rec['reason']})"
