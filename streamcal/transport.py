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
  one replica, round-robin over the replicas whose queue has room, or, for a message with a
  partition (header ``part``), to replica ``part % replicas`` whatever its queue; fan-in: a
  reader polls all its DEALERs (fair queueing);
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

from streamcal import shm, wire
from streamcal.metrics import EdgeCounters
from streamcal.shm import ShmPool, ShmReader
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
        shm_token: str | None = None,
        shm_limit_bytes: int = 1 << 30,
        shm_prefix: str = "",
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
        self.hwm = hwm
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
        # shared memory: readers whose hello carried our node token; only unpublished streams
        # (a published message needs its payload bytes anyway)
        self.shm_token = shm_token
        self.pool = ShmPool(shm_limit_bytes, prefix=shm_prefix) if shm_token and publish is None and shm.available() else None
        self.shm_readers: set[bytes] = set()
        self._ref: dict | None = None  # the message being sent: its shared-memory reference ...
        self._inline = None  # ... and its inline payload (encoded when a link needs it)
        self._batch: pa.RecordBatch | None = None
        self._holders: set[bytes] = set()
        self._fell_back = False

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
            if len(frames) != 2:
                continue
            ident, body = frames
            if body[:4] == shm.FREE:
                if self.pool is not None:
                    try:
                        self.pool.release(ident, shm.decode_free(body))
                    except ValueError as exc:
                        log.warning("edge %s: bad release from %s: %s", self.label, ident.decode(errors="replace"), exc)
                continue
            if body == HELLO or body.startswith(HELLO + b" "):
                self.ready.add(ident)
                if self.pool is not None:
                    self.pool.forget(ident)  # a (re)started reader holds nothing
                    if body[len(HELLO) + 1:].decode(errors="replace") == self.shm_token:
                        self.shm_readers.add(ident)
                    else:
                        self.shm_readers.discard(ident)
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
        if (batch is not None and self.pool is not None
                and batch.get_total_buffer_size() >= self.pool.min_bytes):
            self.poll_control()  # hellos and releases (a source reads its socket nowhere else)
            held, hwm = self.pool.held, self.hwm
            if any(held.get(i, 0) < hwm for i in self.shm_readers):
                return self._send_shm(header, batch)
            if self.shm_readers:
                self.counters.shm_fallbacks += 1  # every near reader holds a full queue of payloads
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

    def _send_shm(self, header: Header, batch: pa.RecordBatch) -> int:
        """A data message whose payload goes through shared memory to the readers that share
        this node (inline to the others, or to all when the pool has no room)."""
        put = self.pool.put(batch)
        self._fell_back = put is None
        if put is None:
            self._inline = wire.encode_payload(batch)
        else:
            lease, self._ref = put
            self._lease = lease
            self._holders = set()
            self._inline = None
            self._batch = batch  # encoded only if a link without shared memory is chosen
        if header.sent_ns == 0:
            header.sent_ns = wire.now_ns()
        nbytes = 0
        try:
            for group in self.readers:
                nbytes = self._send_balanced(group, header, self._inline)
        finally:
            header.extra.pop("shm", None)
            if put is not None:
                if self._holders:
                    self.counters.shm += 1
                self.pool.commit(lease)
            if self._fell_back:
                self.counters.shm_fallbacks += 1
            self._ref = self._inline = self._batch = None
        return nbytes

    def _link_payload(self, ident: bytes, payload):
        """What goes to ``ident`` for the message being sent: ``(header shm value or None, payload)``."""
        ref = self._ref
        if ref is not None and ident in self.shm_readers:
            if self.pool.held.get(ident, 0) < self.hwm:
                return ref, b""
            self._fell_back = True  # this reader holds a full queue of payloads: inline to it
        if payload is None:  # a shared-memory message, to a reader on another node
            if self._inline is None:
                self._inline = wire.encode_payload(self._batch)
            payload = self._inline
        return None, payload

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
        if self._ref is not None:
            ref, _ = self._link_payload(ident, b"")
            if ref is None:
                extra.pop("shm", None)
            else:
                extra["shm"] = ref
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
        ref = None
        if self._ref is not None:
            ref, payload = self._link_payload(ident, payload)
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
        if ref is not None:
            self._holders.add(ident)
            self.pool.hold(self._lease, ident)
        return True

    def _send_balanced(self, group: ReaderGroup, header: Header, payload) -> int:
        n = len(group.identities)
        start = self._rr[group.stage]
        part = header.extra.get("part")
        if part is not None and not group.latest_only:  # partitioned: one fixed replica, waited for
            return self._send_blocking(group.identities[int(part) % n], header, payload, stall_limit=None)
        if group.latest_only:
            if part is not None:
                start = int(part) % n
            ident = group.identities[start % n]
            self._rr[group.stage] = (start + 1) % n
            raw, src = self._header(ident, header)
            if self._try(ident, raw, payload):
                self._lseq[ident] += 1
            else:
                self.counters.dropped += 1
                if src:  # the next message on this link carries the dropped one's lineage
                    self._carry[ident] = {o: list(r) for o, r in src.items()}
            return len(raw) + self._size(payload)
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
                    return len(raw) + self._size(payload)
            t_block = self._wait(t_block, group.stage, delay)
            delay = min(delay * 2, 5e-3)

    def _size(self, payload) -> int:
        if self._ref is not None:
            return self._ref["size"]
        return len(payload) if payload is not None else len(self._inline or b"")

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
        return len(raw) + self._size(payload)

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
        if self.pool is not None:
            self.pool.close()
        if self.pub is not None:
            # queued messages (the end-of-stream above all) still reach subscribers for a while
            self.pub.close(linger=self.publish_linger_ms)


class InputEdge:
    """One input port of one reader replica: a DEALER per writer endpoint.

    With ``shm_token`` (this node's identity) the hello offers shared memory: writers with the
    same token may then send payloads through shared-memory segments, resolved by
    ``readers[sock]``; :meth:`flush` sends the releases back."""

    def __init__(self, zctx: zmq.Context, port: str, identity: bytes, endpoints: list[str], *, hwm: int,
                 shm_token: str | None = None) -> None:
        self.port = port
        self.identity = identity
        self.endpoints = list(endpoints)
        self.socks: list[zmq.Socket] = []
        self.readers: dict[zmq.Socket, ShmReader] = {}
        hello = HELLO + b" " + shm_token.encode() if shm_token and shm.available() else HELLO
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
            s.send(hello, zmq.NOBLOCK)
            self.socks.append(s)
            if hello is not HELLO:
                self.readers[s] = ShmReader()

    def resolver(self, sock: zmq.Socket) -> Callable | None:
        """The shared-memory resolver of the link ``sock`` (None: the link offers none)."""
        r = self.readers.get(sock)
        return r.resolve if r is not None else None

    def flush(self) -> int:
        """Send the releases of shared-memory payloads no longer referenced; returns how many."""
        n = 0
        for sock, r in self.readers.items():
            if r.pending:
                ids = r.take_pending()
                try:
                    sock.send(shm.encode_free(ids), zmq.NOBLOCK)
                except zmq.Again:  # the writer is not reading: try again later
                    r.pending.extendleft(reversed(ids))
                    continue
                n += len(ids)
        return n

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


