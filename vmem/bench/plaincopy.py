"""Pieces shared by the two ends of the benchmarks' plain TCP copy (tests/testhosts.py's
TCP_SOURCE and TCP_SINK, timed by scripts/bench_agent.py as the baselines of its round-0
goals): the options both ends parse, how the bytes are cut over connections, the MAC a keyed
copy adds, and one thread per connection.  Nothing here is vmem's migration path."""
from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

__all__ = ["copy_options", "connection_slice", "keyed", "on_each_connection"]


def copy_options(args: Sequence[str]) -> dict:
    """``key=value`` arguments after a copy's mode: ``{"conns": int (default 1), "key":
    bytes or None (``key=HEX``, a 32-byte MAC session key), "verify": bool (``verify=1``),
    "digest": bool (``digest=1``: the sink digests every page it placed, as vmem's
    destination does)}``.

    Raises:
        ValueError: an argument without ``=``, an unknown name, or a bad value.
    """
    opts = dict(a.split("=", 1) for a in args)
    unknown = set(opts) - {"conns", "key", "verify", "digest"}
    if unknown:
        raise ValueError(f"unknown copy option(s) {sorted(unknown)}")
    conns = int(opts.get("conns", 1))
    if conns < 1:
        raise ValueError(f"conns must be >= 1, got {conns}")
    return {"conns": conns, "key": bytes.fromhex(opts["key"]) if "key" in opts else None,
            "verify": opts.get("verify") == "1", "digest": opts.get("digest") == "1"}


def connection_slice(index: int, conns: int, total: int) -> tuple[int, int]:
    """``[lo, hi)`` of the ``total`` bytes that connection ``index`` of ``conns`` carries:
    equal shares, the last one taking the remainder (together they cover every byte once)."""
    share = total // conns
    lo = index * share
    return lo, (total if index == conns - 1 else lo + share)


def keyed(channel, key: bytes | None, role: str):
    """``channel`` wrapped in a MacChannel under ``key`` (``role`` "client" or "server"),
    or ``channel`` itself when ``key`` is None."""
    if key is None:
        return channel
    from transport.secure import MacChannel

    return MacChannel(channel, key, role)


def on_each_connection(work: Callable[[int], None], conns: int) -> None:
    """Run ``work(i)`` for every connection index in a thread of its own and wait for all;
    then re-raise the first exception any of them raised (none is lost)."""
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
