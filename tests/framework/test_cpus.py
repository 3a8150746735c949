"""CPU pinning helpers (streamcal.cpus), on this process: no Ray."""

from __future__ import annotations

import os
import threading

import pytest

from streamcal import cpus
from streamcal.errors import StreamcalError

needs_two = pytest.mark.skipif(not cpus.supported() or len(os.sched_getaffinity(0)) < 2,
                               reason="needs Linux and 2 CPUs this process may use")


def test_online_cpus_match_the_kernel():
    online = cpus.online_cpus()
    assert online and min(online) >= 0
    if cpus.supported():
        assert set(os.sched_getaffinity(0)) <= online


@needs_two
def test_keep_off_moves_every_thread_and_what_it_starts_then_restores():
    before = set(os.sched_getaffinity(0))
    off = max(before)
    seen: dict[str, set[int]] = {}
    started = threading.Event()
    release = threading.Event()

    def worker():  # a thread that exists before: it is moved as well
        started.set()
        release.wait(10)
        seen["old"] = os.sched_getaffinity(0)

    t = threading.Thread(target=worker)
    t.start()
    started.wait(10)
    with cpus.keep_off([off]):
        release.set()
        t.join()
        new = threading.Thread(target=lambda: seen.setdefault("new", os.sched_getaffinity(0)))
        new.start()
        new.join()
        assert off not in cpus.process_cpus()
    assert off not in seen["old"] and off not in seen["new"]
    assert set(os.sched_getaffinity(0)) == before


@needs_two
def test_place_stage_pins_or_keeps_off_and_refuses_missing_cpus():
    before = set(os.sched_getaffinity(0))
    last = max(before)
    try:
        assert cpus.place_stage("stage 's'", None, frozenset()) is None  # nothing pinned: left alone
        assert cpus.place_stage("stage 's'", (last,), frozenset({last})) == {last}
        assert cpus.process_cpus() == [last]
        cpus.pin_process(before)
        assert last not in cpus.place_stage("stage 's'", None, frozenset({last}))
        with pytest.raises(StreamcalError, match=r"stage 's': resources.cpus \[4095\]: CPU id\(s\) \[4095\] are not online"):
            cpus.place_stage("stage 's'", (4095,), frozenset({4095}))
    finally:
        cpus.pin_process(before)
