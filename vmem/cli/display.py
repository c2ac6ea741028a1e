"""Live progress and the final summary, on a terminal (rich).

The live view shows, per round: pages to send, pages sent, *bytes remaining in this round*
(never a percentage of the whole migration, which would run backwards when a round finds
more dirty pages than the last), dirty pages found at its end, and bandwidth.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from vmem.ram import PAGE_SIZE, format_bytes
from vmem.migration.report import MigrationReport, RoundStats, query_status

__all__ = ["LiveDisplay", "format_status", "print_summary", "query_status"]


def _rate(bps: float | None) -> str:
    if not bps:
        return "-"
    return f"{bps / 8 / 1e6:,.0f} MB/s"


def format_status(st: dict) -> str:
    """One line of :func:`query_status` for the live view."""
    parts = [f"elapsed {st['elapsed_s']:.1f} s"]
    if st["expected_downtime_ms"] is not None:
        parts.append(f"expected downtime {st['expected_downtime_ms']:,.1f} ms")
    parts.append(f"remaining {format_bytes(st['remaining_bytes'])} (this round)")
    if st["round_eta_s"] is not None:
        parts.append(f"round ETA {st['round_eta_s']:.2f} s")
    if st["dirty_rate_pps"] is not None:
        parts.append(f"dirty rate {st['dirty_rate_pps']:,.0f} pages/s")
    parts.append(f"throttle {st['throttle'] * 100:.0f} %")
    return " · ".join(parts)


class LiveDisplay:
    """Implements the migrator's progress interface and renders it with rich: a table of
    rounds and, under it, a query-migrate line (:func:`query_status`)."""

    def __init__(self, console: Console | None = None, enabled: bool = True):
        self.console = console or Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.rounds: list[RoundStats] = []
        self.current: dict | None = None
        self.phase_name = "setup"
        self.phase_detail = ""
        self._live: Live | None = None
        self._last_refresh = 0.0
        self._t_start = time.monotonic()

    def __enter__(self):
        if self.enabled:
            self._live = Live(self._render(), console=self.console, refresh_per_second=10, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    # --- progress interface -------------------------------------------------------------
    def phase(self, name: str, detail: str = "") -> None:
        self.phase_name, self.phase_detail = name, detail
        if not self.enabled and name not in ("precopy",):
            self.console.print(f"[dim]· {name}{': ' + detail if detail else ''}[/dim]")
        self._refresh(force=True)

    def round_start(self, index: int, pages: int, kind: str) -> None:
        self.current = {"index": index, "kind": kind, "pages": pages, "sent": 0, "bytes": 0, "t0": time.monotonic()}
        self._refresh(force=True)

    def sent(self, pages: int, nbytes: int) -> None:
        if self.current is not None:
            self.current["sent"] += pages
            self.current["bytes"] += nbytes
        self._refresh()

    def round_end(self, stats: RoundStats) -> None:
        self.rounds.append(stats)
        self.current = None
        if not self.enabled:
            self.console.print(
                f"round {stats.index:>3} {stats.kind:<13} sent {stats.pages_sent:>9,} pages "
                f"({format_bytes(stats.bytes_sent)}) in {stats.duration_s * 1e3:8.1f} ms, "
                f"{_rate(stats.bandwidth_bps)}, dirty {stats.dirty_pages:,}"
                + (f" -> {stats.decision}" if stats.decision else "")
            )
        self._refresh(force=True)

    # --- rendering --------------------------------------------------------------------------
    def _refresh(self, force: bool = False) -> None:
        if self._live is None:
            return
        now = time.monotonic()
        if force or now - self._last_refresh > 0.1:
            self._last_refresh = now
            self._live.update(self._render())

    def _render(self):
        t = Table(title=f"vmem migrate — {self.phase_name}{': ' + self.phase_detail if self.phase_detail else ''}", expand=False)
        for col, just in (("round", "right"), ("kind", "left"), ("to send", "right"), ("sent", "right"),
                          ("remaining", "right"), ("dirty at end", "right"), ("bandwidth", "right"), ("decision", "left")):
            t.add_column(col, justify=just)
        for s in self.rounds[-12:]:
            t.add_row(str(s.index), s.kind, f"{s.pages_sent:,}", f"{s.pages_sent:,}", "0 B",
                      f"{s.dirty_pages:,}" if s.kind == "precopy" else "-", _rate(s.bandwidth_bps),
                      (s.decision + (f" ({s.reason})" if s.reason else "")) if s.decision else "")
        c = self.current
        if c is not None:
            el = time.monotonic() - c["t0"]
            remaining = (c["pages"] - c["sent"]) * PAGE_SIZE
            t.add_row(str(c["index"]), c["kind"], f"{c['pages']:,}", f"{c['sent']:,}", format_bytes(remaining), "…",
                      _rate(c["bytes"] * 8 / el if el > 0 else 0), "", style="bold")
        t.caption = format_status(query_status(self.rounds, c, time.monotonic() - self._t_start))
        return t


def _downtime(report: MigrationReport) -> str:
    if report.downtime_ms is None:
        return "-"
    unc = report.downtime_uncertainty_ms
    if unc:
        return f"{report.downtime_ms:.2f} ± {unc:.3f} ms (on the source's clock)"
    return f"{report.downtime_ms:.2f} ms" + (" (clocks not compared: raw difference)" if unc is None else "")


def _clock(clock: dict) -> str:
    if clock.get("uncertainty_ns") is None:
        return "offset unknown (the destination did not answer clock pings)"
    return (f"offset {clock['offset_ns'] / 1e3:+,.1f} ± {clock['uncertainty_ns'] / 1e3:,.1f} us "
            f"(best of {clock['samples']} pings, round trip {clock['rtt_ns'] / 1e3:,.1f} us)")


def print_summary(report: MigrationReport, console: Console | None = None) -> None:
    """The final table a user reads after a migration."""
    console = console or Console()
    color = {"completed": "green", "aborted": "yellow", "failed": "red"}.get(report.outcome, "white")
    t = Table(title="migration summary", show_header=False)
    t.add_column("what", style="bold")
    t.add_column("value")
    t.add_row("outcome", Text(report.outcome, style=f"bold {color}"))
    if report.reason:
        t.add_row("reason", report.reason)
    t.add_row("verified", "yes" if report.verified else "no")
    t.add_row("guest", f"{report.workload.get('workload')} {report.workload.get('params') or ''}, {format_bytes(report.guest_size_bytes)} ({report.guest_pages:,} pages)")
    t.add_row("tracker / policy", f"{report.tracker or '-'} / {report.policy.get('name', '-')}")
    t.add_row("rounds", str(len(report.rounds)))
    stopped = [r.guest_stopped_ms for r in report.rounds if r.guest_stopped_ms]
    if stopped:
        t.add_row("  guest stopped for collects", f"{len(stopped)} collects, {sum(stopped):.3f} ms in all, longest "
                                                 f"{max(stopped):.3f} ms (--collect-stop)")
    t.add_row("pages sent", f"{report.pages_sent:,} ({report.pages_sent / max(report.guest_pages, 1):.2f}x guest RAM)")
    if report.bandwidth_limit_bps:
        t.add_row("link cap (--bandwidth)", f"{report.bandwidth_limit_bps / 8e6:,.1f} MB/s at the start")
    for ch in report.speed_changes or []:
        flag = "--postcopy-bandwidth" if ch.get("what") == "postcopy_bandwidth_Bps" else "--bandwidth"
        old_cap = "none" if not ch.get("old") else f"{ch['old'] / 1e6:,.1f} MB/s"
        t.add_row(f"  {flag} changed", f"at {ch.get('at_s', 0):.3f} s: {old_cap} -> {ch['new'] / 1e6:,.1f} MB/s "
                                       "(migrate-setspeed)")
    t.add_row("bytes sent", format_bytes(report.bytes_sent))
    if report.zero_pages:
        t.add_row("zero pages (not sent as data)", f"{report.zero_pages:,}")
    if report.migration_time_s is not None:
        timings = report.timings_ms or {}
        prealloc_ms = timings.get("setup_destination_prealloc")
        map_ms = timings.get("setup_destination_map")
        prealloc = (f"of which the destination preallocating RAM {prealloc_ms:.1f} ms"
                    + (f" and mapping it {map_ms:.1f} ms" if map_ms else "")) if prealloc_ms else ""
        parts = [f"setup {report.setup_time_ms:.1f} ms" if report.setup_time_ms is not None else "",
                 prealloc,
                 f"verify {report.verify_s:.3f} s" if report.verify_s is not None else ""]
        t.add_row("migration time", f"{report.migration_time_s:.3f} s (handshake -> source released; "
                                    f"{', '.join(p for p in parts if p)})")
    t.add_row("total time", f"{report.total_time_s:.3f} s"
              + (f" (with {report.observe_s:.3f} s observing the destination guest)" if report.observe_s else ""))
    t.add_row("downtime (guest-visible)", _downtime(report))
    if report.blackout_ms is not None:
        t.add_row("blackout (guest-observed)", f"{report.blackout_ms:.2f} ms, longest step gap, ended "
                                               f"{report.blackout_at_s:.3f} s after the pause")
    clock = report.clock or {}
    if clock and not clock.get("same_host"):
        t.add_row("  destination clock", _clock(clock))
    if report.timings_ms:
        if report.timings_ms.get("prepare_pause") is not None:
            t.add_row("  rehearsal before the pause", f"{report.timings_ms['prepare_pause']:.3f} ms (guest running)")
        t.add_row("  pause latency", f"{report.timings_ms.get('pause_latency', 0):.3f} ms")
        if report.timings_ms.get("pause_to_running") is not None:
            t.add_row("  pause -> running at destination", f"{report.timings_ms['pause_to_running']:.3f} ms")
    pc = report.postcopy
    if pc:
        lat = pc.get("fault_latency_us") or {}
        rate = pc.get("guest_rate") or {}

        def _r(x):
            return "-" if x is None else f"{x:,.0f}"

        t.add_row("post-copy", f"{report.mode}: {pc.get('pages_pending', 0):,} pages after the switch, all placed in "
                               f"{pc.get('complete_s') or 0:.3f} s ({pc.get('fault_path', '?')} fault path)")
        t.add_row("  demand faults", f"{pc.get('faults', 0):,} (latency p50 {_r(lat.get('p50'))} us, p99 {_r(lat.get('p99'))} us, "
                                     f"max {_r(lat.get('max'))} us); {pc.get('local_faults', 0):,} resolved locally")
        src_prio = (pc.get("source") or {}).get("fault_thread_priority")
        if pc.get("fault_thread_priority") or src_prio:
            t.add_row("  fault threads", f"destination {pc.get('fault_thread_priority') or '-'}, source {src_prio or '-'} "
                                         f"(--fault-sched {pc.get('fault_sched', 'default')})")
        if pc.get("fault_cpu") is not None:
            src_cpu = (pc.get("source") or {}).get("fault_thread_cpu")
            t.add_row("  fault threads pinned (--fault-cpu)",
                      f"source: {'-' if src_cpu is None else src_cpu}, destination: "
                      f"{'-' if pc.get('fault_thread_cpu') is None else pc.get('fault_thread_cpu')} "
                      f"(asked: CPU {pc['fault_cpu']})")
        if pc.get("blocktime_ms") is not None:
            t.add_row("  blocktime (guest blocked on faults)", f"{pc['blocktime_ms']:,.3f} ms")
        first = pc.get("first_step")
        if first:
            took = f"took {first['duration_ms']:,.3f} ms from the guest's restart; " if first.get("duration_ms") is not None else ""
            t.add_row("  first step after the switch", f"{took}from the resume on, blocked {first['blocked_ms']:,.3f} ms on "
                                                        f"{first['faults']:,} demand faults (inside the downtime)")
        t.add_row("  pages demanded / pushed", f"{pc.get('pages_demanded', 0):,} / {pc.get('pages_pushed', 0):,}")
        if pc.get("push_bandwidth_limit_Bps"):
            paced = (pc.get("source") or {}).get("push_paced_s") or 0.0
            reached = pc.get("push_rate_Bps")
            t.add_row("  push cap (--postcopy-bandwidth)",
                      f"{pc['push_bandwidth_limit_Bps'] / 1e6:,.1f} MB/s; the push ran at "
                      f"{'-' if reached is None else f'{reached / 1e6:,.1f}'} MB/s and waited {paced:.3f} s for the cap")
        if pc.get("recoveries"):
            t.add_row("  link failures recovered", f"{pc['recoveries']} ({pc.get('pages_resent_after_recovery', 0):,} pages resent after the last)")
        before_what = "pre-copy, at the source" if report.mode == "hybrid" else "0.5 s before the pause, at the source"
        t.add_row("  guest steps/s before", f"{_r(rate.get('before'))} ({before_what})")
        t.add_row("  guest steps/s during", f"{_r(rate.get('during'))} (resume -> last page placed, pages missing)")
        t.add_row("  guest steps/s after", f"{_r(rate.get('after'))} (last page placed -> the destination's final report)")
    v = report.verification or {}
    if v.get("digests"):
        d = v["digests"]
        t.add_row("RAM digests", f"{d['pages_compared']:,} pages, {d['mismatched']} mismatched")
    if v.get("guest_check"):
        g = v["guest_check"]
        t.add_row("destination guest check", f"{'passed' if g.get('ok') else 'FAILED'} ({g.get('pages_checked', 0):,} pages)")
    if v.get("source_guest_check"):
        g = v["source_guest_check"]
        t.add_row("source guest check", f"{'passed' if g.get('ok') else 'FAILED'}: source guest {report.source_guest_state}")
    dest = report.guest.get("destination") or {}
    if "steps_since_resume" in dest:
        t.add_row("destination guest after", f"{dest['steps_since_resume']:,} steps, {dest['pages_written_since_resume']:,} pages written in {dest['observed_s']} s")
    procs = report.processes or {}
    for key in ("migrator_source", "migrator_destination"):
        p = procs.get(key)
        if p and p.get("cpu_s") is not None:
            excl = p.get("private_excl_ram_bytes")
            t.add_row(key.replace("_", " "), f"cpu {p['cpu_s']:.2f} s, USS {format_bytes(p['uss_bytes'])}"
                      + (f" ({format_bytes(excl)} excluding guest RAM mappings)" if excl is not None else ""))
    console.print(t)
