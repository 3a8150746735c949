"""Shared-memory payloads between replicas on one node: real /dev/shm segments, real ZeroMQ
sockets on loopback, and a graph on the local Ray."""

from __future__ import annotations

import errno
import os
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest
import zmq

from streamcal import shm, wire
from streamcal.errors import WireError
from streamcal.graph import parse_graph
from streamcal.runtime import run_graph
from streamcal.schemas import register_schema
from streamcal.transport import InputEdge, OutputEdge, ReaderGroup, recv_frames

pytestmark = pytest.mark.skipif(not shm.available(), reason="needs a writable /dev/shm (Linux)")

BLOCK = register_schema("test.shm_block", pa.schema([pa.field("k", pa.int64(), nullable=False),
                                                      pa.field("x", pa.float64(), nullable=False)]))
TOKEN = "node-test"
N = 200_000  # rows: 3.2 MB of payload


def block(k: int, n: int = N) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(np.full(n, k, np.int64)), pa.array(np.arange(n, dtype=np.float64) + k)],
                                      schema=BLOCK.schema)


def header(seq: int) -> wire.Header:
    return wire.Header(stream="s", seq=seq, producer="w/0", kind="data", t0_ns=seq, t1_ns=seq + 1, sent_ns=0,
                       schema=BLOCK.name, fp=BLOCK.fingerprint)


def segments(pool: shm.ShmPool) -> list[str]:
    return [n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"streamcal-{pool.token}-")]


class Link:
    """One writer edge and reader edges (each a replica of its own or of a shared stage)."""

    def __init__(self, readers: dict[str, list[str | None]], *, limit: int = 1 << 30, hwm: int = 64) -> None:
        self.zctx = zmq.Context()
        groups = [ReaderGroup(st, tuple(f"{st}/{k}/in".encode() for k in range(len(toks)))) for st, toks in readers.items()]
        self.out = OutputEdge(self.zctx, "s", groups, hwm=hwm, shm_token=TOKEN, shm_limit_bytes=limit,
                              stall_timeout_s=5.0, label="test")
        self.ins = {f"{st}/{k}": InputEdge(self.zctx, "in", f"{st}/{k}/in".encode(), [self.out.endpoint], hwm=64,
                                           shm_token=tok)
                    for st, toks in readers.items() for k, tok in enumerate(toks)}
        deadline = time.monotonic() + 5
        while len(self.out.ready) < len(self.ins):
            assert time.monotonic() < deadline, "readers did not say hello"
            self.out.poll_control()
            time.sleep(0.005)

    def recv(self, name: str) -> tuple[wire.Header, pa.RecordBatch, list]:
        edge = self.ins[name]
        sock = edge.socks[0]
        assert sock.poll(5000), f"{name} received nothing"
        frames = recv_frames(sock)
        raw_payload_len = len(frames[1])
        h, b = wire.decode(frames, expect_schema=BLOCK.name, shm=edge.resolver(sock))
        return h, b, [raw_payload_len]

    def settle(self) -> None:
        """Readers send their releases, the writer reads them."""
        for e in self.ins.values():
            e.flush()
        time.sleep(0.05)
        self.out.poll_control()

    def close(self) -> None:
        self.out.close()
        for e in self.ins.values():
            e.close()
        self.zctx.term()


@pytest.fixture
def link_factory():
    made = []

    def make(*a, **kw):
        link = Link(*a, **kw)
        made.append(link)
        return link

    yield make
    for link in made:
        link.close()


def test_large_payload_goes_through_shared_memory_and_its_slot_is_reused(link_factory):
    link = link_factory({"r": [TOKEN]})
    pool = link.out.pool
    for k in range(3):
        link.out.send(header(k), block(k))
        h, b, (inline_len,) = link.recv("r/0")
        assert inline_len == 0  # only the header travelled over ZeroMQ
        assert "shm" not in h.extra and h.seq == k
        assert b.equals(block(k))
        del b
        link.settle()
        assert pool.busy() == 0
    assert link.out.counters.shm == 3 and link.out.counters.shm_fallbacks == 0
    assert len(pool.slots) == 1  # released after each message: the same segment served all three
    names = segments(pool)
    assert len(names) == 1
    link.out.close()
    assert segments(pool) == []  # closing the writer unlinks its segments


def test_a_kept_batch_keeps_its_slot_and_a_full_pool_falls_back_inline(link_factory):
    size = wire.encode_payload(block(0)).size
    slot = -(-size // (1 << 20)) << 20
    link = link_factory({"r": [TOKEN]}, limit=2 * slot)
    kept = []
    for k in range(4):
        link.out.send(header(k), block(k))
        h, b, (inline_len,) = link.recv("r/0")
        assert inline_len == (0 if k < 2 else size)  # two slots, then the pool is full: inline
        kept.append(b)
        link.settle()
    assert link.out.counters.shm == 2 and link.out.counters.shm_fallbacks == 2
    for k, b in enumerate(kept):  # nothing was overwritten while it was held
        assert b.equals(block(k))
    assert link.out.pool.busy() == 2
    kept.clear()
    link.settle()
    assert link.out.pool.busy() == 0
    link.out.send(header(9), block(9))
    assert link.recv("r/0")[2] == [0]


def test_a_reader_holding_a_full_queue_of_payloads_gets_the_next_ones_inline(link_factory):
    # unreleased payloads per reader are bounded by the link's queue bound: past it, the ZeroMQ
    # queue (and so backpressure) takes over, and the pool does not grow
    link = link_factory({"r": [TOKEN]}, hwm=3)
    kept = []
    for k in range(6):
        link.out.send(header(k), block(k))
        _, b, (inline_len,) = link.recv("r/0")
        assert (inline_len == 0) == (k < 3)
        kept.append(b)
        link.settle()
    assert link.out.counters.shm == 3 and link.out.counters.shm_fallbacks == 3
    assert len(link.out.pool.slots) == 3 and link.out.pool.held == {b"r/0/in": 3}
    assert all(b.equals(block(k)) for k, b in enumerate(kept))
    del kept[:2], b
    link.settle()
    assert link.out.pool.held == {b"r/0/in": 1}


def test_small_payloads_and_other_nodes_stay_inline(link_factory):
    link = link_factory({"near": [TOKEN], "far": ["another-node"]})
    small = block(1, n=100)
    link.out.send(header(0), small)
    for name in ("near/0", "far/0"):
        h, b, (inline_len,) = link.recv(name)
        assert inline_len > 0 and b.equals(small)
    big = block(2)
    link.out.send(header(1), big)  # fan-out: shared memory to 'near', inline to 'far'
    _, b_near, (n_near,) = link.recv("near/0")
    _, b_far, (n_far,) = link.recv("far/0")
    assert n_near == 0 and n_far == wire.encode_payload(big).size
    assert b_near.equals(big) and b_far.equals(big)
    assert link.out.shm_readers == {b"near/0/in"}


def test_fan_out_slot_is_released_after_every_reader_is_done(link_factory):
    link = link_factory({"a": [TOKEN], "b": [TOKEN, TOKEN]})
    link.out.send(header(0), block(0))
    _, ba, _ = link.recv("a/0")
    got_b = [name for name in ("b/0", "b/1") if link.ins[name].socks[0].poll(500)]
    assert len(got_b) == 1  # load balanced within stage b: one replica
    _, bb, _ = link.recv(got_b[0])
    assert ba.equals(bb)
    del ba
    link.settle()
    assert link.out.pool.busy() == 1  # stage b still holds it
    del bb
    link.settle()
    assert link.out.pool.busy() == 0


def test_a_restarted_reader_releases_what_it_held(link_factory):
    link = link_factory({"r": [TOKEN]})
    link.out.send(header(0), block(0))
    _, held, _ = link.recv("r/0")
    link.settle()
    assert link.out.pool.busy() == 1
    # the replica restarts: a new DEALER with the same routing id says hello again
    old = link.ins["r/0"]
    old.close()
    link.ins["r/0"] = InputEdge(link.zctx, "in", b"r/0/in", [link.out.endpoint], hwm=64, shm_token=TOKEN)
    deadline = time.monotonic() + 5
    while link.out.pool.busy():
        assert time.monotonic() < deadline
        link.out.poll_control()
        time.sleep(0.01)
    assert held.equals(block(0))  # the old process's mapping stays valid


@pytest.mark.parametrize("ref, match", [
    ("seg", "must be a map"),
    ({"name": "../../etc/passwd", "size": 10, "lease": 1}, "not a streamcal segment name"),
    ({"name": "streamcal-0000000000000000-1", "size": 10, "lease": 1}, "cannot be opened"),
    ({"name": "streamcal-0000000000000000-1", "size": -1, "lease": 1}, "positive integers"),
])
def test_bad_references_are_rejected_with_reason_shm(ref, match):
    h = header(0)
    h.extra["shm"] = ref
    with pytest.raises(WireError, match=match) as exc:
        wire.decode([wire.encode_header(h), b""], shm=shm.ShmReader().resolve)
    assert exc.value.reason == "shm"


def test_references_are_checked_against_the_segment_and_the_link(link_factory):
    pool = shm.ShmPool()
    try:
        lease, ref = pool.put(block(0))
        reader = shm.ShmReader()
        h = header(0)
        h.extra["shm"] = dict(ref, size=pool.slots[0].capacity + 1)
        with pytest.raises(WireError, match="exceeds segment"):
            wire.decode([wire.encode_header(h), b""], shm=reader.resolve)
        assert reader.take_pending() == [lease]  # given back, not leaked
        h.extra["shm"] = ref
        with pytest.raises(WireError, match="empty payload"):
            wire.decode([wire.encode_header(h), b"xx"], shm=reader.resolve)
        h.extra["shm"] = ref
        with pytest.raises(WireError, match="does not offer shared memory"):
            wire.decode([wire.encode_header(h), b""])
        h.extra["shm"] = ref
        frames = [wire.encode_header(h), b""]
        with pytest.raises(WireError, match="oversize"):
            wire.decode(frames, shm=reader.resolve, max_bytes=ref["size"] // 2)
        h.extra["shm"] = ref
        frames = [wire.encode_header(h), b""]
        _, b = wire.decode(frames, shm=reader.resolve)
        assert b.equals(block(0)) and len(frames[1]) == ref["size"]  # the resolved payload, for byte counts
    finally:
        pool.close()


def test_a_full_dev_shm_is_a_clean_fallback(monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    pool = shm.ShmPool()
    assert pool.put(block(0)) is None and pool.fallbacks == 1
    assert segments(pool) == []  # the half-made segment is removed


def test_segments_of_a_killed_writer_are_removed_by_run_prefix():
    pool = shm.ShmPool(prefix="0badc0de")
    assert pool.token.startswith("0badc0de") and len(pool.token) == 16
    assert pool.put(block(0)) is not None and len(segments(pool)) == 1
    # the writer's process dies here without closing its pool: the driver removes the run's segments
    assert shm.remove_run("0badc0de") == 1
    assert segments(pool) == []
    with pytest.raises(ValueError, match="8 lowercase hex"):
        shm.ShmPool(prefix="../x")
    assert shm.remove_run("") == 0  # never "every segment"


def test_release_frames_round_trip():
    assert shm.decode_free(shm.encode_free([1, 2**40, 7])) == [1, 2**40, 7]
    with pytest.raises(ValueError, match="not 4 \\+ 8\\*n"):
        shm.decode_free(shm.FREE + b"abc")


GRAPH = textwrap.dedent("""
    settings: {{stall_timeout_s: 20, shared_memory: {shm}}}
    stages:
      - name: source
        kind: synthetic
        config: {{messages: 12, rows: 30000, channels: 4, seed: 3}}
        outputs: {{out: samples}}
      - name: score
        kind: running_stats
        inputs: {{in: samples}}
        outputs: {{out: scored}}
      - name: sink
        kind: collect
        config: {{distinct_column: event, sum_column: score}}
        inputs: {{in: scored}}
    streams:
      samples: {{queue: 16}}
      scored: {{queue: 16}}
    """)


@pytest.mark.ray
def test_a_graph_on_one_node_moves_large_batches_through_shared_memory(ray_session):
    results, run_ids = {}, []
    for flag in ("true", "false"):
        res = run_graph(parse_graph(GRAPH.format(shm=flag)), print_summary=False, progress=False)
        assert res.status == "completed", res.problems
        results[flag] = {r["stage"]: r for r in res.merged["stages"]}
        run_ids.append(res.run_id)
    on, off = results["true"], results["false"]
    # 0.6 MB batches, one node: through shared memory (the queue bound exceeds the message count,
    # so no reader ever holds a full queue of unreleased payloads)
    assert on["source"]["shm_msgs"] == 12 and on["score"]["shm_msgs"] == 12
    assert off["source"]["shm_msgs"] == 0
    s_on, s_off = on["sink"]["summary"][0], off["sink"]["summary"][0]
    assert s_on["rows"] == s_off["rows"] == 12 * 30000 == s_on["distinct_event"]
    assert s_on["sum_score"] == s_off["sum_score"]  # bit-identical results either way
    assert on["sink"]["rejected"] == 0 and on["sink"]["lost"] == 0
    left = [n for n in os.listdir(shm.SHM_DIR) for r in run_ids if n.startswith(f"streamcal-{r}")]
    assert not left  # every segment unlinked
