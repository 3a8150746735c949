"""ZeroMQ data plane: output edges (ROUTER, bound by the writer) and input edges (DEALER,
connected by the reader), plus the latest-only publishing (XPUB) socket for external subscribers.

Topology of one stream written by W replicas and read by stages R1..Rk (each with replicas):

* every writer replica binds one ROUTER socket for the stream (``ROUTER_MANDATORY``, so a full
  or absent reader is reported to the writer instead of dropped; ``ROUTER_HANDOVER``, so a
  restarted reader takes over its routing id);
* every reader replica connects one DEALER per writer replica, with routing id
  ``"<stage>/<replica>/<port>"``, and says ``hello`` (so a finished writer re-sends
  end-of-stream to a reader that restarted);
* fan-out: each data message goes to every reader *stage*; load balancing: within a stage, to
  one replica, round-robin over the replicas whose queue has room; fan-in: a reader polls all
  its DEALERs (fair queueing);
* backpressure: ``SNDHWM``/``RCVHWM`` bound each link's queue; when every replica's queue is
  full the writer waits (blocking), and reports the edge by name after ``stall_timeout_s``;
* latest-only links never block the writer: a message that finds the link full is dropped and
  counted, and its lineage is carried by the next message on that link;
* a published stream also goes to an ``XPUB`` socket (``XPUB_NODROP``, non-blocking sends): a
  message that a subscriber has no room for is not published and is counted as dropped, so the
  graph never waits for an external subscriber; only the end-of-stream is retried, for a
  bounded time (``publish_eos_timeout_s``).

Every message on a link carries ``lseq`` (link sequence, gap-free per writer -> reader replica).
The sockets only move bytes; decoding and checks happen in :mod:`streamcal.stage`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa
import zmq

from streamcal import wire
from streamcal.metrics import EdgeCounters
from streamcal.wire import Header

__all__ = ["ReaderGroup", "OutputEdge", "InputEdge", "HELLO", "StopRequested", "bind_socket", "recv_frames", "subscriber"]

log = logging.getLogger("streamcal.transport")

HELLO = b"hello"

# plain-int flags: pyzmq's send_multipart combines enum flags per frame, which costs more than
# the send itself for small messages
_NB = int(zmq.NOBLOCK)
_MORE_NB = int(zmq.SNDMORE | zmq.NOBLOCK)
_COPY_THRESHOLD = 65536  # payloads from this size on are sent zero-copy
_ABSENT = object()


class StopRequested(Exception):
    """Raised inside a blocked send when the run is being aborted."""


@dataclass(frozen=True)
class ReaderGroup:
    """The replicas of one reader stage on a stream: their routing ids, queue bound, options."""

    stage: str
    identities: tuple[bytes, ...]
    latest_only: bool = False


def bind_socket(sock: zmq.Socket, interface: str, port: int = 0) -> str:
    """Bind ``sock`` on ``tcp://interface:port`` (a free port when 0); return the endpoint.
    IPv6 addresses are bracketed as ZeroMQ expects."""
    if ":" in interface:
        sock.setsockopt(zmq.IPV6, 1)
        interface = f"[{interface}]"
    if port:
        sock.bind(f"tcp://{interface}:{port}")
        return f"tcp://{interface}:{port}"
    port = sock.bind_to_random_port(f"tcp://{interface}")
    return f"tcp://{interface}:{port}"


class OutputEdge:
    """One output stream of one writer replica."""

    def __init__(
        self,
        zctx: zmq.Context,
        stream: str,
        readers: list[ReaderGroup],
        *,
        hwm: int,
        interface: str = "127.0.0.1",
        port: int = 0,
        publish: str | None = None,
        publish_hwm: int = 4,
        publish_eos_timeout_s: float = 5.0,
        publish_linger_ms: int = 1000,
        stall_timeout_s: float = 30.0,
        counters: EdgeCounters | None = None,
        should_abort: Callable[[], bool] = lambda: False,
        label: str = "",
    ) -> None:
        self.stream = stream
        self.readers = readers
        self.label = label or stream
        self.counters = counters or EdgeCounters(stream)
        self.stall_timeout_s = stall_timeout_s
        self.should_abort = should_abort
        self.sock = zctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.RCVHWM, 1000)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.endpoint = bind_socket(self.sock, interface, port)
        self.pub: zmq.Socket | None = None
        self.publish_eos_timeout_s = publish_eos_timeout_s
        self.publish_linger_ms = publish_linger_ms
        if publish:
            # XPUB + NODROP: a send that finds a subscriber's queue full fails (zmq.Again) instead
            # of being dropped silently, so drops are counted; sends are non-blocking
            self.pub = zctx.socket(zmq.XPUB)
            self.pub.setsockopt(zmq.XPUB_NODROP, 1)
            self.pub.setsockopt(zmq.SNDHWM, publish_hwm)
            self.pub.setsockopt(zmq.LINGER, publish_linger_ms)
            if publish.startswith("tcp://["):
                self.pub.setsockopt(zmq.IPV6, 1)
            self.pub.bind(publish)
        self._lseq: dict[bytes, int] = {i: 0 for g in readers for i in g.identities}
        self._rr: dict[str, int] = {g.stage: 0 for g in readers}
        self._carry: dict[bytes, dict] = {}  # latest-only: lineage of dropped messages, per link
        self._eos: Header | None = None
        self.ready: set[bytes] = set()

    # ------------------------------------------------------------------ control
    def poll_control(self) -> None:
        """Read hellos from readers (non-blocking); re-send end-of-stream to late ones."""
        if self.pub is not None:
            self._drain_subscriptions()
        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) == 2 and frames[1] == HELLO:
                ident = frames[0]
                self.ready.add(ident)
                if self._eos is not None and ident in self._lseq:
                    log.info("edge %s: reader %s (re)connected after end-of-stream; sending it again",
                             self.label, ident.decode(errors="replace"))
                    self._send_blocking(ident, self._eos, b"", stall_limit=self.stall_timeout_s)

    def _drain_subscriptions(self) -> None:
        """Discard the (un)subscription messages that an XPUB socket hands up."""
        while True:
            try:
                self.pub.recv(_NB)
            except zmq.Again:
                return

    # ------------------------------------------------------------------ data
    def send(self, header: Header, batch: pa.RecordBatch | None) -> int:
        """Route one message (data: one replica per reader stage; others: every replica)."""
        payload = wire.encode_payload(batch) if batch is not None else b""
        if header.sent_ns == 0:
            header.sent_ns = wire.now_ns()
        nbytes = 0
        kind = header.kind
        if kind == "eos":
            self._eos = header
        for group in self.readers:
            if kind == "data":
                nbytes = self._send_balanced(group, header, payload)
            else:
                for ident in group.identities:
                    nbytes = self._send_blocking(ident, header, payload, stall_limit=None)
        if self.pub is not None and (kind == "data" or kind == "eos"):
            header.extra.pop("lseq", None)
            raw = wire.encode_header(header)
            if kind == "data":
                if not self._publish(raw, payload):
                    self.counters.dropped += 1
            else:
                self._publish_eos(raw)
            nbytes = nbytes or len(raw) + len(payload)
        return nbytes

    def _publish(self, raw_header: bytes, payload) -> bool:
        """One non-blocking send on the XPUB socket; False when a subscriber has no room."""
        try:
            self.pub.send(raw_header, _MORE_NB)
        except zmq.Again:
            return False
        # the first frame was accepted: ZeroMQ takes the rest of the message (the queue bound
        # counts whole messages)
        self.pub.send(payload, _NB, copy=len(payload) < _COPY_THRESHOLD)
        return True

    def _publish_eos(self, raw_header: bytes) -> None:
        """Publish the end-of-stream, retrying while a subscriber's queue is full, for at most
        ``publish_eos_timeout_s`` (a stuck subscriber never holds the graph for longer)."""
        t0 = time.monotonic()
        delay = 50e-6
        while not self._publish(raw_header, b""):
            if time.monotonic() - t0 > self.publish_eos_timeout_s or self.should_abort():
                self.counters.dropped += 1
                log.warning("edge %s: a subscriber took no message for %.1f s; its end-of-stream is dropped",
                            self.label, time.monotonic() - t0)
                return
            self.poll_control()
            time.sleep(delay)
            delay = min(delay * 2, 5e-3)

    def send_raw(self, frames: list) -> None:
        """Route pre-built frames like a data message (one replica per reader stage)."""
        for group in self.readers:
            n = len(group.identities)
            start = self._rr[group.stage]
            t_block, delay = None, 50e-6
            while True:
                sent = False
                for k in range(n):
                    ident = group.identities[(start + k) % n]
                    try:
                        self.sock.send_multipart([ident, *frames], zmq.NOBLOCK)
                    except zmq.Again:
                        continue
                    except zmq.ZMQError as exc:
                        if exc.errno == zmq.EHOSTUNREACH:
                            continue
                        raise
                    self._rr[group.stage] = (start + k + 1) % n
                    sent = True
                    break
                if sent:
                    break
                t_block = self._wait(t_block, group.stage, delay)
                delay = min(delay * 2, 5e-3)

    def _header(self, ident: bytes, header: Header) -> tuple[bytes, dict | None]:
        """The header as sent on one link: with that link's ``lseq`` and, merged into ``src``, the
        lineage carried from messages dropped on it. Returns (encoded header, the ``src`` sent).
        ``header`` itself keeps its own ``src``: the carry belongs to this link only."""
        extra = header.extra
        extra["lseq"] = self._lseq[ident]
        carry = self._carry.pop(ident, None) if self._carry else None
        if not carry:
            return wire.encode_header(header), extra.get("src")
        own = extra.get("src", _ABSENT)
        merged = {o: list(r) for o, r in carry.items()}
        if isinstance(own, dict):
            for o, ranges in own.items():
                merged[o] = merged.get(o, []) + list(ranges)
        extra["src"] = merged
        try:
            raw = wire.encode_header(header)
        finally:
            if own is _ABSENT:
                del extra["src"]
            else:
                extra["src"] = own
        return raw, merged

    def _try(self, ident: bytes, raw_header: bytes, payload) -> bool:
        send = self.sock.send
        try:
            send(ident, _MORE_NB)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                return False
            raise
        # the routing frame was accepted (the reader is there and its queue has room): the rest
        # of the message follows without failing
        send(raw_header, _MORE_NB)
        send(payload, _NB, copy=len(payload) < _COPY_THRESHOLD)
        return True

    def _send_balanced(self, group: ReaderGroup, header: Header, payload) -> int:
        n = len(group.identities)
        start = self._rr[group.stage]
        if group.latest_only:
            ident = group.identities[start % n]
            self._rr[group.stage] = (start + 1) % n
            raw, src = self._header(ident, header)
            if self._try(ident, raw, payload):
                self._lseq[ident] += 1
            else:
                self.counters.dropped += 1
                if src:  # the next message on this link carries the dropped one's lineage
                    self._carry[ident] = {o: list(r) for o, r in src.items()}
            return len(raw) + len(payload)
        t_block = None
        delay = 50e-6
        while True:
            for k in range(n):
                ident = group.identities[(start + k) % n]
                raw, _ = self._header(ident, header)
                if self._try(ident, raw, payload):
                    self._lseq[ident] += 1
                    self._rr[group.stage] = (start + k + 1) % n
                    if t_block is not None:
                        self.counters.stalled_s += time.monotonic() - t_block
                    return len(raw) + len(payload)
            t_block = self._wait(t_block, group.stage, delay)
            delay = min(delay * 2, 5e-3)

    def _send_blocking(self, ident: bytes, header: Header, payload, stall_limit: float | None) -> int:
        raw, _ = self._header(ident, header)
        t_block = None
        delay = 50e-6
        while not self._try(ident, raw, payload):
            t_block = self._wait(t_block, ident.decode(errors="replace"), delay)
            delay = min(delay * 2, 5e-3)
            if stall_limit is not None and time.monotonic() - t_block > stall_limit:
                log.error("edge %s: gave up sending '%s' to %s after %.0f s", self.label, header.kind,
                          ident.decode(errors="replace"), stall_limit)
                return 0
        self._lseq[ident] += 1
        if t_block is not None:
            self.counters.stalled_s += time.monotonic() - t_block
        return len(raw) + len(payload)

    def _wait(self, t_block: float | None, target: str, delay: float) -> float:
        now = time.monotonic()
        if t_block is None:
            t_block, self._warned = now, 0
        if self.should_abort():
            raise StopRequested(self.label)
        stalled = now - t_block
        if stalled > self.stall_timeout_s * (self._warned + 1):
            self._warned += 1
            log.warning(
                "edge %s -> %s stuck for %.0f s: no reader replica accepts messages "
                "(full queue, or reader not connected/crashed)", self.label, target, stalled,
            )
        self.poll_control()
        time.sleep(delay)
        return t_block

    def close(self) -> None:
        self.sock.close(linger=1000)
        if self.pub is not None:
            # queued messages (the end-of-stream above all) still reach subscribers for a while
            self.pub.close(linger=self.publish_linger_ms)


class InputEdge:
    """One input port of one reader replica: a DEALER per writer endpoint."""

    def __init__(self, zctx: zmq.Context, port: str, identity: bytes, endpoints: list[str], *, hwm: int) -> None:
        self.port = port
        self.identity = identity
        self.endpoints = list(endpoints)
        self.socks: list[zmq.Socket] = []
        for ep in endpoints:
            s = zctx.socket(zmq.DEALER)
            s.setsockopt(zmq.ROUTING_ID, identity)
            s.setsockopt(zmq.RCVHWM, hwm)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.RECONNECT_IVL, 100)
            s.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
            if ep.startswith("tcp://["):
                s.setsockopt(zmq.IPV6, 1)
            s.connect(ep)
            s.send(HELLO, zmq.NOBLOCK)
            self.socks.append(s)

    def close(self) -> None:
        for s in self.socks:
            s.close(linger=0)


def recv_frames(sock: zmq.Socket, flags: int = 0) -> list:
    """Receive one multipart message as [header bytes, payload buffer] (payload zero-copy).
    Any further frames come as buffers too (the receiver rejects such a message)."""
    recv = sock.recv
    frame = recv(flags, copy=False)
    out = [frame.bytes]
    while frame.more:  # the parts of a message arrive together: no further wait
        frame = recv(flags, copy=False)
        out.append(frame.buffer)
    return out


def subscriber(zctx: zmq.Context, endpoint: str, *, hwm: int = 4) -> zmq.Socket:
    """A SUB socket on a published (latest-only) stream."""
    s = zctx.socket(zmq.SUB)
    s.setsockopt(zmq.RCVHWM, hwm)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.connect(endpoint)
    return s


