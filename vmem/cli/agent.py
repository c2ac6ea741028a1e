"""``vmem agent``, ``keygen``, ``create``, ``list``, ``destroy``, ``save``, ``restore`` and the
agent form of ``migrate`` (``vmem migrate NAME HOST:PORT``).

Everything except ``agent`` and ``keygen`` talks to the local agent over its control
socket, found with ``--agent SOCKET``, ``$VMEM_AGENT`` or the default path
(:mod:`vmem.agent.paths`).  Exit status: 0 success, 1 refused or failed, 2 bad arguments;
``migrate`` as the one-host form (0 completed, 1 failed, 3 aborted by the policy).
"""
from __future__ import annotations

import os
import sys

__all__ = ["AGENT_COMMANDS", "add_agent_commands", "add_agent_address_arguments", "run_agent_command",
           "cmd_migrate_via_agent"]

AGENT_COMMANDS = ("agent", "keygen", "create", "list", "destroy", "verify", "save", "restore", "jobinfo",
                  "migrate-setmaxdowntime", "migrate-setspeed")


def add_agent_address_arguments(parser) -> None:
    """``--agent SOCKET``: which agent the command talks to."""
    parser.add_argument("--agent", metavar="SOCKET", default=None,
                        help="the agent's control socket (default: $VMEM_AGENT, else the local agent's default socket)")


def add_agent_commands(sub) -> None:
    """Register the agent subcommands on ``sub`` (argparse subparsers)."""
    from vmem.cli.args import add_guest_arguments
    from vmem.agent.paths import DEFAULT_PORT

    p = sub.add_parser("agent", help="run the host agent: owns guests, receives and sends migrations",
                       description="Run the host agent in the foreground (logs to stderr).  It creates and owns guests "
                                   "(vmem create/list/destroy), receives migrations from other agents on --listen, and "
                                   "sends its guests to them (vmem migrate NAME HOST:PORT).  Guests outlive the agent: a "
                                   "restarted agent on the same --state-dir takes them over (docs/agent.md).")
    p.add_argument("--listen", metavar="ADDR:PORT", default=f"127.0.0.1:{DEFAULT_PORT}",
                   help=f"TCP address for other agents (default 127.0.0.1:{DEFAULT_PORT}; port 0 picks a free one)")
    p.add_argument("--key", metavar="FILE", help="shared key (vmem keygen FILE; mode 0600): peers must prove they hold it, "
                                                 "and every frame is MAC-protected")
    p.add_argument("--tls-cert", metavar="FILE", help="this agent's TLS certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="its private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA that signs every agent's certificate (PEM)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --listen without --key or TLS")
    p.add_argument("--state-dir", metavar="DIR", help="where the control socket lives (default /run/vmem/PORT for root, "
                                                      "else $XDG_RUNTIME_DIR/vmem/PORT)")
    from vmem.agent.limits import ConnectionCaps

    caps = ConnectionCaps()
    p.add_argument("--max-connections", type=int, metavar="N", default=caps.total,
                   help=f"connections served at once, all peers together (default {caps.total}); more are refused")
    p.add_argument("--max-connections-per-peer", type=int, metavar="N", default=caps.per_peer,
                   help=f"connections one peer (IP address, or local uid) may hold at once (default {caps.per_peer})")
    p.add_argument("--max-openings", type=int, metavar="N", default=caps.opening_total,
                   help=f"connections not yet through their opening (authentication), all peers (default "
                        f"{caps.opening_total}); per peer: a quarter of it, at least 1")
    p.add_argument("--handshake-timeout", type=float, metavar="S", default=caps.handshake_timeout_s,
                   help=f"a connection must finish its opening within S seconds (default {caps.handshake_timeout_s:g})")
    p.add_argument("--idle-timeout", type=float, metavar="S", default=caps.idle_timeout_s,
                   help=f"close a connection with nothing to do for S seconds (default {caps.idle_timeout_s:g})")
    p.add_argument("--stop-guests", action="store_true",
                   help="stop every guest when the agent stops (default: leave them running for the next agent)")
    p.add_argument("--check", action="store_true",
                   help="validate the configuration (address, key/TLS files, limits, state directory) and exit: 0 if "
                        "it would start, 2 with one line per problem; starts nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")

    p = sub.add_parser("keygen", help="write a new shared agent key (mode 0600)",
                       description="Write a new random shared key to FILE (mode 0600).  Copy it to every host whose agent "
                                   "should accept migrations from this one, and start each agent with --key FILE.")
    p.add_argument("file", metavar="FILE")

    p = sub.add_parser("create", help="create a guest on the local agent",
                       description="Ask the local agent to boot a guest NAME running a workload (like xl create).")
    p.add_argument("name", metavar="NAME")
    add_guest_arguments(p, warmup=False)
    add_agent_address_arguments(p)

    p = sub.add_parser("list", help="list the local agent's guests (like xl list)")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    add_agent_address_arguments(p)

    p = sub.add_parser("destroy", help="stop a guest and forget it")
    p.add_argument("name", metavar="NAME")
    add_agent_address_arguments(p)

    p = sub.add_parser("verify", help="have a guest check its whole RAM against its own ledger")
    p.add_argument("name", metavar="NAME")
    add_agent_address_arguments(p)

    p = sub.add_parser("save", help="save a guest to a file (like xl save)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("file", metavar="FILE", help="written on the agent's host")
    p.add_argument("-c", "--keep-running", action="store_true", help="leave the guest running after saving (xl save -c)")
    add_agent_address_arguments(p)

    p = sub.add_parser("jobinfo", help="the progress of a guest's outgoing migration (like virsh domjobinfo)",
                       description="Ask the local agent how its migration of guest NAME is going, as QMP's "
                                   "query-migrate says it: phase, rounds, expected downtime, bytes remaining in the "
                                   "current round and its ETA, dirty rate, throttle, the policy and its limits.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    add_agent_address_arguments(p)

    p = sub.add_parser("migrate-setmaxdowntime",
                       help="change the downtime limit of a running migration (like virsh migrate-setmaxdowntime)",
                       description="Set the downtime limit (milliseconds) of guest NAME's running outgoing migration; "
                                   "its policy (downtime-limit or budget) uses it from its next decision on.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("ms", metavar="MS", type=float, help="the new limit in milliseconds (> 0)")
    add_agent_address_arguments(p)

    p = sub.add_parser("migrate-setspeed",
                       help="change the bandwidth cap of a running migration (like virsh migrate-setspeed)",
                       description="Set the link's cap (--bandwidth) of guest NAME's running outgoing migration, "
                                   "from its next send on; only a migration started with --bandwidth has one. With "
                                   "--postcopy, set the post-copy push's cap (--postcopy-bandwidth) instead: from the "
                                   "push's next batch, or from the switch on if it has not come yet.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("bandwidth", metavar="RATE", help="100M (MB/s, bytes), 50MiB (MiB/s), 1Gbit (bits/s); a bare number "
                                                     "is refused")
    p.add_argument("--postcopy", action="store_true", help="the post-copy push's cap, not the link's")
    add_agent_address_arguments(p)

    p = sub.add_parser("restore", help="start a guest from a save file (like xl restore)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--name", metavar="NAME", help="name of the restored guest (default: the name it was saved under)")
    add_agent_address_arguments(p)


def _client(args):
    from vmem.agent.client import AgentClient
    from vmem.agent.paths import find_agent_socket

    return AgentClient(find_agent_socket(getattr(args, "agent", None)))


def run_agent_command(args) -> int:
    """Run one of :data:`AGENT_COMMANDS`; errors propagate as VmemError/ConfigError to ``vmem.cli.main.main``."""
    return {"agent": _cmd_agent, "keygen": _cmd_keygen, "create": _cmd_create, "list": _cmd_list,
            "destroy": _cmd_destroy, "verify": _cmd_verify, "save": _cmd_save,
            "restore": _cmd_restore, "jobinfo": _cmd_jobinfo,
            "migrate-setmaxdowntime": _cmd_setmaxdowntime, "migrate-setspeed": _cmd_setspeed}[args.command](args)


def _agent_config(args, problems: list | None = None):
    """The AgentConfig that ``vmem agent ARGS`` asks for.

    Raises:
        ConfigError: the first problem, naming its flag -- or, with ``problems`` given, every
            problem is appended there (as ConfigError) and None is returned if there was any.
    """
    from vmem.errors import ConfigError
    from vmem.agent.net import parse_hostport
    from vmem.agent.paths import DEFAULT_PORT
    from vmem.agent.limits import ConnectionCaps
    from vmem.agent.security import PeerSecurity
    from vmem.agent.server import AgentConfig

    found: list = []

    def problem(err: ConfigError) -> None:
        if problems is None:
            raise err
        found.append(err)

    host, port = "127.0.0.1", DEFAULT_PORT
    try:
        host, port = parse_hostport(args.listen, DEFAULT_PORT)
    except ValueError as err:
        problem(ConfigError("--listen", str(err)))
    security = None
    try:
        security = PeerSecurity.from_options(listen_host=host, key_file=args.key, tls_cert=args.tls_cert,
                                             tls_key=args.tls_key, tls_ca=args.tls_ca, insecure=args.insecure)
    except ConfigError as err:
        problem(err)
    for flag, value in (("--max-connections", args.max_connections), ("--max-connections-per-peer",
                        args.max_connections_per_peer), ("--max-openings", args.max_openings),
                        ("--handshake-timeout", args.handshake_timeout), ("--idle-timeout", args.idle_timeout)):
        if not value > 0:
            problem(ConfigError(flag, f"must be positive, got {value}"))
    if args.state_dir is not None or problems is not None:
        from vmem.agent.paths import check_state_dir, default_state_dir

        why = check_state_dir(args.state_dir or default_state_dir(port))
        if why:
            problem(ConfigError("--state-dir", why))
    if problems is not None:
        problems.extend(found)
        if found:
            return None
    caps = ConnectionCaps(total=args.max_connections, per_peer=args.max_connections_per_peer,
                          opening_total=args.max_openings, opening_per_peer=max(1, args.max_openings // 4),
                          handshake_timeout_s=args.handshake_timeout, idle_timeout_s=args.idle_timeout)
    return AgentConfig(listen_host=host, listen_port=port, security=security, state_dir=args.state_dir, caps=caps,
                       stop_guests=args.stop_guests)


def _cmd_agent(args) -> int:
    import logging

    from vmem.agent.server import run_agent

    if args.check:
        problems: list = []
        config = _agent_config(args, problems)
        for err in problems:
            print(f"vmem agent: {err}", file=sys.stderr)
        if config is None:
            return 2
        from vmem.agent.paths import default_state_dir

        print(f"vmem agent: configuration ok: listen {config.listen_host}:{config.listen_port}, security "
              f"{config.security.mode}, state directory {config.state_dir or default_state_dir(config.listen_port)}")
        return 0
    config = _agent_config(args)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s vmem-agent[{os.getpid()}] %(levelname)s %(message)s")
    return run_agent(config)


def _cmd_keygen(args) -> int:
    from transport import TransportError
    from transport.secure import generate_key

    from vmem.agent.protocol import AgentError, ErrorCode

    try:
        generate_key(args.file)
    except TransportError as err:
        raise AgentError(ErrorCode.BAD_REQUEST, str(err)) from None
    print(f"wrote a new agent key to {args.file} (mode 0600): copy it to every host, then `vmem agent --key {args.file}`",
          file=sys.stderr)
    return 0


def _cmd_create(args) -> int:
    with _client(args) as c:
        reply = c.request("create", name=args.name, workload=args.workload, workload_args=args.workload_arg,
                          seed=args.seed, size=args.size, backend=args.backend)
    g = reply["guest"]
    print(f"created guest {g['name']}: {g['workload']} {g['params'] or ''}, {g['size_bytes'] >> 20} MiB, pid {g['pid']}")
    return 0


def format_guest_table(rows: list[dict]) -> str:
    """``vmem list`` as ``xl list`` prints it: one guest a line, fixed columns."""
    head = f"{'Name':<24} {'PID':>8} {'Mem(MiB)':>9} {'State':<11} {'Workload':<12} {'Time(s)':>9} {'Steps':>12}"
    lines = [head]
    for r in rows:
        dash = "-"
        lines.append(f"{r['name']:<24} {r['pid'] if r['pid'] is not None else dash:>8} {r['size_bytes'] >> 20:>9} "
                     f"{r['state']:<11} {str(r['workload'] or dash):<12} "
                     f"{r['guest_time_s'] if r['guest_time_s'] is not None else dash:>9} "
                     f"{format(r['steps'], ',') if r['steps'] is not None else dash:>12}")
    return "\n".join(lines)


def _cmd_list(args) -> int:
    import json

    with _client(args) as c:
        reply = c.request("list")
    if args.json:
        print(json.dumps({"guests": reply["guests"], "agent": reply["agent"]}, indent=2))
    else:
        print(format_guest_table(reply["guests"]))
    return 0


def _cmd_destroy(args) -> int:
    with _client(args) as c:
        c.request("destroy", name=args.name)
    print(f"destroyed guest {args.name}")
    return 0


def _cmd_verify(args) -> int:
    with _client(args) as c:
        reply = c.request("verify", name=args.name)
    check = reply.get("check") or {}
    print(f"guest {args.name}: {'ok' if check.get('ok') else 'FAILED'}: {check.get('detail', check)}")
    return 0 if check.get("ok") else 1


def format_jobinfo(job: dict) -> str:
    """``vmem jobinfo``'s lines, virsh domjobinfo style."""
    from vmem.ram import format_bytes

    pol = job.get("policy") or {}
    limit = pol.get("max_downtime_ms")
    rows = [("guest", job.get("name")), ("destination", job.get("target")),
            ("phase", job.get("phase", "") + (f": {job['detail']}" if job.get("detail") else "")),
            ("rounds done", job.get("rounds")), ("policy", pol.get("name", "?") + (f", max downtime {limit:g} ms" if limit else "")),
            ("elapsed", f"{job.get('elapsed_s', 0):.1f} s"),
            ("expected downtime", "-" if job.get("expected_downtime_ms") is None else f"{job['expected_downtime_ms']:,.1f} ms"),
            ("remaining (round)", format_bytes(job.get("remaining_bytes") or 0)),
            ("round ETA", "-" if job.get("round_eta_s") is None else f"{job['round_eta_s']:.2f} s"),
            ("dirty rate", "-" if job.get("dirty_rate_pps") is None else f"{job['dirty_rate_pps']:,.0f} pages/s"),
            ("throttle", f"{(job.get('throttle') or 0) * 100:.0f} %")]
    return "\n".join(f"{k + ':':<20}{v}" for k, v in rows)


def _cmd_jobinfo(args) -> int:
    import json

    with _client(args) as c:
        job = c.request("jobinfo", name=args.name)["job"]
    print(json.dumps(job, indent=2) if args.json else format_jobinfo(job))
    return 0


def _cmd_setmaxdowntime(args) -> int:
    from vmem.errors import ConfigError

    if not (args.ms > 0 and args.ms < float("inf")):
        raise ConfigError("MS", f"the downtime limit must be > 0 ms, got {args.ms:g}")
    with _client(args) as c:
        reply = c.request("migrate-setmaxdowntime", name=args.name, ms=args.ms)
    print(f"guest {args.name}: max downtime {reply['old_ms']:g} -> {reply['max_downtime_ms']:g} ms")
    return 0


def _cmd_setspeed(args) -> int:
    from vmem.units import bandwidth_from_arg

    flag = "--postcopy-bandwidth" if args.postcopy else "--bandwidth"
    bandwidth_from_arg(args.bandwidth, flag)  # a malformed rate fails here, before the agent is asked
    with _client(args) as c:
        reply = c.request("migrate-setspeed", name=args.name, bandwidth=args.bandwidth, postcopy=args.postcopy)

    def mbs(x):
        return "none" if x is None else f"{x / 1e6:,.1f} MB/s"

    print(f"guest {args.name}: {flag} {mbs(reply['old_Bps'])} -> {mbs(reply['bandwidth_Bps'])}")
    return 0


def _open_as_user(path: str, flags: int, what: str) -> int:
    """Open ``path`` as the user running vmem (the agent gets the descriptor, never the
    path: it can write or read only what this user can)."""
    from vmem.agent.protocol import AgentError, ErrorCode

    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise AgentError(ErrorCode.BAD_REQUEST, f"cannot open {path} {what}: {err.strerror}") from None


def _cmd_save(args) -> int:
    """Write ``FILE.part`` through the agent, then rename it to ``FILE`` (a reader never sees
    a partial save; a failed one leaves nothing)."""
    path = os.path.abspath(args.file)
    part = path + ".part"
    fd = _open_as_user(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, "for writing")
    done = False
    try:
        with _client(args) as c:
            c.request("save", fd=fd, name=args.name, path=path, keep_running=args.keep_running)
        os.rename(part, path)
        done = True
        dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        os.close(fd)
        if not done:
            try:
                os.unlink(part)
            except FileNotFoundError:
                pass
    print(f"saved guest {args.name} to {path}" + (" (still running)" if args.keep_running else ""))
    return 0


def _cmd_restore(args) -> int:
    path = os.path.abspath(args.file)
    fd = _open_as_user(path, os.O_RDONLY, "for reading")
    try:
        with _client(args) as c:
            reply = c.request("restore", fd=fd, path=path, name=args.name)
    finally:
        os.close(fd)
    g = reply["guest"]
    print(f"restored guest {g['name']} from {path}: pid {g['pid']}")
    return 0


def cmd_migrate_via_agent(args) -> int:
    """``vmem migrate NAME HOST:PORT [migration flags]``: the local agent migrates its guest NAME.

    The migration flags are validated here first (a bad flag is exit status 2 before the
    agent is asked), then sent as values; the agent rebuilds the same MigrationOptions.
    """
    from rich.console import Console

    from vmem.cli.args import link_options_from_args, migration_argument_dests, options_from_args
    from vmem.cli.display import LiveDisplay, print_summary
    from vmem.errors import ConfigError
    from vmem.migration.report import RoundStats
    from vmem.agent.client import report_from_dict
    from vmem.provenance import command_line

    if getattr(args, "resume", False):
        if args.name is None:
            raise ConfigError("--resume", "needs the guest's NAME: vmem migrate --resume NAME")
    elif args.name is None or args.target is None:
        raise ConfigError("migrate", "the agent form needs both NAME and HOST:PORT (vmem migrate NAME HOST:PORT); "
                                     "without them, vmem migrate --workload ... migrates on this host without an agent")
    if not getattr(args, "resume", False):
        from transport.tcp import parse_hostport

        from vmem.agent.paths import DEFAULT_PORT

        try:
            parse_hostport(args.target, DEFAULT_PORT)
        except ValueError as err:
            raise ConfigError("HOST:PORT", str(err)) from None
    options_from_args(args)  # validation only: the agent builds its own from the values
    link_options_from_args(args)
    values = {dest: getattr(args, dest) for dest in migration_argument_dests()}
    console = Console(stderr=True)
    round_fields = set(RoundStats.__dataclass_fields__)

    with _client(args) as client:
        if getattr(args, "resume", False):
            console.print(f"resuming the post-copy of guest [bold]{args.name}[/bold] (agent {client.path})…")
        else:
            console.print(f"migrating guest [bold]{args.name}[/bold] to {args.target} (agent {client.path})…")
        with LiveDisplay(console, enabled=not args.quiet) as display:
            def on_event(ev: dict) -> None:
                kind = ev.get("event")
                if kind == "phase":
                    display.phase(ev.get("name", ""), ev.get("detail", ""))
                elif kind == "round_start":
                    display.round_start(ev["index"], ev["pages"], ev["kind"])
                elif kind == "sent":
                    display.sent(ev["pages"], ev["nbytes"])
                elif kind == "round_end":
                    display.round_end(RoundStats(**{k: v for k, v in ev["stats"].items() if k in round_fields}))
                elif kind == "log":
                    console.print(ev.get("message", ""))

            extra = {"resume": True} if getattr(args, "resume", False) else {}
            reply = client.request("migrate", on_event=on_event, name=args.name, target=args.target, options=values,
                                   **extra)
    report = report_from_dict(reply["report"])
    # The agent ran the migration; the command that asked for it is this one.
    report.provenance["command_line"] = command_line()
    print_summary(report, Console())
    if args.json:
        report.write(args.json)
        console.print(f"report written to {args.json}")
    if report.outcome == "paused":
        console.print(f"the link broke after the switch: guest {args.name} is paused here with its complete RAM and "
                      f"the destination waits; run `vmem migrate --resume {args.name}` once the link is back")
    return 0 if report.outcome == "completed" else (3 if report.outcome == "aborted" else 1)
