"""Post-copy migration: the guest runs at the destination before all of its RAM arrived.

* :mod:`.records` -- the post-copy record bodies (PFNS, FAULT) and the urgent page channel's
  framing;
* :mod:`.source` -- :class:`PostcopySource`: serves demand faults ahead of a background push
  that starts from the neighbourhood of recent faults;
* :mod:`.destination` -- :class:`PostcopyDestination`: holds the guest's userfaultfd, knows
  which pages are present at every moment, places pages atomically.

See docs/postcopy.md for the protocol and the failure semantics.
"""
from vmem.format.postcopy import MAX_PFNS_PER_RECORD, decode_pfn_list, encode_pfn_list

__all__ = ["MAX_PFNS_PER_RECORD", "encode_pfn_list", "decode_pfn_list", "drop_links", "native_link"]


def native_link(channel) -> tuple[int, dict | None]:
    """``(fd, mac)`` for the native fault thread that takes over the urgent ``channel``: its
    socket, and the integrity state of a keyed (MacChannel) link, which the thread then
    speaks itself (``channel`` must not be used for data afterwards); ``mac`` is None for a
    plain socket channel."""
    handoff = getattr(channel, "native_handoff", None)
    return channel.fileno(), (handoff() if handoff is not None else None)


def drop_links(*channels) -> None:
    """Close the connections of a post-copy whose link broke (None entries skipped).

    Recovery keeps both sides' state and drops only the links: each side closes what is
    left of its main and urgent connections, quietly (they are already broken), and waits
    for new ones.
    """
    from transport import TransportError

    for ch in channels:
        if ch is not None:
            try:
                ch.close()
            except (TransportError, OSError):
                pass
