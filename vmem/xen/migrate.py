"""Live-migrate a Xen PVH domain with vmem's precopy rounds and policies, writing a real
xl/libxl/libxc stream that Xen's own ``xl restore`` receives and resumes.

The shape is ``xl migrate`` to localhost, with vmem deciding the rounds::

    dom0:  vmem (this module)                          xl restore -p FIFO  (Xen's own receiver)
           xl header + config (NAME--incoming) -----> creates NAME--incoming, paused
           libxl header, LIBXC_CONTEXT, libxc v3 hdr
           log-dirty on; round 0: every populated frame (foreign map, 1024 per record)
           rounds 1..n: CLEAN bitmap -> PAGE_DATA  ---> populates and fills frames
           policy says stop: pause NAME, last CLEAN, PAGE_DATA,
           X86_TSC_INFO, HVM_PARAMS, HVM_CONTEXT, END, END ----> restores vCPU state; exits 0
           verify: both paused, every sent frame compared through foreign maps
           commit: xl destroy NAME; xl rename NAME--incoming NAME; xl unpause NAME

Failure semantics (as vmem's process migrator): until the commit the source is never
written; any failure or ABORT turns log-dirty off, unpauses the source if we paused it,
kills ``xl restore`` and destroys ``NAME--incoming`` if it exists.  ``xl restore`` runs in
its own session and is always reaped.

The stream carries the domain's CPUID/MSR policy (X86_CPUID_POLICY, X86_MSR_POLICY) as
libxc's does.  Not carried (docs/xen.md): auto-converge throttling (Xen has no vCPU
throttle; a policy's throttle request is recorded but has no effect); PV domains.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import tempfile
import time

import numpy as np

from vmem.errors import MigrationError, PolicyError
from vmem.format.stream import StreamWriter
from vmem.format.wire import IHDR_VERSION_3, HvmParam, LibxcRecordType, PageType
from vmem.format.xl import xl_header
from vmem.migration.pagemap import PagemapRecorder
from vmem.migration.policy import Decision
from vmem.migration.report import MigrationReport, RoundStats
from vmem.migration.rounds import RoundResult, run_precopy
from vmem.pages import PAGE_SIZE, merge_pages
from vmem.xen._libxc import XcHandle
from vmem.xen.domain import XL_TIMEOUT_S, XenDomain, XenError, XenLogDirtyTracker, domid_of, xl

__all__ = ["migrate_domain", "LIBXC_HVM_PARAMS", "BATCH_PAGES", "INCOMING_SUFFIX"]

#: pages per PAGE_DATA record and per foreign map (libxc's MAX_BATCH_SIZE)
BATCH_PAGES = 1024
INCOMING_SUFFIX = "--incoming"
#: the parameters libxc's write_hvm_params() saves (xg_sr_save_x86_hvm.c), in its order; it
#: sends the non-zero ones
LIBXC_HVM_PARAMS = tuple(int(p) for p in (
    HvmParam.STORE_PFN, HvmParam.IOREQ_PFN, HvmParam.BUFIOREQ_PFN, HvmParam.PAGING_RING_PFN,
    HvmParam.MONITOR_RING_PFN, HvmParam.SHARING_RING_PFN, HvmParam.VM86_TSS_SIZED, HvmParam.CONSOLE_PFN,
    HvmParam.ACPI_IOPORTS_LOCATION, HvmParam.VIRIDIAN, HvmParam.IDENT_PT, HvmParam.VM_GENERATION_ID_ADDR,
    HvmParam.IOREQ_SERVER_PFN, HvmParam.NR_IOREQ_SERVER_PAGES, HvmParam.X87_FIP_WIDTH, HvmParam.MCA_CAP))
#: test-only fault injection (tests/test_xen.py): "corrupt-destination-page" flips a byte of
#: one destination frame before the comparison; never set outside tests
INJECT_ENV = "VMEM_XEN_INJECT"
#: waits: the receiver opening the FIFO, and xl restore finishing after the END
OPEN_TIMEOUT_S = 120.0


class _FdSink:
    """``send_parts`` for StreamWriter over a blocking fd (a FIFO or a file)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __call__(self, parts) -> None:
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            n = os.writev(self.fd, views[:512])
            while n:
                if n >= len(views[0]):
                    n -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][n:]
                    n = 0


class _Receiver:
    """``xl restore -p FIFO`` in its own session; always reaped by ``close()``."""

    def __init__(self, workdir: str):
        self.fifo = os.path.join(workdir, "stream")
        os.mkfifo(self.fifo, 0o600)
        self.log_path = os.path.join(workdir, "xl-restore.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["xl", "restore", "-p", self.fifo], stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def open_stream(self) -> int:
        """The FIFO's write end, once xl restore opened it for reading (bounded)."""
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while True:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
                os.set_blocking(fd, True)
                return fd
            except OSError as err:
                if err.errno != errno.ENXIO:
                    raise
            if self.proc.poll() is not None:
                raise XenError(f"xl restore exited ({self.proc.returncode}) before reading: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise XenError(f"xl restore did not open its input in {OPEN_TIMEOUT_S:g} s")
            time.sleep(0.05)

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise XenError(f"xl restore did not finish {timeout_s:g} s after the stream ended: {self.log_tail()}") from None

    def log_tail(self, nbytes: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, os.path.getsize(self.log_path) - nbytes))
                return f.read().decode(errors="replace").strip()
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self._log.close()


#: odd 64-bit multipliers: a page's digest is sum(word[i] * _WEIGHTS[i]) mod 2**64
_WEIGHTS = (np.random.default_rng(0x564D).integers(0, 2**63, 512, dtype=np.uint64) * np.uint64(2) + np.uint64(1))


def page_digests(rows: np.ndarray) -> np.ndarray:
    """One uint64 per 4 KiB row (numpy, no per-page Python); equal pages, equal digests."""
    with np.errstate(over="ignore"):
        return (rows.view("<u8").reshape(len(rows), 512) * _WEIGHTS).sum(axis=1, dtype=np.uint64)


class _XenRounds:
    """vmem's RoundIO over a Xen domain: foreign-map reads into PAGE_DATA records, log-dirty
    collects.  Round data leaves through ``writer``; no per-page Python."""

    def __init__(self, domain: XenDomain, tracker: XenLogDirtyTracker, writer: StreamWriter, t0: float,
                 pagemap: PagemapRecorder | None):
        self.domain, self.tracker, self.writer, self.t0 = domain, tracker, writer, t0
        self.pagemap = pagemap
        self.staging = np.zeros((BATCH_PAGES, PAGE_SIZE), dtype=np.uint8)
        self.last_collect = time.monotonic()
        self.throttle_requests = 0
        self.failed_maps = 0
        #: digest of the last data sent for each pfn: what the destination must hold
        self.sent_digest = np.zeros(domain.npages, dtype=np.uint64)

    def send_pages(self, pfns: np.ndarray) -> tuple[int, int]:
        """Send ``pfns`` (sorted); returns (pages with data sent, bytes written)."""
        before = self.writer.bytes_written
        sent = 0
        for i in range(0, len(pfns), BATCH_PAGES):
            batch = pfns[i:i + BATCH_PAGES]
            err = self.domain.read_pages(batch, self.staging)
            n = len(batch)
            self.sent_digest[batch] = page_digests(self.staging[:n])
            if err.any():
                # a frame that vanished (ballooned out) travels as XTAB, as libxc sends it
                bad = err != 0
                self.failed_maps += int(bad.sum())
                types = np.where(bad, int(PageType.XTAB), int(PageType.NOTAB)).astype(np.uint8)
                good_rows = self.staging[:n][~bad]
                self.writer.page_data(batch, [good_rows] if len(good_rows) else [], types)
                sent += len(good_rows)
            else:
                self.writer.page_data(batch, [self.staging[:n]])
                sent += n
        return sent, self.writer.bytes_written - before

    def send_round(self, index: int, pages, throttle: float) -> RoundResult:
        start = time.monotonic()
        sent, nbytes = self.send_pages(pages)
        send_s = time.monotonic() - start
        dirty = self.tracker.collect()
        now = time.monotonic()
        since, self.last_collect = now - self.last_collect, now
        if not self.domain.alive():
            raise self.domain.crash_error(f"precopy round {index}")
        if self.pagemap is not None:
            self.pagemap.precopy_round(pages, dirty, start - self.t0, now - self.t0)
        return RoundResult(pages_sent=sent, bytes_sent=nbytes, send_s=send_s, dirty=dirty, dirty_pages=len(dirty),
                           since_collect_s=since, elapsed_s=now - self.t0, collect_s=self.tracker.collect_s)

    def set_throttle(self, level: float) -> None:
        self.throttle_requests += 1  # Xen has no vCPU throttle: recorded, not applied

    def stop_and_copy(self, last_dirty) -> tuple[np.ndarray, int, int]:
        """With the domain stopped (suspended or paused): the final collect, and send it
        together with the last precopy round's dirty set -- the pages the policy chose not to
        send live.  Returns (pfns sent, pages with data, bytes).

        Dropping ``last_dirty`` loses every write of the last round (found on the nested
        host: 22-131 pages per migration, a run of the stamper's pages, changed in the
        source after their last send; libxc sends that set live before it suspends, vmem
        sends it inside the downtime, as its process migrator and its models do)."""
        final = merge_pages(np.asarray(last_dirty, dtype=np.int64), self.tracker.collect_final())
        sent, nbytes = self.send_pages(final)
        return final, sent, nbytes


def _hvm_state(xc: XcHandle) -> tuple[tuple, dict, bytes]:
    tsc = xc.tsc_info()
    params = {}
    for index in LIBXC_HVM_PARAMS:
        value = xc.hvm_param(index)
        if value:
            params[index] = value
    return tsc, params, xc.hvm_context()


def _byte_ranges(src: np.ndarray, dst: np.ndarray, limit: int = 6) -> list:
    """The first ``limit`` runs of differing bytes of one page: [offset, length, source hex,
    destination hex] (at most 16 bytes shown) -- evidence of what wrote the page."""
    idx = np.flatnonzero(src != dst)
    if not len(idx):
        return []
    starts = idx[np.r_[True, np.diff(idx) > 1]]
    ends = idx[np.r_[np.diff(idx) > 1, True]] + 1
    return [[int(a), int(b - a), bytes(src[a:min(b, a + 16)]).hex(), bytes(dst[a:min(b, a + 16)]).hex()]
            for a, b in zip(starts[:limit], ends[:limit])]


def _compare_paused(src, dst, pfns: np.ndarray, ring_pfns: dict[str, int], sent_digest: np.ndarray) -> dict:
    """Page-by-page comparison of source and destination (both paused) over ``pfns``;
    ``src`` and ``dst`` read pages (``read_pages(pfns, out) -> errors``).

    ``ring_pfns`` (the xenstore and console ring pages, by HVM param name) are compared
    but reported apart: dom0's xenconsoled and xenstored serve the new domain's rings as
    soon as xl restore introduces it, so their indexes may legitimately move while the
    guest is still paused.

    Two questions, answered apart: does the destination hold exactly what vmem sent
    (``pages_mismatched``: the stream and xl restore), and does the source still hold it
    (``source_changed_after_send``: pages that changed in the paused source after their last
    send without a dirty bit, i.e. writes log-dirty missed, or dirty pages never sent).
    Either is a failure.  The second caught a real defect: the stop-and-copy sent only the
    final collect and dropped the last precopy round's dirty set (22-131 pages per
    migration).  A page that differs is read again (both domains paused): only a difference
    that reads the same twice counts; first reads a second read contradicts are counted in
    ``foreign_misreads``, with examples."""
    a = np.zeros((BATCH_PAGES, PAGE_SIZE), dtype=np.uint8)
    b = np.zeros_like(a)
    a2, b2 = np.zeros_like(a), np.zeros_like(a)
    mismatched: list[np.ndarray] = []
    source_changed: list[np.ndarray] = []
    diffs: dict[int, list] = {}  # the first changed pages: which bytes changed (what wrote them)
    misreads: list[dict] = []  # pages a second read found equal: the first read was wrong
    n_misreads = 0
    prev = {"source": np.zeros(0, dtype=np.uint64), "destination": np.zeros(0, dtype=np.uint64)}

    def judge(rows_a, rows_b, ea, eb, batch):
        not_sent = (page_digests(rows_b) != sent_digest[batch]) | (eb != 0)
        changed = ((rows_a != rows_b).any(axis=1) | (ea != eb)) & ~not_sent
        return not_sent, changed

    for i in range(0, len(pfns), BATCH_PAGES):
        batch = pfns[i:i + BATCH_PAGES]
        n = len(batch)
        ea = src.read_pages(batch, a)
        eb = dst.read_pages(batch, b)
        not_sent, changed = judge(a[:n], b[:n], ea, eb, batch)
        suspect = np.flatnonzero(not_sent | changed)
        if len(suspect):
            # Both domains are paused, so a real difference reads the same twice.  Read
            # the suspects again through fresh maps: on the nested TCG host a foreign
            # read now and then returns another frame's data (dom0 user processes see
            # the same corruption), and such a misread must not pass for a lost write.
            sp = batch[suspect]
            m = len(sp)
            ea2 = src.read_pages(sp, a2)
            eb2 = dst.read_pages(sp, b2)
            ns2, ch2 = judge(a2[:m], b2[:m], ea2, eb2, sp)
            fine = ~(ns2 | ch2)
            n_misreads += int(fine.sum())
            for j in np.flatnonzero(fine)[:max(0, 8 - len(misreads))]:
                row = suspect[j]
                wrong = "source" if (a[row] != a2[j]).any() else "destination"
                got = page_digests((a if wrong == "source" else b)[row:row + 1])[0]
                seen = {k: np.flatnonzero(v == got).tolist()[:4] for k, v in prev.items()}
                misreads.append({"pfn": int(sp[j]), "misread": wrong, "row": int(row),
                                 "data_of_previous_batch_rows": seen})
            not_sent[:] = False
            changed[:] = False
            not_sent[suspect] = ns2
            changed[suspect] = ch2
            for j in np.flatnonzero(ch2 | ns2)[:max(0, 8 - len(diffs))]:
                diffs[int(sp[j])] = _byte_ranges(a2[j], b2[j])  # for a mismatch: the source's bytes vs the copy's
        prev = {"source": page_digests(a[:n]), "destination": page_digests(b[:n])}
        if not_sent.any():
            mismatched.append(batch[not_sent])
        if changed.any():
            source_changed.append(batch[changed])
    rings = np.array(sorted(ring_pfns.values()), dtype=np.int64)
    bad = np.concatenate(mismatched) if mismatched else np.empty(0, dtype=np.int64)
    moved = np.concatenate(source_changed) if source_changed else np.empty(0, dtype=np.int64)
    ring_bad = bad[np.isin(bad, rings)]
    bad = bad[~np.isin(bad, rings)]
    return {"pages_compared": int(len(pfns)), "pages_mismatched": int(len(bad)),
            "mismatched_pfns": [int(x) for x in bad[:32]],
            "source_changed_after_send": int(len(moved)), "source_changed_pfns": [int(x) for x in moved[:32]],
            "differing_bytes": diffs, "foreign_misreads": n_misreads, "misread_examples": misreads,
            "ring_pages_changed_by_dom0": {k: v for k, v in ring_pfns.items() if v in set(ring_bad.tolist())}}


#: SHUTDOWN_suspend (xen/include/public/sched.h)
SHUTDOWN_SUSPEND = 2
#: how long the guest may take to acknowledge "suspend" (libxl allows 60 s)
SUSPEND_TIMEOUT_S = 60.0


def _suspend(dom: XenDomain) -> None:
    """libxl's cooperative suspend of a PV-aware guest: write "suspend" to its
    control/shutdown node and wait (bounded) until it has shut itself down with reason
    suspend.  Its kernel then reconnects xenstore, event channels and grant tables when it
    runs again -- in the restored copy, or here after a rollback (xc_domain_resume)."""
    xl_path = f"/local/domain/{dom.domid}/control/shutdown"
    cp = subprocess.run(["xenstore-write", xl_path, "suspend"], capture_output=True, text=True, timeout=30)
    if cp.returncode != 0:
        raise XenError(f"xenstore-write {xl_path} suspend failed: {cp.stderr.strip()}")
    deadline = time.monotonic() + SUSPEND_TIMEOUT_S
    while time.monotonic() < deadline:
        if dom.xc.info().shutdown_reason == SHUTDOWN_SUSPEND:
            return
        time.sleep(0.005)
    subprocess.run(["xenstore-write", xl_path, ""], capture_output=True, timeout=30)
    raise XenError(f"domain {dom.name} did not acknowledge the suspend request in {SUSPEND_TIMEOUT_S:g} s "
                   "(no PV control in the guest? try --xen-pause)")


def migrate_domain(name: str, policy, *, verify: bool = True, bandwidth_limit_Bps: float | None = None,
                   on_round=None, pagemap_path: str | None = None, save_path: str | None = None,
                   suspend: bool = True) -> MigrationReport:
    """Live-migrate domain ``name`` on this host through ``xl restore``, vmem's ``policy``
    deciding the rounds (any vmem policy object).

    ``suspend``: stop the guest the way libxl does, by asking it to suspend itself (it then
    reconnects to xenstore and its event channels in the new domain); False only pauses it,
    which leaves a PV-aware guest's xenstore and event channels broken after the move.

    With ``save_path``: write the stream (xl save format) to that file instead and resume
    the source afterwards (``xl save -c``'s behaviour); ``xl restore FILE`` restores it.

    Returns the report (outcome "completed", "aborted" or "failed"; rounds, downtime as
    dom0 sees it: source paused -> destination unpaused, verification).

    Raises:
        ConfigError: no such domain, or a PV domain.
        XenError: Xen's tools or libraries failed (the message quotes them).
    """
    t0 = time.monotonic()
    rep = MigrationReport(tracker=XenLogDirtyTracker.name, policy=policy.describe() if hasattr(policy, "describe") else {},
                          bandwidth_limit_bps=bandwidth_limit_Bps * 8 if bandwidth_limit_Bps else None)
    rep.workload = {"backend": "xen", "domain": name}
    incoming = name + INCOMING_SUFFIX
    workdir = tempfile.mkdtemp(prefix="vmem-xen-")
    receiver = None
    fd = -1
    paused = False
    suspended = False
    committed = False
    pagemap = None
    dom = XenDomain(name)
    tracker = XenLogDirtyTracker(dom)
    try:
        config = dom.config()
        config.setdefault("c_info", {}).pop("domid", None)
        if save_path is None:
            config["c_info"]["name"] = incoming
            if xl("domid", incoming, check=False).returncode == 0:
                raise XenError(f"a domain named {incoming} already exists (a failed earlier migration?): "
                               f"xl destroy {incoming}")
            receiver = _Receiver(workdir)
            fd = receiver.open_stream()
        else:
            fd = os.open(save_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        rep.phase = "setup"
        sink = _FdSink(fd)
        sink([xl_header(config)])
        writer = StreamWriter(sink)
        writer.begin(IHDR_VERSION_3)
        # libxc's static data: the CPUID and MSR policy.  Without them libxl gives the new
        # domain its default policy, and on this host a later save of that domain crashed
        # it (Xen: "svm_get_reg(d2v0, 0x00000d90) Bad register", MSR_IA32_BNDCFGS).
        cpuid, msrs = dom.xc.cpu_policy()
        if cpuid:
            writer.write_record(LibxcRecordType.X86_CPUID_POLICY, [cpuid])
        if msrs:
            writer.write_record(LibxcRecordType.X86_MSR_POLICY, [msrs])
        # Round 0's pfns: one type scan (libxc asks per batch instead).  Later rounds send
        # what log-dirty reports, whatever the scan said: a frame populated after it shows
        # up dirty when written, one removed travels as XTAB (send_pages).
        scan_t = time.monotonic()
        first = dom.populated_pfns()
        rep.timings_ms["populated_scan_ms"] = round((time.monotonic() - scan_t) * 1e3, 1)
        tracker.start()  # armed before round 0 reads anything: a racing write shows up in round 1
        rep.guest_pages = dom.npages
        rep.guest_size_bytes = len(first) * PAGE_SIZE
        pagemap = PagemapRecorder(dom.npages, t0) if pagemap_path else None
        if pagemap is not None:
            pagemap.data_pages(first)
        io = _XenRounds(dom, tracker, writer, t0, pagemap)
        rep.setup_time_ms = round((time.monotonic() - t0) * 1e3, 1)
        rep.phase = "precopy"

        def note(rs: RoundStats) -> None:
            rep.rounds.append(rs)
            if on_round is not None:
                on_round(rs)

        end = run_precopy(io, policy, first, guest_pages=dom.npages, page_size=PAGE_SIZE,
                          bandwidth_limit_Bps=bandwidth_limit_Bps, on_round=note,
                          postcopy_refusal="post-copy is not available for Xen domains (libxc streams are pre-copy only)")
        rep.reason = end.reason
        if end.decision == Decision.ABORT:
            rep.outcome, rep.phase = "aborted", "precopy"
            return rep
        rep.phase = "stop-and-copy"
        pause_t = time.monotonic()
        if suspend:
            _suspend(dom)
            suspended = True
        else:
            dom.xc.pause()
        paused = True
        final, sc_sent, sc_bytes = io.stop_and_copy(end.dirty)
        tsc, params, context = _hvm_state(dom.xc)
        writer.x86_tsc_info(mode=tsc[0], nsec=tsc[1], khz=tsc[2], incarnation=tsc[3])
        writer.hvm_params(params)
        writer.hvm_context(context)
        writer.end_libxc()
        writer.end_libxl()
        os.close(fd)
        fd = -1
        sent_t = time.monotonic()
        if pagemap is not None:
            pagemap.stop_and_copy(final, pause_t - t0, sent_t - t0)
        rep.rounds.append(RoundStats(index=len(rep.rounds), kind="stop-and-copy", pages_sent=sc_sent, bytes_sent=sc_bytes,
                                     duration_s=round(sent_t - pause_t, 6), dirty_pages=0,
                                     bandwidth_bps=round(sc_bytes * 8 / max(sent_t - pause_t, 1e-9), 1)))
        rep.pages_sent = writer.pages_written
        rep.bytes_sent = writer.bytes_written
        rep.timings_ms["stop_and_copy_ms"] = round((sent_t - pause_t) * 1e3, 1)
        tracker.stop()
        if save_path is not None:
            dom.xc.resume_suspended() if suspended else dom.xc.unpause()
            paused = False
            rep.outcome, rep.phase, rep.verified = "completed", "saved", False
            rep.verification = {"saved_to": save_path}
            rep.source_guest_state = "running"
            rep.migration_time_s = rep.total_time_s = round(time.monotonic() - t0, 3)
            return rep
        rep.phase = "resume"
        rc = receiver.wait(XL_TIMEOUT_S)
        restored_t = time.monotonic()
        rep.timings_ms["xl_restore_after_end_ms"] = round((restored_t - sent_t) * 1e3, 1)
        if rc != 0:
            raise MigrationError("resume", f"xl restore failed (exit {rc}): {receiver.log_tail()}")
        dst_domid = domid_of(incoming)
        if verify:
            rep.phase = "verify"
            v_t = time.monotonic()
            sent_pfns = np.union1d(first, final) if len(final) else first
            if os.environ.get(INJECT_ENV) == "corrupt-destination-page":
                with XcHandle(dst_domid) as dst:  # test-only: the comparison must catch this
                    dst.flip_byte(int(sent_pfns[len(sent_pfns) // 2]), 123)
            rings = {"STORE_PFN": params.get(HvmParam.STORE_PFN, -1), "CONSOLE_PFN": params.get(HvmParam.CONSOLE_PFN, -1)}
            with XcHandle(dst_domid) as dst:
                rep.verification = _compare_paused(dom, dst, sent_pfns, rings, io.sent_digest)
            rep.verify_s = round(time.monotonic() - v_t, 3)
            if rep.verification["source_changed_after_send"]:
                raise MigrationError("verify", f"{rep.verification['source_changed_after_send']} pages changed in the "
                                               f"paused source after their last send without a dirty bit (first "
                                               f"{rep.verification['source_changed_pfns'][:8]}; bytes [offset, length, source, "
                                               f"copy]: {rep.verification['differing_bytes']}): writes "
                                               "log-dirty did not report")
            if rep.verification["pages_mismatched"]:
                raise MigrationError("verify", f"{rep.verification['pages_mismatched']} pages differ between "
                                               f"what vmem sent and {incoming} (first {rep.verification['mismatched_pfns'][:8]}; "
                                               f"bytes [offset, length, source, copy]: "
                                               f"{rep.verification['differing_bytes']})")
            rep.verified = True
        rep.phase = "commit"
        tracker.stop()
        # xl migrate's order: the source steps aside, the copy takes the name and runs,
        # then the source is destroyed (outside the downtime)
        away = name + "--migratedaway"
        xl("rename", name, away)
        committed = True
        xl("rename", incoming, name)
        xl("unpause", name)
        resumed_t = time.monotonic()
        dom.close()
        xl("destroy", away)
        rep.downtime_ms = round((resumed_t - pause_t) * 1e3, 1)
        rep.timings_ms["pause_to_end_sent_ms"] = round((sent_t - pause_t) * 1e3, 1)
        rep.source_guest_state = "destroyed"
        rep.outcome = "completed"
        rep.migration_time_s = rep.total_time_s = round(resumed_t - t0, 3)
        rep.guest = {"domid_before": dom.domid, "domid_after": domid_of(name), "hvm_params": len(params),
                     "hvm_context_bytes": len(context), "throttle_requests_ignored": io.throttle_requests,
                     "frames_unmappable": io.failed_maps}
        return rep
    except (MigrationError, XenError, PolicyError, OSError) as err:
        rep.outcome = "failed"
        rep.reason = str(err)
        if isinstance(err, OSError):
            raise XenError(f"{rep.phase}: {err}") from err
        raise
    finally:
        if fd >= 0:
            os.close(fd)
        if not committed:
            tracker.stop()
            if paused:
                try:
                    if suspended:
                        dom.xc.resume_suspended()
                    else:
                        dom.xc.unpause()
                except OSError:
                    pass
            rep.source_guest_state = rep.source_guest_state or "running"
        if receiver is not None:
            receiver.close()
            if not committed and xl("domid", incoming, check=False).returncode == 0:
                xl("destroy", incoming, check=False)
            os.unlink(receiver.fifo)
            try:
                os.unlink(receiver.log_path)
            except OSError:
                pass
        try:
            os.rmdir(workdir)
        except OSError:
            pass
        dom.close()
        if pagemap_path and rep.rounds:
            try:
                rep.pagemap = {"file": (pagemap.save(pagemap_path) if pagemap is not None else None)}
            except OSError:
                pass
