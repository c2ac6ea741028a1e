"""The agent's guest commands: create, list, destroy, save, restore (and ping).

Each handler takes ``(agent, channel, request)`` and returns the reply's fields, or raises
:class:`vmem.agent.protocol.AgentError` with a code and a message saying what happened and
what to do.  ``migrate`` lives in :mod:`vmem.agent.migration`.

Every guest process is started on the agent's spawner thread (see
:mod:`vmem.agent.spawner`), so it lives as long as the agent, not as long as the request;
once it runs here it is detached (``Agent.own_guest``) and outlives the agent too.

Files (``save``, ``restore``) are taken from the control socket only
(:data:`LOCAL_ONLY_COMMANDS`), and there as a descriptor the CLI opened as its user and
passed with SCM_RIGHTS (:func:`receive_fd`): the agent then writes or reads exactly what
its caller could.  A bare path is still accepted there -- the control socket admits only
the agent's own user and root, who may open anything the agent may -- never over TCP.
An error about a file never quotes the file's bytes (docs/security.md).
"""
from __future__ import annotations

import fcntl
import logging
import os
import stat
import time

from vmem.errors import ConfigError, VmemError
from vmem.ram import format_bytes
from vmem.agent.protocol import AgentError, ErrorCode
from vmem.agent.registry import validate_name

__all__ = ["COMMANDS", "LOCAL_ONLY_COMMANDS", "FD_MARKER", "receive_fd"]

log = logging.getLogger("vmem.agent")


def _config_error(err: ConfigError) -> AgentError:
    return AgentError(ErrorCode.BAD_REQUEST, f"invalid argument {err}")


def cmd_ping(agent, channel, request: dict) -> dict:
    return {"agent": agent.info()}


def cmd_create(agent, channel, request: dict) -> dict:
    """``{"op": "create", "name", "workload", "workload_args": ["k=v"], "seed", "size", "backend"}``
    (``backend``: ``process``, the default, or ``kvm``)."""
    from vmem.migration.backend import BACKENDS, GuestSpec, boot_guest
    from guests.workload import load_workload, parse_params

    from vmem.ram import parse_size

    name = validate_name(request.get("name"))
    workload = str(request.get("workload") or "hotcold")
    try:
        size_bytes = parse_size(request.get("size") or "1G")
        backend = str(request.get("backend") or "process")
        if backend not in BACKENDS:
            raise ConfigError("--backend", f"unknown backend {backend!r}; choose {', '.join(BACKENDS)}")
        if backend == "kvm":
            from guests.kvm.layout import parse_params as kvm_params

            params = kvm_params(workload, list(request.get("workload_args") or []))
        else:
            params = parse_params(load_workload(workload), list(request.get("workload_args") or []))
        seed = int(request.get("seed", 1))
    except ConfigError as err:
        raise _config_error(err) from None
    except (TypeError, ValueError) as err:
        raise AgentError(ErrorCode.BAD_REQUEST, f"create: {err}") from None
    spec = GuestSpec(workload, params, seed)
    # The recorded spec names the backend, so that a restarted agent takes the guest over as one.
    entry = agent.registry.reserve(name, "creating", size_bytes, spec.to_json() | {"backend": backend}, origin="created")
    try:
        guest = agent.spawner.call(boot_guest, spec, size_bytes, backend)
    except BaseException as err:
        agent.registry.remove(name, "creating")
        if isinstance(err, (VmemError, OSError, ValueError)):
            raise AgentError(ErrorCode.FAILED, f"guest {name!r} failed to boot: {err}") from None
        raise
    agent.own_guest(name, guest)
    agent.registry.transition(name, "creating", "running", guest=guest)
    log.info("created guest %s: %s %s, %s, pid %d", name, workload, params or "", format_bytes(size_bytes), guest.pid)
    return {"guest": entry.describe()}


def cmd_list(agent, channel, request: dict) -> dict:
    rows = []
    for entry in agent.registry.entries():
        row = entry.describe()
        if row["state"] == "running" and row["alive"] is False:
            row["state"] = "crashed"
        rows.append(row)
    return {"guests": rows, "agent": agent.info()}


def cmd_destroy(agent, channel, request: dict) -> dict:
    """Stop the guest (cleanly, then by force after a bounded wait) and forget it."""
    name = str(request.get("name", ""))
    # A guest paused by a post-copy that broke after the switch may be destroyed too: its
    # state then lives only at the destination (if that still has it).
    entry = agent.registry.transition(name, frozenset({"running", "paused", "lost"}), "destroying")
    rc = None
    try:
        if entry.guest is not None:
            rc = entry.guest.exit(timeout_s=agent.config.guest_exit_timeout_s)
    finally:
        agent.registry.remove(name, "destroying")
    log.info("destroyed guest %s (exit status %s)", name, rc)
    return {"name": name, "exit_status": rc}


def cmd_verify(agent, channel, request: dict) -> dict:
    """Check the guest's whole RAM against its own ledger, read from the agent while the
    guest runs on (``verify_running``: its workload is not stopped).  Running and paused
    guests only; the state is not changed."""
    name = str(request.get("name", ""))
    entry = agent.registry.get(name)  # AgentError(no-such-guest)
    if entry.state not in ("running", "paused") or entry.guest is None:
        raise AgentError(ErrorCode.BUSY, f"guest {name!r} is {entry.state}: it can be verified when running or paused")
    t = time.monotonic()
    try:
        check = entry.guest.verify_running()
    except VmemError as err:
        raise AgentError(ErrorCode.FAILED, f"guest {name!r} could not verify: {err}") from None
    check["duration_s"] = round(time.monotonic() - t, 3)
    return {"name": name, "check": check}


def _savefile():
    try:
        from vmem.migration import savefile
    except ImportError:
        raise AgentError(ErrorCode.UNAVAILABLE, "save/restore is not available in this vmem build (vmem.migration.savefile is "
                                                "missing): update vmem on this host") from None
    return savefile


def _absolute(path) -> str:
    if not isinstance(path, str) or not os.path.isabs(path):
        raise AgentError(ErrorCode.BAD_REQUEST, f"the file must be an absolute path on the agent's host, got {path!r}")
    return path


#: The one byte a client sends right after a request with ``"fd": true``; the descriptor
#: rides on it (SCM_RIGHTS needs at least one byte of data).
FD_MARKER = b"F"
#: How long the agent waits for the descriptor after such a request.
FD_TIMEOUT_S = 10.0


def receive_fd(channel) -> int:
    """The descriptor passed right after a request with ``"fd": true`` (the caller owns it).

    Raises:
        AgentError(bad-request): no descriptor came (the connection is not a unix socket,
            or the client sent something else).
    """
    recv_fds = getattr(channel, "recv_fds", None)
    if recv_fds is None:
        raise AgentError(ErrorCode.BAD_REQUEST, "a file descriptor can only be passed over the control socket")
    previous = channel.gettimeout()
    channel.settimeout(FD_TIMEOUT_S)
    try:
        data, fds = recv_fds(len(FD_MARKER), 1)
    except Exception as err:
        raise AgentError(ErrorCode.BAD_REQUEST, f"the request announced a file descriptor but none came: {err}") from None
    finally:
        channel.settimeout(previous)
    if data != FD_MARKER or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise AgentError(ErrorCode.BAD_REQUEST, "the request announced a file descriptor but none came (use the vmem "
                                                "CLI of the agent's version)")
    return fds[0]


def _file_of(channel, request: dict, *, writable: bool) -> tuple[int | None, str]:
    """``(fd, name)``: the caller's passed descriptor (checked: a regular file, open for
    writing / reading), or ``(None, path)`` for a bare absolute path."""
    if request.get("fd") is not True:
        return None, _absolute(request.get("path"))
    fd = receive_fd(channel)
    shown = request.get("path") if isinstance(request.get("path"), str) else f"the passed file (fd {fd})"
    try:
        st = os.fstat(fd)
        mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as err:
        os.close(fd)
        raise AgentError(ErrorCode.BAD_REQUEST, f"{shown}: the passed descriptor is unusable: {err.strerror}") from None
    why = ""
    if not stat.S_ISREG(st.st_mode):
        why = "is not a regular file"
    elif writable and mode == os.O_RDONLY:
        why = "was opened read-only; saving needs it open for writing"
    elif not writable and mode == os.O_WRONLY:
        why = "was opened write-only; restoring needs it open for reading"
    if why:
        os.close(fd)
        raise AgentError(ErrorCode.BAD_REQUEST, f"{shown} {why}")
    return fd, shown


def cmd_save(agent, channel, request: dict) -> dict:
    """``{"op": "save", "name", "path", "keep_running"}``: like ``xl save [-c]``.

    Without ``keep_running`` the guest stops once saved and leaves the registry; with it,
    it runs on.  On failure it keeps running, as before.
    """
    savefile = _savefile()
    name = str(request.get("name", ""))
    fd, path = _file_of(channel, request, writable=True)
    try:
        return _save(agent, savefile, name, fd, path, bool(request.get("keep_running", False)))
    finally:
        if fd is not None:
            os.close(fd)


def _save(agent, savefile, name: str, fd: int | None, path: str, keep: bool) -> dict:
    entry = agent.registry.transition(name, "running", "saving")
    try:
        # With a passed descriptor the CLI owns the file's name: it wrote PATH.part and
        # renames it once we answer (see vmem.cli.agent._cmd_save).
        stats = savefile.save_guest(entry.guest, path, keep_running=keep, name=name, fd=fd)
    except BaseException as err:
        if entry.guest.alive():
            agent.registry.transition(name, "saving", "running")
        else:
            agent.registry.remove(name, "saving")
            entry.guest.close()
        if isinstance(err, (VmemError, OSError)):
            raise AgentError(ErrorCode.FAILED, f"saving guest {name!r} to {path} failed: {err}") from None
        raise
    if keep and entry.guest.alive():
        agent.registry.transition(name, "saving", "running")
    elif keep:
        agent.registry.remove(name, "saving")
        entry.guest.close()
        raise AgentError(ErrorCode.FAILED, f"guest {name!r} was saved to {path} but died afterwards")
    else:
        agent.registry.remove(name, "saving")
        entry.guest.close()
    log.info("saved guest %s to %s%s", name, path, " (still running)" if keep else "")
    return {"name": name, "path": path, "stats": stats}


def _not_a_savefile(path: str, err: BaseException) -> AgentError:
    """The refusal for a file that is not a (valid) vmem save file.  It names where the
    check failed but never what the file holds: the message goes to whoever asked."""
    offset = getattr(err, "offset", None)
    where = f" (the check failed at offset {offset})" if isinstance(offset, int) else ""
    return AgentError(ErrorCode.BAD_REQUEST, f"{path} is not a valid vmem save file{where}: restore only files written "
                                            "by `vmem save`")


def _read_save_config(savefile, path: str, fd: int | None) -> dict:
    """The domain config recorded in a save file's xl header (name, size, guest spec)."""
    from vmem.errors import StreamError

    try:
        with (os.fdopen(os.dup(fd), "rb", buffering=0) if fd is not None else open(path, "rb", buffering=0)) as f:
            f.seek(0)

            def recv_exact(n: int) -> bytes:
                data = f.read(n)
                if len(data) != n:
                    raise EOFError(f"ends after {len(data)} of {n} bytes")
                return data

            return savefile.read_xl_header(recv_exact).config or {}
    except FileNotFoundError:
        raise AgentError(ErrorCode.BAD_REQUEST, f"{path}: no such file on the agent's host") from None
    except OSError as err:
        raise AgentError(ErrorCode.BAD_REQUEST, f"cannot read {path}: {err.strerror}") from None
    except (StreamError, EOFError) as err:
        raise _not_a_savefile(path, err) from None


def cmd_restore(agent, channel, request: dict) -> dict:
    """``{"op": "restore", "path", "name"}``: start a guest from a save file (like ``xl restore``).

    The name defaults to the one recorded in the file; the name and the memory are reserved
    before anything is spawned.
    """
    savefile = _savefile()
    fd, path = _file_of(channel, request, writable=False)
    try:
        return _restore(agent, savefile, request, fd, path)
    finally:
        if fd is not None:
            os.close(fd)


def _restore(agent, savefile, request: dict, fd: int | None, path: str) -> dict:
    from vmem.errors import StreamError

    config = _read_save_config(savefile, path, fd)
    section = config.get("vmem") or {}
    name = request.get("name")
    if name:
        name = validate_name(name)
    else:
        name = (config.get("c_info") or {}).get("name")
        if not name:
            raise AgentError(ErrorCode.BAD_REQUEST, f"{path} does not record a guest name: give --name NAME")
        try:
            name = validate_name(name)
        except AgentError:  # not quoted: it is the file's content
            raise AgentError(ErrorCode.BAD_REQUEST, f"the guest name recorded in {path} is not a valid name here: "
                                                    "give --name NAME") from None
    try:
        size_bytes = int(section["npages"]) * int(section.get("page_size", 4096))
    except (KeyError, TypeError, ValueError):
        raise AgentError(ErrorCode.BAD_REQUEST, f"{path} lacks the vmem section of its config: not a vmem save file") from None
    spec = section.get("guest") or {}
    agent.registry.reserve(name, "restoring", size_bytes, spec, origin=f"restored from {path}")
    # restore_guest spawns through vmem.migration.backend's incoming factory, which the agent
    # routes to its spawner thread and checks against what was reserved here.
    agent.expect_guest(size_bytes, spec, f"the restore of {path}")
    try:
        guest, stats = savefile.restore_guest(path, name=name, fd=fd)
    except BaseException as err:
        agent.registry.remove(name, "restoring")
        if isinstance(err, StreamError):
            raise _not_a_savefile(path, err) from None
        if isinstance(err, OSError):
            raise AgentError(ErrorCode.FAILED, f"restoring {path} failed: {err.strerror or type(err).__name__}") from None
        if isinstance(err, VmemError):
            raise AgentError(ErrorCode.FAILED, f"restoring {path} failed: {err}") from None
        raise
    finally:
        agent.expect_guest(None, None, "")
    entry = agent.registry.get(name)
    entry.spec = guest.spec.to_json()
    agent.own_guest(name, guest)
    agent.registry.transition(name, "restoring", "running", guest=guest)
    log.info("restored guest %s from %s (pid %d)", name, path, guest.pid)
    return {"guest": entry.describe(), "stats": stats}


def cmd_migrate(agent, channel, request: dict) -> dict:
    from vmem.agent.migration import migrate_out

    return migrate_out(agent, channel, request)


def _job(agent, request: dict) -> tuple[str, dict]:
    name = str(request.get("name", ""))
    job = agent.jobs.get(name)
    if job is None:
        raise AgentError(ErrorCode.NO_SUCH_GUEST, f"no outgoing migration of guest {name!r} is running on this agent")
    return name, job


def cmd_jobinfo(agent, channel, request: dict) -> dict:
    """``{"op": "jobinfo", "name"}``: the progress of NAME's outgoing migration (virsh domjobinfo):
    ``{"job": {phase, detail, rounds, elapsed_s, expected_downtime_ms, remaining_bytes,
    round_eta_s, dirty_rate_pps, throttle, target, policy}}``."""
    name, job = _job(agent, request)
    mig = job["migration"]
    describe = getattr(mig.policy, "describe", None)
    return {"job": job["progress"].status() | {"target": job["target"], "name": name,
                                               "policy": describe() if describe else {}}}


def cmd_migrate_setmaxdowntime(agent, channel, request: dict) -> dict:
    """``{"op": "migrate-setmaxdowntime", "name", "ms"}``: change the downtime limit of NAME's
    running migration (virsh migrate-setmaxdowntime); the policy uses it from its next
    decision on.  Refused (bad-request) for a policy without a downtime limit or a limit
    that is not a positive number."""
    name, job = _job(agent, request)
    try:
        ms = float(request.get("ms"))
    except (TypeError, ValueError):
        raise AgentError(ErrorCode.BAD_REQUEST, f"the downtime limit must be a number of milliseconds, got {request.get('ms')!r}") from None
    if not (ms > 0 and ms < float("inf")):
        raise AgentError(ErrorCode.BAD_REQUEST, f"the downtime limit must be > 0 ms, got {ms:g}")
    policy = job["migration"].policy
    if not hasattr(policy, "max_downtime_ms"):
        raise AgentError(ErrorCode.BAD_REQUEST, f"guest {name}'s migration uses policy "
                                                f"{getattr(policy, 'name', type(policy).__name__)}, which has no downtime "
                                                "limit (downtime-limit and budget have one)")
    old = policy.max_downtime_ms
    policy.max_downtime_ms = ms  # one float store: the policy reads it at its next decision
    return {"name": name, "old_ms": old, "max_downtime_ms": ms}


def cmd_migrate_setspeed(agent, channel, request: dict) -> dict:
    """``{"op": "migrate-setspeed", "name", "bandwidth": RATE, "postcopy": bool}``: change a
    cap of NAME's running migration (virsh migrate-setspeed [--postcopy]): the link's
    ``--bandwidth`` (a migration started with one), or with ``postcopy`` the post-copy
    push's ``--postcopy-bandwidth`` (a migration with post-copy).  RATE as the flags take
    it (``100M``, ``1Gbit``).  Refused (bad-request) naming the flag otherwise."""
    from vmem.errors import ConfigError
    from vmem.units import bandwidth_from_arg

    name, job = _job(agent, request)
    postcopy = request.get("postcopy", False)
    if not isinstance(postcopy, bool):
        raise AgentError(ErrorCode.BAD_REQUEST, f"postcopy must be true or false, got {postcopy!r}")
    flag = "--postcopy-bandwidth" if postcopy else "--bandwidth"
    rate = request.get("bandwidth")
    try:
        if not isinstance(rate, str):
            raise ConfigError(flag, f"the rate must be a string such as 100M or 1Gbit, got {rate!r}")
        rate_Bps = bandwidth_from_arg(rate, flag)
        old = job["migration"].set_bandwidth(rate_Bps, postcopy=postcopy)
    except ConfigError as err:
        raise AgentError(ErrorCode.BAD_REQUEST, str(err)) from None
    return {"name": name, "postcopy": postcopy, "old_Bps": old, "bandwidth_Bps": rate_Bps}


#: Ops that name a file on the agent's host: taken from the control socket only.
LOCAL_ONLY_COMMANDS = frozenset({"save", "restore"})

#: op -> handler.  Every op is allowed from the local CLI; all but
#: :data:`LOCAL_ONLY_COMMANDS` from agents that authenticated (key or TLS).
COMMANDS = {
    "ping": cmd_ping,
    "create": cmd_create,
    "list": cmd_list,
    "destroy": cmd_destroy,
    "verify": cmd_verify,
    "save": cmd_save,
    "restore": cmd_restore,
    "migrate": cmd_migrate,
    "jobinfo": cmd_jobinfo,
    "migrate-setmaxdowntime": cmd_migrate_setmaxdowntime,
    "migrate-setspeed": cmd_migrate_setspeed,
}
