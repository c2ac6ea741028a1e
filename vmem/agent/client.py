"""The CLI's side of the control socket: :class:`AgentClient`.

One connection per CLI invocation; requests get exactly one reply, streamed requests
(``migrate``) get events first.  Every failure to talk to the agent becomes an
:class:`vmem.agent.protocol.AgentError` naming the socket and what to do.
"""
from __future__ import annotations

import socket

from transport import SocketChannel, TransportError

from vmem.agent.protocol import AgentError, ErrorCode, client_hello, raise_for_reply, recv_frame, send_frame

__all__ = ["AgentClient", "report_from_dict"]


class AgentClient:
    """A connection to the agent whose control socket is ``path``.

    Raises (constructor):
        AgentError(unreachable): nothing listens there, or it is not ours to use.
        ProtocolError: it is not a vmem agent, or another protocol version.
    """

    def __init__(self, path: str, timeout_s: float = 10.0):
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout_s)
            sock.connect(path)
        except FileNotFoundError:
            sock.close()
            raise AgentError(ErrorCode.UNREACHABLE, f"no vmem agent at {path}: start one with "
                                                    "`vmem agent --listen ADDR:PORT --key FILE`, or point --agent/$VMEM_AGENT "
                                                    "at its socket") from None
        except ConnectionRefusedError:
            sock.close()
            raise AgentError(ErrorCode.UNREACHABLE, f"the vmem agent of {path} is not running (stale socket): start it "
                                                    "again") from None
        except PermissionError:
            sock.close()
            raise AgentError(ErrorCode.UNREACHABLE, f"permission denied on {path}: the agent runs as another user; run "
                                                    "vmem as that user") from None
        except OSError as err:
            sock.close()
            raise AgentError(ErrorCode.UNREACHABLE, f"cannot connect to the vmem agent at {path}: {err}") from None
        self.channel = SocketChannel(sock)
        try:
            self.hello = client_hello(self.channel, "command", f"the agent at {path}")
        except TransportError as err:
            self.channel.close()
            raise AgentError(ErrorCode.UNREACHABLE, f"the agent at {path} closed the connection: {err}") from None
        except BaseException:
            self.channel.close()
            raise
        self.channel.settimeout(None)

    def request(self, op: str, on_event=None, *, fd: int | None = None, **fields) -> dict:
        """Send one request and return its (ok) reply; events go to ``on_event(event)``.

        ``fd``: a file this process opened, passed to the agent with the request (SCM_RIGHTS)
        so that the agent reads or writes it with this process's access, not its own.

        Raises:
            AgentError: the agent's error reply (with its code), or a lost connection.
        """
        from vmem.agent.commands import FD_MARKER

        try:
            if fd is None:
                send_frame(self.channel, {"op": op} | fields)
            else:
                send_frame(self.channel, {"op": op, "fd": True} | fields)
                self.channel.send_fds(FD_MARKER, [fd])
            while True:
                msg = recv_frame(self.channel)
                if "event" in msg:
                    if on_event is not None:
                        on_event(msg)
                    continue
                return raise_for_reply(msg, "agent")
        except TransportError as err:
            raise AgentError(ErrorCode.UNREACHABLE, f"lost the connection to the agent at {self.path}: {err} "
                                                    "(its log says why)") from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def report_from_dict(d: dict):
    """A :class:`vmem.migration.report.MigrationReport` rebuilt from its ``to_dict()`` (keys it lacks are dropped)."""
    from dataclasses import fields

    from vmem.migration.report import MigrationReport, RoundStats

    names = {f.name for f in fields(MigrationReport)}
    round_names = {f.name for f in fields(RoundStats)}
    kwargs = {k: v for k, v in d.items() if k in names}
    kwargs["rounds"] = [RoundStats(**{k: v for k, v in r.items() if k in round_names}) for r in d.get("rounds", [])]
    return MigrationReport(**kwargs)
