"""vmem.agent.heap: the agent's memory housekeeping and its debugging watch."""
from __future__ import annotations

import gc
import logging
import weakref

import pytest

from vmem.agent.heap import MemoryWatch, collect_cycles, heap_figures
from vmem.errors import ConfigError


class _Node:
    def __init__(self):
        self.buffer = bytearray(1 << 20)
        self.me = self  # a reference cycle, as a bound method kept in an attribute makes


def test_collect_cycles_frees_a_cycle_and_names_its_types():
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        node = _Node()
        ref = weakref.ref(node)
        del node
        assert ref() is not None  # reference counting alone cannot free a cycle
        found = collect_cycles(describe=True)
        assert ref() is None
        assert found["objects"] >= 1 and ("_Node", 1) in found["types"]
    finally:
        if enabled:
            gc.enable()


def test_heap_figures_read_this_process():
    f = heap_figures()
    assert f["rss_anon"] and f["rss_anon"] > 0
    if f["heap_in_use"] is not None:  # glibc
        before = f["heap_in_use"] + f["mmapped"]
        block = bytearray(8 << 20)
        after = heap_figures()
        assert after["heap_in_use"] + after["mmapped"] - before >= len(block) - (1 << 20)


@pytest.mark.parametrize("spec", ["x", "0", "5:-1", "1:2:3", "2.5"])
def test_a_bad_memwatch_setting_is_a_clear_error(spec):
    with pytest.raises(ConfigError, match="VMEM_AGENT_MEMWATCH.*EVERY\\[:TOP\\]"):
        MemoryWatch.from_env({"VMEM_AGENT_MEMWATCH": spec})


def test_memwatch_is_off_unless_asked_and_dumps_every_nth_idle_point(caplog):
    assert MemoryWatch.from_env({}) is None
    watch = MemoryWatch.from_env({"VMEM_AGENT_MEMWATCH": "2"})
    assert [watch.due() for _ in range(4)] == [False, True, False, True]
    with caplog.at_level(logging.WARNING, logger="vmem.agent"):
        dump = watch.dump({"objects": 3, "types": [("_Node", 1)]})
    assert dump["rss_anon"] > 0 and dump["traced"] is None
    assert "memwatch after 4 idle points: RssAnon" in caplog.text and "freed 3 objects in cycles (1 _Node)" in caplog.text


def test_memwatch_with_top_names_the_growing_line():
    import tracemalloc

    watch = MemoryWatch(1, 5)
    try:
        kept = [bytearray(4096) for _ in range(256)]
        assert watch.due()
        dump = watch.dump()
        assert dump["traced"] >= 256 * 4096
        assert any("test_agent_heap.py" in t["where"] and t["size_diff"] >= 256 * 4096 for t in dump["top"]), dump["top"]
        del kept
    finally:
        tracemalloc.stop()
