"""Guest records: what an agent owns, kept in its state directory so the next agent can
take its guests over (guests outlive their agent: docs/agent.md "Restarts and upgrades").

Layout, inside the agent's state directory (mode 0700, the agent's user)::

    guests/                 mode 0700
    guests/NAME.json        the record, mode 0600, written atomically (temp file, fsync, rename)
    guests/NAME.sock        the guest's owner socket (bound by the agent, served by the guest)
    guests.log              the guests' stderr (appended)

A record (``RECORD_VERSION`` 1; adding keys is compatible)::

    {"version": 1, "name", "pid", "start_ticks", "uid", "token" (hex, 32 bytes),
     "size_bytes", "spec", "origin", "state": "running" | "paused" | "migrating" | "saving" | "destroying"}

``start_ticks`` is field 22 of ``/proc/PID/stat`` (the process's start time since boot):
a pid that was recycled after the guest died has another one, so a stranger is never
taken for the guest.  Records are read only if the file and its directory belong to the
agent's user and are not readable by anyone else.
"""
from __future__ import annotations

import json
import os
import signal
import stat

__all__ = ["RECORD_VERSION", "guests_dir", "guest_log_path", "owner_socket_path", "write_record", "remove_record",
           "read_records", "process_start_ticks", "record_matches_process", "kill_recorded_guests"]

RECORD_VERSION = 1
_SUFFIX = ".json"


def guests_dir(state_dir: str) -> str:
    return os.path.join(state_dir, "guests")


def guest_log_path(state_dir: str) -> str:
    return os.path.join(state_dir, "guests.log")


def owner_socket_path(state_dir: str, name: str) -> str:
    return os.path.join(guests_dir(state_dir), name + ".sock")


def _record_path(state_dir: str, name: str) -> str:
    return os.path.join(guests_dir(state_dir), name + _SUFFIX)


def prepare_guests_dir(state_dir: str) -> str:
    path = guests_dir(state_dir)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _stat_fields(pid: int) -> list[bytes]:
    """``/proc/PID/stat`` from field 3 (state) on.  Raises ProcessLookupError."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'.
    return data[data.rindex(b")") + 2:].split()


def process_start_ticks(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22).

    Raises:
        ProcessLookupError: no such process.
    """
    return int(_stat_fields(pid)[19])


def write_record(state_dir: str, record: dict) -> None:
    """Write ``record`` as guests/NAME.json atomically: a reader sees the old or the new one."""
    directory = prepare_guests_dir(state_dir)
    final = _record_path(state_dir, record["name"])
    tmp = f"{final}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"version": RECORD_VERSION, **record}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def remove_record(state_dir: str, name: str) -> None:
    """Forget guest ``name``: its record and its owner socket (missing files are fine)."""
    for path in (_record_path(state_dir, name), owner_socket_path(state_dir, name)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def read_records(state_dir: str) -> list[tuple[str, dict | None, str]]:
    """Every record in the state directory as ``(name, record, "")``, or ``(name, None,
    why)`` for one that cannot be trusted or read (a one-line reason).  Leftover temp files
    of an interrupted write are removed."""
    directory = guests_dir(state_dir)
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return [("*", None, f"{directory} is not a private directory of uid {os.geteuid()}: its records are ignored")]
    out = []
    for entry in names:
        path = os.path.join(directory, entry)
        if entry.endswith(".tmp"):
            os.unlink(path)
            continue
        if not entry.endswith(_SUFFIX):
            continue
        name = entry[: -len(_SUFFIX)]
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            out.append((name, None, f"cannot open {path}: {err.strerror}"))
            continue
        with os.fdopen(fd) as f:
            fst = os.fstat(fd)
            if fst.st_uid != os.geteuid() or fst.st_mode & 0o077 or not stat.S_ISREG(fst.st_mode):
                out.append((name, None, f"{path} must be a regular file of uid {os.geteuid()} with mode 0600: ignored"))
                continue
            try:
                record = json.load(f)
                ok = (record.get("version") == RECORD_VERSION and record.get("name") == name
                      and isinstance(record.get("pid"), int) and isinstance(record.get("start_ticks"), int)
                      and len(bytes.fromhex(record.get("token", ""))) == 32)
            except (ValueError, AttributeError, TypeError):
                ok = False
            if not ok:
                out.append((name, None, f"{path} is not a guest record of this vmem version: ignored"))
                continue
        out.append((name, record, ""))
    return out


def record_matches_process(record: dict) -> bool:
    """True if the recorded guest process still runs (same pid and start time, our uid, not
    a zombie waiting to be reaped)."""
    try:
        fields = _stat_fields(record["pid"])
        if int(fields[19]) != record["start_ticks"] or fields[0] in (b"Z", b"X"):
            return False
        return os.stat(f"/proc/{record['pid']}").st_uid == record.get("uid", os.geteuid())
    except (ProcessLookupError, FileNotFoundError):
        return False


def kill_recorded_guests(state_dir: str, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every live guest recorded in ``state_dir`` and wait until each is gone; remove
    the records.  For tests, scripts and `vmem agent --stop-guests` style clean-up after an
    agent has exited.  Returns the pids killed.  Reaps them too when they are our children
    (a subreaper's)."""
    import select

    killed = []
    for name, record, _why in read_records(state_dir):
        if record is not None and record_matches_process(record):
            try:
                pidfd = os.pidfd_open(record["pid"])
            except ProcessLookupError:
                pidfd = -1
            if pidfd >= 0:
                try:
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    select.select([pidfd], [], [], timeout_s)
                    killed.append(record["pid"])
                except ProcessLookupError:
                    pass
                finally:
                    os.close(pidfd)
                try:
                    os.waitpid(record["pid"], 0)
                except ChildProcessError:
                    pass
        if name != "*":
            remove_record(state_dir, name)
    return killed
