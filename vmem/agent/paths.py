"""Where an agent keeps its control socket, and how the CLI finds it.

Layout: one *state directory* per agent, mode 0700, owned by the agent's user::

    <state-dir>/agent.sock    unix control socket, mode 0600 (the CLI talks here)
    <state-dir>/agent.json    written once the agent serves: {"pid", "listen", "socket", "version"}
    <state-dir>/guests/       the guests it owns, for the next agent (vmem.agent.records)
    <state-dir>/guests.log    the guests' stderr

Default state directory: ``/run/vmem/<port>`` for root, else ``$XDG_RUNTIME_DIR/vmem/<port>``,
else ``/tmp/vmem-<uid>/<port>`` -- one per TCP port, so several agents (test hosts in
network namespaces, or on one machine) never collide.

The CLI finds its agent by ``--agent SOCKET``, else ``$VMEM_AGENT``, else the default
state directory of :data:`DEFAULT_PORT`, else the only agent socket under the default base
directory (more than one: it asks for ``--agent``).
"""
from __future__ import annotations

import glob
import os
import stat

from vmem.agent.protocol import AgentError, ErrorCode

__all__ = ["DEFAULT_PORT", "ENV_AGENT", "default_base_dir", "default_state_dir", "socket_path",
           "info_path", "find_agent_socket", "prepare_state_dir", "check_state_dir"]

#: The agents' TCP port when HOST:PORT omits it (xend's relocation port).
DEFAULT_PORT = 8002
#: Environment variable naming the control socket.
ENV_AGENT = "VMEM_AGENT"


def default_base_dir() -> str:
    if os.geteuid() == 0:
        return "/run/vmem"
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "vmem")
    return f"/tmp/vmem-{os.geteuid()}"


def default_state_dir(port: int) -> str:
    return os.path.join(default_base_dir(), str(port))


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, "agent.sock")


def info_path(state_dir: str) -> str:
    return os.path.join(state_dir, "agent.json")


def find_agent_socket(explicit: str | None = None) -> str:
    """The control socket the CLI should use (see the module docstring for the order).

    Raises:
        AgentError: no agent found, or several and none chosen (the message lists them).
    """
    if explicit:
        return explicit
    if os.environ.get(ENV_AGENT):
        return os.environ[ENV_AGENT]
    default = socket_path(default_state_dir(DEFAULT_PORT))
    if os.path.exists(default):
        return default
    found = sorted(glob.glob(os.path.join(default_base_dir(), "*", "agent.sock")))
    if len(found) == 1:
        return found[0]
    if not found:
        raise AgentError(ErrorCode.UNREACHABLE,
                         f"no vmem agent found (looked for {default} and {default_base_dir()}/*/agent.sock): "
                         "start one with `vmem agent --listen ADDR:PORT --key FILE`, or name its socket with "
                         f"--agent SOCKET or ${ENV_AGENT}")
    raise AgentError(ErrorCode.UNREACHABLE, f"several vmem agents run here ({', '.join(found)}): choose one with "
                                            f"--agent SOCKET or ${ENV_AGENT}")


def prepare_state_dir(path: str) -> None:
    """Create ``path`` (mode 0700) or check an existing one is ours and private.

    Raises:
        AgentError: it exists but belongs to another user, or is not a directory.
    """
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise AgentError(ErrorCode.BAD_REQUEST, f"--state-dir {path} exists and is not a directory")
    if st.st_uid != os.geteuid():
        raise AgentError(ErrorCode.BAD_REQUEST, f"--state-dir {path} belongs to uid {st.st_uid}, not to this user "
                                                f"({os.geteuid()}): choose another --state-dir")
    os.chmod(path, 0o700)


def check_state_dir(path: str) -> str:
    """Why ``path`` cannot be an agent's state directory, or "" (creates nothing).

    An existing one must be a directory of this user; a missing one must be creatable (its
    nearest existing ancestor a writable directory).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            return f"{path} does not exist and cannot be created ({parent} is not a writable directory)"
        return ""
    except OSError as err:
        return f"{path}: {err.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} exists and is not a directory"
    if st.st_uid != os.geteuid():
        return f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()})"
    return ""
