#!/usr/bin/env python3
"""Reliability campaign: randomised faults during agent-to-agent migrations, then ping-pong.

Brings up two test hosts (network namespaces, scripts/testhosts.sh, a unique prefix; torn
down at the end whatever happens, Ctrl-C included), starts ``vmem agent`` in each (shared
key, fixed port, private state directory and TMPDIR), creates one busy guest and then:

1. **fault trials** (``--trials N``): each picks a mode (precopy, post-copy, hybrid), a
   fault and a moment, migrates the guest to the other host and injects the fault:

   ==================  ========================================================================
   ``link-cut``        ``ip link set dev eth0 down`` on the source or destination host for a
                       random duration, then up again
   ``link-loss``       ``tc qdisc ... netem loss 100%`` on one host (every packet dropped)
   ``dest-kill``       SIGKILL to the destination agent (restarted afterwards)
   ``dest-oom``        the destination agent is moved into a memory cgroup whose limit is a
                       fraction of the guest's size (cgroup v1 ``memory.limit_in_bytes`` or v2
                       ``memory.max``): the kernel's OOM killer acts mid-migration
   ``src-guest-kill``  SIGKILL to the source guest process (before the switch only)
   ==================  ========================================================================

   The moment is a random fraction of round 0 (by pages sent), or for post-copy/hybrid a
   random delay after the switch (``round_start`` of kind ``postcopy``), or a random delay
   inside the pure post-copy set-up.  After each trial it checks the documented outcome
   (README "Failure semantics", docs/postcopy.md "Failure semantics", docs/reliability.md):
   completed and verified; or failed with a clear reason, the source guest listed, running
   and passing its own ledger check; or (a fault after the switch) the source guest paused
   with its RAM and the destination guest gone.  Then leaks on both hosts: agent children
   that are not listed guests, ``memfd:vmem`` fds of an agent that no listed guest holds,
   userfaultfds, files in the state directories and in the agents' TMPDIR, stray processes
   in the namespaces.
2. **ping-pong** (``--pingpong N``): N back-to-back migrations of the busy guest A->B->A...,
   each verified (RAM digests + the destination guest's ledger check).

Report: trials per fault and mode, outcomes, guests lost (neither host has it), pages
corrupted (digest mismatches + failed ledger checks), leaks, agent RSS before/after, time.

    sudo .venv/bin/python scripts/campaign.py [--trials 50] [--pingpong 200] [--seed S]
                                              [--size 128M] [--quick] [--json FILE]

Exit status: 0 if every trial met the expected semantics and nothing was lost, corrupted
or leaked; 1 otherwise; 2 if test hosts cannot be made here.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if os.path.join(ROOT, "tests") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "tests"))

import psutil  # noqa: E402

from vmem.agent.client import AgentClient  # noqa: E402
from vmem.agent.protocol import AgentError  # noqa: E402

__all__ = ["AgentHost", "FaultPlan", "TrialResult", "Campaign", "scan_leaks", "MODES", "FAULTS"]

MODES = ("precopy", "postcopy", "hybrid")
FAULTS = ("link-cut", "link-loss", "dest-kill", "dest-oom", "src-guest-kill")
#: Mode -> the migrate request's option that selects it.
MODE_OPTIONS = {"precopy": {}, "postcopy": {"postcopy": True}, "hybrid": {"postcopy_after_precopy": True}}

#: Bounds on every wait (they assert nothing; a bound that is hit is reported).
AGENT_START_TIMEOUT_S = 30.0
AGENT_STOP_TIMEOUT_S = 20.0
#: A migration still running this long after its fault was healed counts as hung.
HUNG_AFTER_HEAL_S = 90.0
#: A migration whose link is broken longer than this should have failed by then (TCP
#: retransmits for ~15 min by default: an agent has to notice a dead peer itself).
LINK_DETECT_S = 20.0
#: Registry states a guest passes through (docs/agent.md "Guest states").
TRANSIENT_STATES = ("creating", "incoming", "restoring", "migrating", "saving", "destroying")
#: How long leaks may take to disappear (guests exit, threads finish) before they count.
SETTLE_TIMEOUT_S = 10.0
#: Steps must advance within this long for a guest to count as running (hotcold rate=20000).
PROGRESS_WINDOW_S = 0.5


# --- an agent on a test host ----------------------------------------------------------------------


class AgentHost:
    """One ``vmem agent`` in network namespace ``ns`` listening on ``addr:port``.

    The agent is started with ``ip netns exec`` (which execs, so ``proc.pid`` is the
    agent's pid), its own state directory and TMPDIR under ``workdir``; ``kill()`` +
    ``start()`` restart it on the same port and state directory.
    """

    def __init__(self, name: str, ns: str, addr: str, port: int, workdir: str, key: str):
        self.name = name
        self.ns = ns
        self.addr = addr
        self.port = port
        self.key = key
        self.state_dir = os.path.join(workdir, name)
        self.tmp_dir = os.path.join(workdir, f"{name}-tmp")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        os.makedirs(self.tmp_dir, mode=0o700, exist_ok=True)

    @property
    def target(self) -> str:
        return f"{self.addr}:{self.port}"

    @property
    def socket(self) -> str:
        return os.path.join(self.state_dir, "agent.sock")

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def start(self) -> None:
        """Start the agent and wait until it serves (``agent.json`` written)."""
        info = os.path.join(self.state_dir, "agent.json")
        if os.path.exists(info):
            os.unlink(info)  # a killed agent's; the new one writes its own once it serves
        env = dict(os.environ, PYTHONPATH=ROOT, TMPDIR=self.tmp_dir)
        env.pop("VMEM_AGENT", None)
        argv = ["ip", "netns", "exec", self.ns, sys.executable, "-m", "vmem.cli", "agent",
                "--listen", self.target, "--key", self.key, "--state-dir", self.state_dir]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=ROOT,
                                         start_new_session=True)  # Ctrl-C goes to us, not to it
        self.starts += 1
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        while not os.path.exists(info):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"agent {self.name} did not start:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL the agent and reap it.  A guest it was still receiving dies with it
        (PR_SET_PDEATHSIG); the guests it kept run on, and ``start()`` takes them over."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(AGENT_STOP_TIMEOUT_S)

    def stop(self) -> int | None:
        """SIGTERM, SIGKILL after a bounded wait; reaped; then every guest it left running
        (recorded in its state directory) is killed."""
        from vmem.agent.records import kill_recorded_guests

        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(AGENT_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(AGENT_STOP_TIMEOUT_S)
        kill_recorded_guests(self.state_dir)
        return self.proc.returncode

    def ensure_running(self) -> bool:
        """Restart the agent if it died; True if it had to."""
        if self.pid is None:
            if self.proc is not None:
                self.proc.wait(AGENT_STOP_TIMEOUT_S)
            self.start()
            return True
        return False

    def request(self, op: str, **fields) -> dict:
        with AgentClient(self.socket) as c:
            return c.request(op, **fields)

    def guests(self) -> dict[str, dict]:
        return {g["name"]: g for g in self.request("list")["guests"]}

    def rss_bytes(self) -> int | None:
        """The agent's private memory (``RssAnon``): its RSS also counts the guest RAM it
        mapped and touched (``RssShmem``), which says nothing about growth."""
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except (OSError, TypeError):
            pass
        return None

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-n_chars:]
        except OSError:
            return ""


# --- leaks ------------------------------------------------------------------------------------


def _fd_targets(pid: int) -> list[tuple[str, int]]:
    """(link target, inode) of every fd of ``pid``; [] if it is gone."""
    out = []
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"{base}/{name}")
            ino = os.stat(f"{base}/{name}").st_ino
        except OSError:
            continue
        out.append((target, ino))
    return out


def _memfd_inodes(pid: int) -> set[int]:
    return {ino for target, ino in _fd_targets(pid) if target.startswith("/memfd:vmem")}


def _netns_inode(ns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return None


def _processes_in_netns(ns_inode: int) -> list[int]:
    pids = []
    for pid in psutil.pids():
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == ns_inode:
                pids.append(pid)
        except OSError:
            continue
    return pids


#: Files an agent keeps in its state directory while it runs.
AGENT_FILES = {"agent.sock", "agent.json", "guests", "guests.log"}


def scan_leaks(agent: AgentHost) -> list[str]:
    """What ``agent`` holds that none of its listed guests accounts for; [] if nothing.

    Checks: agent children (recursive, zombies included) that are not listed guests;
    ``memfd:vmem`` fds of the agent that no listed guest process has open; userfaultfds
    beyond one per listed guest; processes in the agent's namespace other than the agent
    and its guests; files in the state directory other than agent.sock/agent.json/guests.log
    and the records and owner sockets of listed guests (``guests/NAME.json``, ``.sock``); any
    file in the agent's TMPDIR.
    """
    problems = []
    pid = agent.pid
    if pid is None:
        return [f"agent {agent.name} is not running"]
    try:
        listed = agent.guests()
    except AgentError as err:
        return [f"agent {agent.name} does not answer: {err}"]
    guest_pids = {g["pid"] for g in listed.values() if g.get("pid")}
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        kids = []
    for p in kids:
        if p.pid not in guest_pids:
            try:
                what = f"{p.status()} {' '.join(p.cmdline())[:80]}"
            except psutil.Error:
                what = "?"
            problems.append(f"{agent.name}: child process {p.pid} is not a listed guest ({what})")
    held = set()
    for gp in guest_pids:
        held |= _memfd_inodes(gp)
    stray = _memfd_inodes(pid) - held
    if stray:
        problems.append(f"{agent.name}: {len(stray)} memfd:vmem fd(s) no listed guest holds")
    uffds = sum(1 for target, _ in _fd_targets(pid) if "userfaultfd" in target)
    if uffds > len(guest_pids):
        problems.append(f"{agent.name}: {uffds} userfaultfd(s) for {len(guest_pids)} guest(s)")
    ns_inode = _netns_inode(agent.ns)
    if ns_inode is not None:
        others = set(_processes_in_netns(ns_inode)) - guest_pids - {pid}
        if others:
            problems.append(f"{agent.name}: stray processes in {agent.ns}: {sorted(others)}")
    try:
        extra = sorted(set(os.listdir(agent.state_dir)) - AGENT_FILES)
    except OSError:
        extra = []
    try:
        recorded = set(os.listdir(os.path.join(agent.state_dir, "guests")))
    except OSError:
        recorded = set()
    extra += sorted(f"guests/{f}" for f in recorded - {f"{n}{ext}" for n in listed for ext in (".json", ".sock")})
    if extra:
        problems.append(f"{agent.name}: files left in the state directory: {extra}")
    try:
        tmp = sorted(os.listdir(agent.tmp_dir))
    except OSError:
        tmp = []
    if tmp:
        problems.append(f"{agent.name}: files left in TMPDIR: {tmp[:5]}")
    return problems


def settle_leaks(agents, timeout_s: float = SETTLE_TIMEOUT_S) -> list[str]:
    """:func:`scan_leaks` of every agent, retried until clean or ``timeout_s`` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        problems = [p for a in agents for p in scan_leaks(a)]
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(0.2)


# --- faults -----------------------------------------------------------------------------------


class MemoryCap:
    """Move a process into a fresh memory cgroup limited to ``limit_bytes``; undo on exit.

    cgroup v1 (``/sys/fs/cgroup/memory``) or v2 (a unified hierarchy with the memory
    controller).  Children forked later inherit the cgroup: the destination's incoming
    guest is capped too.  Charges made before the move stay where they were.
    """

    V1 = "/sys/fs/cgroup/memory"
    V2 = "/sys/fs/cgroup"

    def __init__(self, tag: str):
        self.tag = tag
        self.path = None

    @classmethod
    def unavailable(cls) -> str:
        """Why a memory cgroup cannot be made here, or ``""``."""
        if os.geteuid() != 0:
            return "memory cgroups need root"
        if os.path.exists(os.path.join(cls.V1, "memory.limit_in_bytes")):
            return ""
        try:
            with open(os.path.join(cls.V2, "cgroup.controllers")) as f:
                if "memory" in f.read().split():
                    return ""
        except OSError:
            pass
        return "no cgroup memory controller (neither v1 /sys/fs/cgroup/memory nor v2 memory.max)"

    def _root(self) -> tuple[str, str]:
        if os.path.exists(os.path.join(self.V1, "memory.limit_in_bytes")):
            return self.V1, "memory.limit_in_bytes"
        return self.V2, "memory.max"

    def apply(self, pid: int, limit_bytes: int) -> None:
        root, knob = self._root()
        self.path = os.path.join(root, self.tag)
        os.makedirs(self.path, exist_ok=True)
        with open(os.path.join(self.path, knob), "w") as f:
            f.write(str(int(limit_bytes)))
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def remove(self) -> None:
        """Move every task back to the root cgroup and remove ours (bounded retries)."""
        if self.path is None:
            return
        root, _ = self._root()
        for _ in range(50):
            try:
                with open(os.path.join(self.path, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
            except OSError:
                break
            for p in pids:
                try:
                    with open(os.path.join(root, "cgroup.procs"), "w") as f:
                        f.write(str(p))
                except OSError:
                    pass  # exited meanwhile
            try:
                os.rmdir(self.path)
                break
            except OSError:
                time.sleep(0.1)
        self.path = None


@dataclass
class FaultPlan:
    """One trial's fault: what, where, when, for how long."""

    mode: str
    fault: str
    when: str              # "precopy" (round 0 fraction), "setup" (pure post-copy), "after-switch"
    at_fraction: float     # of round 0's pages (when == "precopy")
    delay_s: float         # after the trigger
    duration_s: float      # link faults: how long the link stays broken
    side: str              # link faults: "source" or "destination" host
    oom_fraction: float    # dest-oom: cgroup limit as a fraction of the guest's size

    @classmethod
    def random(cls, rng: random.Random, *, modes=MODES, faults=FAULTS, long_cut_s: float = 0.0,
               long_cut_share: float = 0.0) -> "FaultPlan":
        mode = rng.choice(modes)
        fault = rng.choice(faults)
        if mode == "precopy" or fault == "src-guest-kill":
            when = "setup" if mode == "postcopy" else "precopy"
        elif mode == "postcopy":
            when = rng.choice(("setup", "after-switch"))
        else:
            when = rng.choice(("precopy", "after-switch"))
        if fault == "dest-oom" and when == "after-switch":
            when = "setup" if mode == "postcopy" else "precopy"
        duration = rng.uniform(0.5, 4.0)
        if fault in ("link-cut", "link-loss") and long_cut_s and rng.random() < long_cut_share:
            duration = long_cut_s
        # precopy: the moment is the fraction of round 0 sent; setup / after-switch: a delay
        # (pure post-copy measures the guest for 0.5 s before it pauses it).
        delay = {"precopy": 0.0, "setup": rng.uniform(0.0, 0.4), "after-switch": rng.uniform(0.0, 1.0)}[when]
        return cls(mode=mode, fault=fault, when=when, at_fraction=round(rng.uniform(0.05, 0.95), 3),
                   delay_s=round(delay, 3),
                   duration_s=round(duration, 2), side=rng.choice(("source", "destination")),
                   oom_fraction=round(rng.uniform(0.2, 0.7), 3))


@dataclass
class TrialResult:
    index: int
    plan: dict
    applied: bool = False          # the fault happened before the migration ended
    applied_phase: str = ""        # migration phase when it was applied
    outcome: str = ""              # completed / failed / aborted / error / hung
    reason: str = ""
    source_guest_state: str = ""
    expected: bool = False         # the documented semantics held
    problems: list = field(default_factory=list)
    leaks: list = field(default_factory=list)
    lost: bool = False
    corrupted_pages: int = 0
    source_paused: bool = False    # after-switch failure: source guest left paused (documented)
    seconds: float = 0.0
    dest_agent_died: bool = False  # killed by the fault (dest-kill) or by the OOM killer (dest-oom)
    stalled_s: float = 0.0         # link faults: how long the migration sat without ending


# --- the campaign -------------------------------------------------------------------------------


class Campaign:
    """Two agents, one busy guest, fault trials and ping-pong migrations.

    ``hosts``: an object with ``ns(i)`` and ``addr(i)`` for i in 1, 2 (tests/testhosts.py's
    NetnsHosts).  Use :meth:`start`/:meth:`stop` (or ``with``).
    """

    def __init__(self, hosts, workdir: str, *, size: str = "128M", rate: int = 20000,
                 bandwidth: str | None = "100M", guest: str = "busy", port: int = 8002, seed: int = 1,
                 log=print):
        from transport.secure import generate_key

        self.workdir = workdir
        self.key = os.path.join(workdir, "agent.key")
        if not os.path.exists(self.key):
            generate_key(self.key)
        self.agents = [AgentHost(f"h{i}", hosts.ns(i), hosts.addr(i), port, workdir, self.key) for i in (1, 2)]
        self.size = size
        self.rate = rate
        self.bandwidth = bandwidth
        self.guest = guest
        self.rng = random.Random(seed)
        self.log = log
        self.guest_seed = 1
        self.recreated = 0
        self.cgroups = 0
        self.stuck_restarts = 0   # agents restarted because a guest stayed "incoming"

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> "Campaign":
        for a in self.agents:
            a.start()
        self.create_guest(self.agents[0])
        return self

    def stop(self) -> None:
        for a in self.agents:
            try:
                a.stop()
            except Exception:  # noqa: BLE001  (teardown: keep stopping the others)
                a.kill()

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()

    def create_guest(self, agent: AgentHost) -> None:
        self.guest_seed += 1
        agent.request("create", name=self.guest, workload="hotcold", size=self.size,
                      workload_args=[f"rate={self.rate}"], seed=self.guest_seed)

    def holder(self) -> tuple[AgentHost | None, dict | None]:
        """The agent listing the guest (and its row), or (None, None)."""
        for a in self.agents:
            try:
                row = a.guests().get(self.guest)
            except AgentError:
                continue
            if row is not None:
                return a, row
        return None, None

    def other(self, agent: AgentHost) -> AgentHost:
        return self.agents[1] if agent is self.agents[0] else self.agents[0]

    def steps_advance(self, agent: AgentHost) -> bool:
        """Does the guest's step counter move on ``agent`` (within :data:`PROGRESS_WINDOW_S`)?"""
        try:
            before = agent.guests()[self.guest]["steps"]
            deadline = time.monotonic() + PROGRESS_WINDOW_S * 4
            while time.monotonic() < deadline:
                time.sleep(PROGRESS_WINDOW_S / 2)
                if agent.guests()[self.guest]["steps"] != before:
                    return True
        except (AgentError, KeyError, TypeError):
            pass
        return False

    # -- one migration, with events -------------------------------------------------------------------
    def migrate(self, src: AgentHost, dst: AgentHost, mode: str, on_event=None) -> dict:
        """Migrate the guest src -> dst; returns ``{"report": ...}`` or ``{"error": ...}``."""
        options = {"observe": 0} | MODE_OPTIONS[mode]
        if self.bandwidth:
            options["bandwidth"] = self.bandwidth
        try:
            with AgentClient(src.socket, timeout_s=10.0) as c:
                return c.request("migrate", name=self.guest, target=dst.target, options=options, on_event=on_event)
        except AgentError as err:
            return {"error": f"{err.code}: {err.message}", "code": str(err.code)}

    # -- faults --------------------------------------------------------------------------------------
    def _link(self, agent: AgentHost, fault: str, broken: bool) -> None:
        """Break (or heal) ``agent``'s link: ``link-cut`` takes eth0 down; ``link-loss``
        drops every packet it sends (netem loss 100%, or where this kernel has no netem, a
        token bucket of 8 bit/s with no queue: every packet after the first is dropped)."""
        tc = ["tc", "-n", agent.ns, "qdisc"]
        if fault == "link-cut":
            argv = ["ip", "-n", agent.ns, "link", "set", "dev", "eth0", "down" if broken else "up"]
        elif not broken:
            subprocess.run([*tc, "del", "dev", "eth0", "root"], capture_output=True, timeout=30)
            return
        else:
            netem = subprocess.run([*tc, "replace", "dev", "eth0", "root", "netem", "loss", "100%"],
                                   capture_output=True, timeout=30)
            if netem.returncode == 0:
                return
            argv = [*tc, "replace", "dev", "eth0", "root", "tbf", "rate", "8bit", "burst", "1600", "limit", "1"]
        subprocess.run(argv, check=True, capture_output=True, timeout=30)

    def run_trial(self, index: int, plan: FaultPlan) -> TrialResult:
        res = TrialResult(index=index, plan=asdict(plan))
        t_start = time.monotonic()
        src, row = self.holder()
        if src is None or row is None or row.get("state") != "running":
            self.log(f"trial {index}: no running guest before the trial ({row}); recreating")
            self.recover(None)
            src, row = self.holder()
        dst = self.other(src)
        guest_pages = row["size_bytes"] // 4096
        guest_pid = row["pid"]
        trigger = threading.Event()
        state = {"sent0": 0, "switched": False, "phase": "", "round": -1}

        def on_event(ev: dict) -> None:
            kind = ev.get("event")
            if kind == "phase":
                state["phase"] = ev.get("name", "")
                if plan.when == "setup" and ev.get("name") == "postcopy":
                    trigger.set()
            elif kind == "round_start":
                state["round"] = ev.get("index", -1)
                if ev.get("kind") == "postcopy":
                    state["switched"] = True
                    if plan.when == "after-switch":
                        trigger.set()
            elif kind == "sent" and state["round"] == 0:
                state["sent0"] += ev.get("pages", 0)
                if plan.when == "precopy" and state["sent0"] >= plan.at_fraction * guest_pages:
                    trigger.set()

        reply: dict = {}
        runner = threading.Thread(target=lambda: reply.update(self.migrate(src, dst, plan.mode, on_event)),
                                  name="campaign-migrate", daemon=True)
        cap = None
        if plan.fault == "dest-oom":
            # The limit is the moment: the destination runs out of memory once it has taken
            # about oom_fraction of the guest (its incoming guest process is charged too).
            cap = MemoryCap(f"vmem-campaign-{os.getpid()}-{index}")
            cap.apply(dst.pid, int(plan.oom_fraction * guest_pages * 4096))
            self.cgroups += 1
            trigger.set()
        runner.start()
        while not trigger.is_set() and runner.is_alive():
            trigger.wait(0.02)
        healed_at = None
        if trigger.is_set() and runner.is_alive():
            time.sleep(0.0 if plan.fault == "dest-oom" else plan.delay_s)
            if runner.is_alive():
                res.applied = True
                res.applied_phase = state["phase"] if plan.fault != "dest-oom" else "limit set at start"
                if plan.fault in ("link-cut", "link-loss"):
                    where = src if plan.side == "source" else dst
                    self._link(where, plan.fault, True)
                    runner.join(plan.duration_s)
                    if runner.is_alive() and plan.duration_s > LINK_DETECT_S:
                        res.problems.append(f"the link was down {plan.duration_s:g} s and the migration neither "
                                            f"failed nor finished: no failure detection within {LINK_DETECT_S:g} s")
                    self._link(where, plan.fault, False)
                    healed_at = time.monotonic()
                elif plan.fault == "dest-kill":
                    dst.kill()
                    healed_at = time.monotonic()
                elif plan.fault == "src-guest-kill":
                    try:
                        os.kill(guest_pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    healed_at = time.monotonic()
                elif plan.fault == "dest-oom":
                    pass  # armed before the migration started
        if healed_at is None:
            healed_at = time.monotonic()
        runner.join(HUNG_AFTER_HEAL_S if res.applied else HUNG_AFTER_HEAL_S * 2)
        if runner.is_alive():
            res.problems.append(f"migration still running {HUNG_AFTER_HEAL_S:.0f} s after the fault ended (hung)")
            res.outcome = "hung"
            dst.kill()  # the only way left to end it: the source sees the connection break
            runner.join(HUNG_AFTER_HEAL_S)
        res.stalled_s = round(time.monotonic() - healed_at, 2) if res.applied else 0.0
        if cap is not None:
            cap.remove()
        dst_restarted = dst.ensure_running()
        res.dest_agent_died = dst_restarted
        src.ensure_running()
        self._judge(res, plan, reply, src, dst, guest_pid, dst_restarted, state)
        res.leaks = settle_leaks(self.agents)
        self.recover(res)
        res.seconds = round(time.monotonic() - t_start, 2)
        return res

    def _judge(self, res: TrialResult, plan: FaultPlan, reply: dict, src: AgentHost, dst: AgentHost,
               guest_pid: int, dst_restarted: bool, state: dict) -> None:
        """Check the documented outcome of one trial (see the module docstring)."""
        report = reply.get("report") or {}
        if res.outcome != "hung":
            res.outcome = report.get("outcome") or ("error" if "error" in reply else "?")
        res.reason = report.get("reason") or reply.get("error") or ""
        res.source_guest_state = report.get("source_guest_state") or ""
        ver = report.get("verification") or {}
        digests = ver.get("digests") or {}
        res.corrupted_pages += int(digests.get("mismatched") or 0)
        src_check = ver.get("source_guest_check")
        if src_check and not src_check.get("ok"):
            res.corrupted_pages += max(1, int(src_check.get("bad_pages") or 0))
            res.problems.append(f"source guest failed its ledger check: {src_check.get('detail')}")
        dest_check = ver.get("guest_check")
        if res.outcome == "completed" and dest_check is not None and not dest_check.get("ok"):
            res.corrupted_pages += max(1, int(dest_check.get("bad_pages") or 0))
        # The destination finishes its side after the source's reply (adopts the guest, or
        # discards what it built): give it a bounded moment to leave "incoming".
        self.wait_settled(dst)
        src_rows = _safe_guests(src)
        dst_rows = _safe_guests(dst)
        on_src = src_rows.get(self.guest)
        on_dst = dst_rows.get(self.guest)
        killed = res.applied and plan.fault == "src-guest-kill"
        if on_src is None and on_dst is None and not killed:
            res.lost = True
            res.problems.append("guest lost: neither host lists it")
        p = res.problems
        if res.outcome == "completed":
            if not report.get("verified") or digests.get("mismatched") != 0 or not (dest_check or {}).get("ok"):
                p.append(f"completed without a clean verification: {ver}")
            if on_dst is None or on_dst.get("state") != "running" or not on_dst.get("alive"):
                p.append(f"completed but the destination does not run the guest: {on_dst}")
            if on_src is not None:
                p.append("completed but the source still lists the guest")
            if killed:
                p.append("the source guest was killed, yet the migration completed")
        elif res.outcome in ("failed", "aborted", "error"):
            if not res.reason or "internal error" in res.reason or "vmem bug" in res.reason:
                p.append(f"no clear reason: {res.reason!r}")
            if on_dst is not None:
                p.append(f"the destination lists the guest after a failed migration: {on_dst}")
            switched = state["switched"] and "after the switch" in res.reason
            if killed:
                if res.source_guest_state != "crashed":
                    p.append(f"source guest killed but reported {res.source_guest_state!r}")
                if on_src is not None:
                    p.append(f"the source still lists the crashed guest: {on_src}")
                if "crash" not in res.reason and "died" not in res.reason and "exited" not in res.reason:
                    p.append(f"the reason does not say the source guest died: {res.reason!r}")
            elif switched:
                res.source_paused = True
                if "PAUSED" not in res.reason:
                    p.append("after-switch failure without the documented PAUSED statement")
                if on_src is None or not on_src.get("alive"):
                    p.append(f"after-switch failure: the source guest is gone ({on_src})")
                elif self.steps_advance(src):
                    p.append("after-switch failure: the source guest runs (it must stay paused)")
                if res.source_guest_state != "paused":
                    p.append(f"after-switch failure reported source_guest_state={res.source_guest_state!r}, "
                             "docs/postcopy.md says 'paused'")
            else:
                if res.outcome != "error" and res.source_guest_state != "running":
                    p.append(f"source_guest_state {res.source_guest_state!r}, expected 'running'")
                if on_src is None or on_src.get("state") != "running" or not on_src.get("alive"):
                    p.append(f"the source guest is not running after a failed migration: {on_src}")
                elif not self.steps_advance(src):
                    p.append("the source guest is listed running but makes no progress")
                if res.outcome != "error" and not src_check:
                    p.append("no source_guest_check in the report")
        elif res.outcome != "hung":
            p.append(f"unexpected outcome {res.outcome!r}: {reply}")
        res.expected = not p

    def wait_settled(self, agent: AgentHost, timeout_s: float = SETTLE_TIMEOUT_S) -> bool:
        """Wait (bounded) until no guest of ``agent`` is in a transient state; False if one stays."""
        deadline = time.monotonic() + timeout_s
        while True:
            rows = _safe_guests(agent)
            if not any(r.get("state") in TRANSIENT_STATES for r in rows.values()):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

    def recover(self, res: TrialResult | None) -> None:
        """Leave exactly one running guest for the next trial (destroy a paused one; restart an
        agent stuck with an incoming guest -- the leak is already recorded)."""
        for a in self.agents:
            a.ensure_running()
            if not self.wait_settled(a, 0.0):
                self.log(f"  agent {a.name} is stuck with {_safe_guests(a)}; restarting it")
                self.stuck_restarts += 1
                a.kill()
                a.start()
        holder, row = self.holder()
        if row is not None and row.get("state") == "running" and row.get("alive") and self.steps_advance(holder):
            return
        if holder is not None:
            try:
                holder.request("destroy", name=self.guest)
            except AgentError as err:
                self.log(f"  destroying the stuck guest failed: {err}")
        self.recreated += 1
        self.create_guest(self.agents[0])

    # -- ping-pong --------------------------------------------------------------------------------
    def pingpong(self, n: int, mode: str = "precopy") -> dict:
        """``n`` back-to-back verified migrations between the two agents (unshaped)."""
        bandwidth, self.bandwidth = self.bandwidth, None
        try:
            return self._pingpong(n, mode)
        finally:
            self.bandwidth = bandwidth

    def _pingpong(self, n: int, mode: str) -> dict:
        out = {"migrations": 0, "completed": 0, "failed": [], "corrupted_pages": 0, "downtime_ms": [],
               "total_time_s": [], "leaks": [], "lost": 0}
        self.recover(None)
        t0 = time.monotonic()
        for i in range(n):
            for a in self.agents:
                self.wait_settled(a)
            src, row = self.holder()
            if src is None:
                out["lost"] += 1
                out["failed"].append((i, "guest lost"))
                self.create_guest(self.agents[0])
                continue
            reply = self.migrate(src, self.other(src), mode)
            out["migrations"] += 1
            report = reply.get("report") or {}
            ver = report.get("verification") or {}
            out["corrupted_pages"] += int((ver.get("digests") or {}).get("mismatched") or 0)
            if report.get("outcome") == "completed" and report.get("verified") and (ver.get("guest_check") or {}).get("ok"):
                out["completed"] += 1
                out["downtime_ms"].append(report.get("downtime_ms"))
                out["total_time_s"].append(report.get("total_time_s"))
            else:
                out["failed"].append((i, report.get("reason") or reply.get("error")))
                if (ver.get("guest_check") or {}).get("ok") is False:
                    out["corrupted_pages"] += 1
        out["seconds"] = round(time.monotonic() - t0, 1)
        out["leaks"] = settle_leaks(self.agents)
        return out


def _safe_guests(agent: AgentHost) -> dict:
    try:
        return agent.guests()
    except AgentError:
        return {}


# --- the command --------------------------------------------------------------------------------


def _summarise(trials: list[TrialResult]) -> dict:
    by = collections.defaultdict(lambda: collections.Counter())
    for t in trials:
        key = f"{t.plan['fault']}/{t.plan['mode']}"
        by[key]["trials"] += 1
        by[key]["applied"] += t.applied
        by[key][t.outcome] += 1
        by[key]["expected"] += t.expected
        by[key]["source_paused"] += t.source_paused
    return {k: dict(v) for k, v in sorted(by.items())}


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return xs[len(xs) // 2] if xs else None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=50, help="randomised fault trials (default 50)")
    p.add_argument("--pingpong", type=int, default=200, help="back-to-back ping-pong migrations (default 200)")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random, printed)")
    p.add_argument("--size", default="128M", help="guest RAM (default 128M)")
    p.add_argument("--pingpong-size", default=None, help="guest RAM for ping-pong (default: --size)")
    p.add_argument("--rate", type=int, default=20000, help="hotcold pages written per second (default 20000)")
    p.add_argument("--bandwidth", default="100M", help="migration bandwidth cap, so faults land mid-transfer "
                                                       "(default 100M bytes/s; 'none' = unshaped)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated subset of {','.join(FAULTS)}")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    p.add_argument("--long-cut-s", type=float, default=30.0,
                   help="duration of the occasional long link fault (default 30 s; 0 = none)")
    p.add_argument("--long-cut-share", type=float, default=0.1, help="share of link faults that are long (0.1)")
    p.add_argument("--quick", action="store_true", help="6 trials, 10 ping-pongs, 64M guest, no long cuts")
    p.add_argument("--json", metavar="FILE", help="write the full results as JSON")
    args = p.parse_args(argv)

    from testhosts import NetnsHosts, netns_unavailable

    why = netns_unavailable()
    if why:
        print(f"campaign: cannot make test hosts here: {why}", file=sys.stderr)
        return 2
    if args.quick:
        args.trials, args.pingpong, args.size, args.long_cut_s = min(args.trials, 6), min(args.pingpong, 10), "64M", 0.0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    faults = [f for f in args.faults.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    for f in faults:
        if f not in FAULTS:
            p.error(f"--faults: unknown fault {f!r} (known: {', '.join(FAULTS)})")
    for m in modes:
        if m not in MODES:
            p.error(f"--modes: unknown mode {m!r} (known: {', '.join(MODES)})")
    skipped = {}
    if "dest-oom" in faults and MemoryCap.unavailable():
        skipped["dest-oom"] = MemoryCap.unavailable()
        faults.remove("dest-oom")
    print(f"campaign: seed {seed}, {args.trials} trials over {','.join(faults)} x {','.join(modes)}, "
          f"{args.pingpong} ping-pongs, guest {args.size} hotcold rate={args.rate}", flush=True)
    for f, why in skipped.items():
        print(f"campaign: skipping {f}: {why}", flush=True)

    # Ctrl-C / SIGTERM: raise KeyboardInterrupt in the main thread; `finally` tears down.
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = tempfile.mkdtemp(prefix=f"vmem-campaign-{os.getpid()}-")
    os.chmod(workdir, 0o700)
    hosts = NetnsHosts(prefix=f"vc{os.getpid()}", subnet=250)
    t0 = time.monotonic()
    results = {"seed": seed, "args": vars(args), "skipped_faults": skipped}
    camp = None
    rc = 1
    try:
        hosts.up()
        bandwidth = None if args.bandwidth == "none" else args.bandwidth
        camp = Campaign(hosts, workdir, size=args.size, rate=args.rate, bandwidth=bandwidth, seed=seed)
        camp.start()
        rss_start = {a.name: a.rss_bytes() for a in camp.agents}
        rng = random.Random(seed)
        trials = []
        for i in range(args.trials):
            plan = FaultPlan.random(rng, modes=modes, faults=faults, long_cut_s=args.long_cut_s,
                                    long_cut_share=args.long_cut_share)
            t = camp.run_trial(i, plan)
            trials.append(t)
            flag = "ok " if t.expected and not t.leaks else "BAD"
            print(f"[{i + 1:3d}/{args.trials}] {flag} {plan.fault:14s} {plan.mode:8s} {plan.when:12s} "
                  f"{'applied in ' + t.applied_phase if t.applied else 'missed (migration ended first)':32s} "
                  f"-> {t.outcome:9s} {t.seconds:6.1f} s  {t.reason[:90]}", flush=True)
            for prob in t.problems + t.leaks:
                print(f"        {prob}", flush=True)
        rss_after_trials = {a.name: a.rss_bytes() for a in camp.agents}
        restarts = {a.name: a.starts - 1 for a in camp.agents}
        pp = {}
        if args.pingpong:
            if args.pingpong_size and args.pingpong_size != args.size:
                holder, _ = camp.holder()
                if holder is not None:
                    holder.request("destroy", name=camp.guest)
                camp.size = args.pingpong_size
                camp.create_guest(camp.agents[0])
            rss_pp_start = {a.name: a.rss_bytes() for a in camp.agents}
            pp = camp.pingpong(args.pingpong)
            pp["rss_start"] = rss_pp_start
            pp["rss_end"] = {a.name: a.rss_bytes() for a in camp.agents}
            print(f"ping-pong: {pp['completed']}/{pp['migrations']} completed and verified in {pp['seconds']} s, "
                  f"median downtime {_median(pp['downtime_ms'])} ms, corrupted pages {pp['corrupted_pages']}, "
                  f"leaks {len(pp['leaks'])}", flush=True)
            for f in pp["failed"][:10]:
                print(f"        failed: {f}", flush=True)
        applied = [t for t in trials if t.applied]
        results |= {
            "trials": [asdict(t) for t in trials],
            "summary": _summarise(trials),
            "faults_injected": len(applied),
            "trials_as_expected": sum(t.expected for t in trials),
            "guests_lost": sum(t.lost for t in trials) + pp.get("lost", 0),
            "pages_corrupted": sum(t.corrupted_pages for t in trials) + pp.get("corrupted_pages", 0),
            "leaks": sum(len(t.leaks) for t in trials) + len(pp.get("leaks", [])),
            "source_paused_after_switch": sum(t.source_paused for t in trials),
            "guests_recreated": camp.recreated,
            "agents_restarted_stuck": camp.stuck_restarts,
            "agent_restarts": restarts,
            "agent_rss_bytes": {"start": rss_start, "after_trials": rss_after_trials,
                                "pingpong_start": pp.get("rss_start"), "end": pp.get("rss_end")},
            "pingpong": {k: v for k, v in pp.items() if k not in ("downtime_ms", "total_time_s")} | {
                "median_downtime_ms": _median(pp.get("downtime_ms", [])),
                "median_total_time_s": _median(pp.get("total_time_s", []))},
        }
        print_summary(results)
        ok = (results["trials_as_expected"] == len(trials) and results["guests_lost"] == 0
              and results["pages_corrupted"] == 0 and results["leaks"] == 0
              and (not pp or pp["completed"] == pp["migrations"]))
        rc = 0 if ok else 1
    except KeyboardInterrupt:
        print("campaign: interrupted; tearing down", file=sys.stderr, flush=True)
        rc = 130
    finally:
        if camp is not None:
            camp.stop()
            results["agent_logs_tail"] = {a.name: a.log_tail(2000) for a in camp.agents}
        hosts.down()
        results["total_time_s"] = round(time.monotonic() - t0, 1)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1, default=str)
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"campaign: total time {results['total_time_s']} s", flush=True)
    return rc


def print_summary(r: dict) -> None:
    mib = lambda d: {k: (round(v / 2**20, 1) if v else None) for k, v in (d or {}).items()}  # noqa: E731
    print("\nfault/mode                       trials applied expected completed failed paused-src other")
    for key, c in r["summary"].items():
        other = c["trials"] - c.get("completed", 0) - c.get("failed", 0)
        print(f"{key:32s} {c['trials']:6d} {c['applied']:7d} {c['expected']:8d} {c.get('completed', 0):9d} "
              f"{c.get('failed', 0):6d} {c.get('source_paused', 0):10d} {other:5d}")
    rss = r["agent_rss_bytes"]
    print(f"\nfaults injected {r['faults_injected']}, trials as expected {r['trials_as_expected']}/{len(r['trials'])}, "
          f"guests lost {r['guests_lost']}, pages corrupted {r['pages_corrupted']}, leaks {r['leaks']}, "
          f"source paused after switch {r['source_paused_after_switch']}, agent restarts {r['agent_restarts']}")
    print(f"agent RssAnon MiB: start {mib(rss['start'])}, after trials {mib(rss['after_trials'])}, "
          f"ping-pong start {mib(rss['pingpong_start'])}, end {mib(rss['end'])}")


if __name__ == "__main__":
    sys.exit(main())
