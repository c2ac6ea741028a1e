"""The migration report: what happened, in numbers a user can trust.

Schema (version 2) is documented in docs/report.md, key by key (tests/test_report.py holds
the two to each other); scripts rely on the top-level keys ``outcome, reason, verified,
downtime_ms, migration_time_s, total_time_s, guest_pages, pages_sent, bytes_sent, rounds`` and on each round's ``pages_sent, bytes_sent, duration_s,
dirty_pages, dirty_rate_pps, bandwidth_bps``.  Adding keys is compatible; renaming or
removing one bumps ``schema_version``.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from vmem.jsonout import json_default

__all__ = ["RoundStats", "MigrationReport", "REPORT_SCHEMA_VERSION", "query_status"]

#: 2: ``downtime_ms`` between agents is on the source's clock (``clock``); added
#: ``migration_time_s``, ``setup_time_ms``, ``verify_s``, ``observe_s``, ``zero_pages``,
#: ``downtime_uncertainty_ms``, ``clock``, ``provenance`` and ``postcopy.blocktime_ms``.
REPORT_SCHEMA_VERSION = 2


@dataclass
class RoundStats:
    """One precopy round, or the final stop-and-copy round (``kind='stop-and-copy'``).

    Attributes:
        index: 0 for the full first round.
        kind: "precopy", "stop-and-copy" or "postcopy" (the push after the switch).
        pages_sent / bytes_sent: what this round put on the wire (bytes include framing).
        duration_s: wall time of the round's sending.
        dirty_pages: pages dirty at the end of the round (what the next round must send).
        dirty_rate_pps: dirty_pages / time since the previous collect.
        bandwidth_bps: bytes_sent * 8 / duration_s (bits per second, as links are rated).
        collect_ms: time the dirty tracker's collect took at the end of the round.
        guest_stopped_ms: how long the guest's process was stopped for that collect
            (``--collect-stop``; 0 without it).
        throttle: guest CPU throttle in force during the round (auto-converge), 0..0.99.
        decision / reason: what the policy said after this round.
    """

    index: int
    kind: str = "precopy"
    pages_sent: int = 0
    bytes_sent: int = 0
    duration_s: float = 0.0
    dirty_pages: int = 0
    dirty_rate_pps: float = 0.0
    bandwidth_bps: float = 0.0
    collect_ms: float = 0.0
    guest_stopped_ms: float = 0.0
    est_downtime_ms: float | None = None
    throttle: float = 0.0
    decision: str = ""
    reason: str = ""


@dataclass
class MigrationReport:
    """The full report of one migration (see docs/report.md)."""

    outcome: str = "failed"           # "completed", "aborted" or "failed"
    reason: str = ""
    verified: bool = False
    downtime_ms: float | None = None  # guest-visible: source pause ack -> first step at destination
    #: handshake -> source released (its guest exited after the commit), what QMP's
    #: total-time means; None unless the migration got that far.
    migration_time_s: float | None = None
    total_time_s: float = 0.0         # handshake -> end of the report (adds the observe window)
    guest_pages: int = 0
    pages_sent: int = 0
    bytes_sent: int = 0
    rounds: list[RoundStats] = field(default_factory=list)
    schema_version: int = REPORT_SCHEMA_VERSION
    mode: str = "precopy"             # "precopy", "postcopy" (pure) or "hybrid"
    phase: str = ""                   # phase reached (where it failed, if it did)
    tracker: str = ""
    policy: dict = field(default_factory=dict)
    bandwidth_limit_bps: float | None = None   # the link's cap (--bandwidth) at the start
    #: caps changed while the migration ran (SourceMigration.set_bandwidth, virsh
    #: migrate-setspeed): [{at_s, what, old, new}]
    speed_changes: list = field(default_factory=list)
    workload: dict = field(default_factory=dict)
    guest_size_bytes: int = 0
    timings_ms: dict = field(default_factory=dict)     # pause latency, stop-and-copy, resume...
    verification: dict = field(default_factory=dict)   # digest comparison + guest ledger check
    guest: dict = field(default_factory=dict)          # progress before/after, pids
    processes: dict = field(default_factory=dict)      # cpu_s, uss_bytes per process
    source_guest_state: str = ""                       # "exited" after commit, else "running"/"crashed"/"paused"
    setup_time_ms: float | None = None      # handshake -> first page sent (tracking armed)
    verify_s: float | None = None           # the verify phase: digests compared, guest check
    observe_s: float | None = None          # source released -> end of the report
    zero_pages: int = 0                     # pages that never crossed as 4 KiB of data: they were zero
    #: pages the destination received straight into its guest's RAM, with no staging copy
    #: (pre-copy batches of consecutive pages when its RAM was mapped ahead: --prealloc)
    pages_in_place: int | None = None
    #: guest-observed: the longest gap between two consecutive workload steps from the pause
    #: to the end of the observe window (>= downtime_ms, which is the first such gap)
    blackout_ms: float | None = None
    blackout_at_s: float | None = None      # when that gap ended, seconds after the pause (source's clock)
    downtime_uncertainty_ms: float | None = 0.0  # ± on downtime_ms from the two clocks (0 on one host)
    clock: dict = field(default_factory=dict)       # vmem.clock.ClockOffset: the destination's clock offset
    provenance: dict = field(default_factory=dict)  # vmem.provenance.collect(): version, commit, host, command
    #: post-copy figures (None for a pure pre-copy migration): faults, fault_latency_us
    #: {p50, p99, max}, pages_demanded, pages_pushed, complete_s, guest_rate {before,
    #: during, after} and more; see docs/report.md.
    postcopy: dict | None = None
    #: the page map written with MigrationOptions.pagemap_path: {file, rounds, push_batches,
    #: faults} or {error}; None when none was recorded (docs/pagemap.md)
    pagemap: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        # Put the keys scripts rely on first, for humans reading the JSON.
        order = ["schema_version", "outcome", "reason", "verified", "downtime_ms", "blackout_ms", "migration_time_s", "total_time_s",
                 "guest_pages", "pages_sent", "bytes_sent", "rounds"]
        return {k: d[k] for k in order} | {k: v for k, v in d.items() if k not in order}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=json_default)

    def write(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())
            f.write("\n")


def query_status(rounds: list[RoundStats], current: dict | None, elapsed_s: float, now: float | None = None) -> dict:
    """What QMP's query-migrate / virsh domjobinfo show, from the rounds so far.

    Keys: ``elapsed_s``; ``expected_downtime_ms`` (the last pre-copy round's estimate: what
    stopping now would cost; None before the first round ends); ``remaining_bytes`` (of
    the round being sent; the whole migration's remainder is unknowable: the next round's
    size is what the guest dirties meanwhile); ``round_eta_s`` (that remainder at the
    round's rate so far, None before a rate is known); ``dirty_rate_pps`` (last round's);
    ``throttle`` (in force, 0..0.99).
    """
    import time

    from vmem.pages import PAGE_SIZE

    pre = [r for r in rounds if r.kind == "precopy"]
    last = pre[-1] if pre else None
    out = {"elapsed_s": round(elapsed_s, 3), "expected_downtime_ms": last.est_downtime_ms if last else None,
           "remaining_bytes": 0, "round_eta_s": None, "dirty_rate_pps": last.dirty_rate_pps if last else None,
           "throttle": last.throttle if last else 0.0}
    if current is not None:
        remaining = max(0, current["pages"] - current["sent"]) * PAGE_SIZE
        out["remaining_bytes"] = remaining
        el = (time.monotonic() if now is None else now) - current["t0"]
        if el > 0 and current["bytes"] > 0:
            out["round_eta_s"] = round(remaining / (current["bytes"] / el), 3)
    return out
