"""The host agent: ``vmem agent`` owns guests on one host and migrates them to other agents.

Modules, one concern each:

* :mod:`~vmem.agent.protocol` -- framed JSON, the opening handshake, error codes (``AgentError``);
* :mod:`~vmem.agent.security` -- shared-key HMAC / TLS / insecure, and the listening rule;
* :mod:`~vmem.agent.limits` -- connection caps, the opening deadline (docs/security.md);
* :mod:`~vmem.agent.registry` -- guest names, states (compare-and-set) and memory reservations;
* :mod:`~vmem.agent.spawner` -- the one thread that starts guest processes (PR_SET_PDEATHSIG);
* :mod:`~vmem.agent.records` -- guest records in the state directory, so the next agent takes
  the guests over (they outlive the agent; the protocol is :mod:`guests.owner`);
* :mod:`~vmem.agent.commands` -- create, list, destroy, save, restore;
* :mod:`~vmem.agent.migration` -- outgoing and incoming agent-to-agent migration;
* :mod:`~vmem.agent.server` -- sockets, connection threads, shutdown (``Agent``);
* :mod:`~vmem.agent.client` -- the CLI's connection to its agent (``AgentClient``);
* :mod:`~vmem.cli.agent` -- the ``vmem`` subcommands;
* :mod:`~vmem.agent.paths`, :mod:`~vmem.agent.net` -- where the socket lives; TCP.

See docs/agent.md and docs/security.md.
"""
from vmem.agent.protocol import PROTOCOL_VERSION, AgentError, ErrorCode, ProtocolError

__all__ = ["AgentError", "ProtocolError", "ErrorCode", "PROTOCOL_VERSION"]
