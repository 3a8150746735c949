"""Shared-memory payloads between the stages of one node.

Over TCP loopback a payload is copied into the kernel and out again; at megabytes per message
that copy caps an edge at a few GB/s. When a writer and a reader replica run on the same node,
the writer instead serializes the Arrow IPC payload once into a shared-memory segment
(``/dev/shm``) and sends, over the same ZeroMQ link, only the header with a ``shm`` reference
(segment name, size, lease id) and an empty payload frame. The reader maps the segment and
decodes the batch zero-copy. The wire format is section 10.3 of ``docs/wire-format.md``.

Life of a segment (writer side, :class:`ShmPool`):

* a *slot* is one segment file ``/dev/shm/streamcal-<pool>-<n>``; its space is reserved with
  ``posix_fallocate`` when created, so a full ``/dev/shm`` is a clean refusal, never a crash;
* every message sent through a slot gets a fresh *lease id*; the slot stays busy until every reader
  replica that received the lease has released it (fan-out: one slot, several holders);
* a reader releases a lease when the last Arrow buffer that points into it is freed (so a stage
  may keep a batch as long as it likes: the slot is simply not reused until then), by sending a
  ``free`` frame back on its link;
* a reader replica holds at most as many unreleased leases as its link's queue bound; beyond
  that, messages to it go inline over ZeroMQ (whose queue bound then holds the writer back, as
  on any link): so a slow reader still exerts backpressure, and a stage that keeps its batches
  does not pin an ever-growing pool;
* when no slot is free and the pool is at its byte limit, or ``/dev/shm`` is full, the message
  goes inline over ZeroMQ instead: nothing waits and nothing is lost; both cases are counted as
  fallbacks;
* a reader that says hello again (restarted) implicitly releases all it held; closing the pool
  unlinks every segment (mappings that readers still hold stay valid until they drop them).

Readers only open names that match ``streamcal-<hex>-<n>`` under ``/dev/shm``; a reference that
does not resolve is a rejected message (reason ``shm``), never a crash.
"""

from __future__ import annotations

import collections
import itertools
import logging
import mmap
import os
import re
import secrets
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from streamcal.errors import WireError
from streamcal.wire import WRITE_OPTIONS

__all__ = [
    "SHM_DIR", "SHM_MIN_BYTES", "FREE", "ShmPool", "ShmReader", "available", "encode_free", "decode_free",
    "remove_run",
]

log = logging.getLogger("streamcal.shm")

SHM_DIR = "/dev/shm"
SHM_MIN_BYTES = 256 * 1024  # payloads from this size on go through shared memory (measured: bench)
FREE = b"free"  # release frame: b"free" + little-endian uint64 lease ids
_NAME = re.compile(r"^streamcal-[0-9a-f]{16}-[0-9]{1,9}$")
_ROUND = 1 << 20  # segments are sized in whole MiB, so that a slot fits later messages too


def available() -> bool:
    """Whether this platform has a writable ``/dev/shm`` (Linux)."""
    return sys.platform.startswith("linux") and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def remove_run(prefix: str) -> int:
    """Unlink the segments of run ``prefix`` left on this node (by replicas killed before they
    could close their pools); returns how many."""
    if not prefix or not re.fullmatch(r"[0-9a-f]{1,8}", prefix) or not available():
        return 0
    n = 0
    for name in os.listdir(SHM_DIR):
        if name.startswith(f"streamcal-{prefix}") and _NAME.match(name):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                n += 1
            except FileNotFoundError:
                pass
    return n


def encode_free(ids: list[int]) -> bytes:
    return FREE + struct.pack(f"<{len(ids)}Q", *ids)


def decode_free(frame: bytes) -> list[int]:
    body = frame[len(FREE):]
    if len(body) % 8:
        raise ValueError(f"release frame of {len(frame)} bytes: not 4 + 8*n")
    return list(struct.unpack(f"<{len(body) // 8}Q", body))


def _ipc_size(batch: pa.RecordBatch) -> int:
    """Bytes of the IPC stream (schema, batch, end-of-stream) that ``wire.encode_payload`` writes."""
    mock = pa.MockOutputStream()
    with pa.ipc.new_stream(mock, batch.schema, options=WRITE_OPTIONS) as w:
        w.write_batch(batch)
    return mock.size()


@dataclass
class _Slot:
    name: str
    capacity: int
    mm: mmap.mmap
    buf: pa.Buffer  # writable view of the whole mapping
    lease: int = 0  # the lease in use; 0 = free
    holders: set[bytes] = field(default_factory=set)
    sending: bool = False  # the writer is still routing the message: not free even without holders


class ShmPool:
    """Writer side: the segments of one output edge of one replica."""

    def __init__(self, limit_bytes: int = 1 << 30, *, min_bytes: int = SHM_MIN_BYTES, prefix: str = "") -> None:
        """``prefix``: up to 8 hex digits naming the run, so that :func:`remove_run` finds every
        segment of the run (those of a replica that was killed too)."""
        if not re.fullmatch(r"[0-9a-f]{0,8}", prefix):
            raise ValueError(f"shared-memory prefix must be up to 8 lowercase hex digits, got {prefix!r}")
        self.limit_bytes = limit_bytes
        self.min_bytes = min_bytes
        self.token = prefix + secrets.token_hex(8)[: 16 - len(prefix)]
        self._n = itertools.count()
        self._lease_ids = itertools.count(1)
        self.slots: list[_Slot] = []
        self.leases: dict[int, _Slot] = {}
        self.held: dict[bytes, int] = {}  # leases not yet released, per reader replica
        self.total_bytes = 0
        self.sent = 0  # messages whose payload went through shared memory
        self.fallbacks = 0  # large payloads sent inline: pool full or /dev/shm full
        self._full_warned = False

    # ------------------------------------------------------------------ writing
    def put(self, batch: pa.RecordBatch) -> tuple[int, dict[str, Any]] | None:
        """Serialize ``batch`` into a free slot. Returns (lease id, the header's ``shm`` value),
        or ``None`` when there is no room (the caller sends the payload inline)."""
        size = _ipc_size(batch)
        slot = self._acquire(size)
        if slot is None:
            self.fallbacks += 1
            return None
        out = pa.FixedSizeBufferWriter(slot.buf)
        if size >= 4 * _ROUND:
            out.set_memcopy_threads(2)
        with pa.ipc.new_stream(out, batch.schema, options=WRITE_OPTIONS) as w:
            w.write_batch(batch)
        lease = next(self._lease_ids)
        slot.lease = lease
        slot.sending = True
        self.leases[lease] = slot
        self.sent += 1
        return lease, {"name": slot.name, "size": size, "lease": lease}

    def hold(self, lease: int, ident: bytes) -> None:
        """Reader replica ``ident`` was sent ``lease``."""
        self.leases[lease].holders.add(ident)
        self.held[ident] = self.held.get(ident, 0) + 1

    def commit(self, lease: int) -> None:
        """The message of ``lease`` is routed; if every reader already released it (or none got
        it), the slot is free again."""
        slot = self.leases[lease]
        slot.sending = False
        if not slot.holders:
            self._free(slot)

    def _acquire(self, size: int) -> _Slot | None:
        best = None
        for s in self.slots:
            if not s.lease and s.capacity >= size and (best is None or s.capacity < best.capacity):
                best = s
        if best is not None:
            return best
        cap = -(-size // _ROUND) * _ROUND
        # make room by dropping free slots too small to be of use, smallest first
        while self.total_bytes + cap > self.limit_bytes:
            small = [s for s in self.slots if not s.lease]
            if not small:
                self._warn_full(f"the pool holds {self.total_bytes >> 20} MiB in slots not yet "
                                f"released (limit {self.limit_bytes >> 20} MiB)")
                return None
            self._unlink(min(small, key=lambda s: s.capacity))
        return self._create(cap)

    def _create(self, cap: int) -> _Slot | None:
        name = f"streamcal-{self.token}-{next(self._n)}"
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        except OSError as exc:
            self._warn_full(f"cannot create {path}: {exc}")
            return None
        try:
            os.posix_fallocate(fd, 0, cap)  # reserve the pages now: a full tmpfs is ENOSPC here, not SIGBUS later
            mm = mmap.mmap(fd, cap)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            self._warn_full(f"cannot reserve {cap >> 20} MiB in {SHM_DIR}: {exc}")
            return None
        os.close(fd)
        slot = _Slot(name, cap, mm, pa.py_buffer(mm))
        self.slots.append(slot)
        self.total_bytes += cap
        return slot

    def _warn_full(self, why: str) -> None:
        if not self._full_warned:
            self._full_warned = True
            log.warning("shared memory: %s; large payloads go inline over ZeroMQ meanwhile (counted as fallbacks)", why)

    # ------------------------------------------------------------------ releasing
    def release(self, ident: bytes, leases: list[int]) -> None:
        """Reader ``ident`` is done with ``leases`` (unknown or repeated ids are ignored)."""
        for lease in leases:
            slot = self.leases.get(lease)
            if slot is None or ident not in slot.holders:
                continue
            slot.holders.discard(ident)
            self.held[ident] -= 1
            if not slot.holders and not slot.sending:
                self._free(slot)

    def forget(self, ident: bytes) -> None:
        """Reader ``ident`` restarted: whatever it held is released."""
        self.held.pop(ident, None)
        for lease, slot in list(self.leases.items()):
            if ident in slot.holders:
                slot.holders.discard(ident)
                if not slot.holders and not slot.sending:
                    self._free(slot)

    def _free(self, slot: _Slot) -> None:
        self.leases.pop(slot.lease, None)
        slot.lease = 0
        slot.holders = set()

    def busy(self) -> int:
        return len(self.leases)

    def _unlink(self, slot: _Slot) -> None:
        self.slots.remove(slot)
        self.total_bytes -= slot.capacity
        self.leases.pop(slot.lease, None)
        slot.buf = None  # type: ignore[assignment]
        try:
            slot.mm.close()
        except BufferError:  # a view is still alive in this process: the mapping goes with it
            pass
        try:
            os.unlink(os.path.join(SHM_DIR, slot.name))
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unlink every segment (readers' mappings stay valid until they drop them)."""
        for slot in list(self.slots):
            self._unlink(slot)
        self.leases.clear()

    def stats(self) -> dict[str, int]:
        return {"shm_messages": self.sent, "shm_fallbacks": self.fallbacks, "shm_bytes": self.total_bytes}


class _Lease:
    """Owner of one received lease: released when the last Arrow buffer into it is freed."""

    __slots__ = ("lease", "view", "pending", "__weakref__")

    def __init__(self, lease: int, view: pa.Buffer, pending: collections.deque) -> None:
        self.lease = lease
        self.view = view  # keeps the mapping alive
        self.pending = pending

    def __del__(self) -> None:
        self.pending.append(self.lease)  # deque.append is thread-safe: any thread may free a batch


class ShmReader:
    """Reader side of one link (one DEALER socket): maps segments, hands out payload buffers,
    collects the leases to release."""

    def __init__(self, max_mapped: int = 64) -> None:
        self.max_mapped = max_mapped
        self._maps: collections.OrderedDict[str, pa.Buffer] = collections.OrderedDict()
        self.pending: collections.deque[int] = collections.deque()
        self.received = 0

    def resolve(self, ref: Any) -> pa.Buffer:
        """The payload that a header's ``shm`` value points to; :class:`WireError` (``shm``) when
        the reference is malformed or names no readable segment."""
        if not isinstance(ref, dict):
            raise WireError("shm", f"'shm' must be a map with name, size and lease, got {type(ref).__name__}")
        name, size, lease = ref.get("name"), ref.get("size"), ref.get("lease")
        if not isinstance(name, str) or not _NAME.match(name):
            raise WireError("shm", f"'shm.name' {name!r} is not a streamcal segment name (streamcal-<16 hex>-<n>)")
        if type(size) is not int or size <= 0 or type(lease) is not int or lease <= 0:
            raise WireError("shm", f"'shm.size' and 'shm.lease' must be positive integers, got {size!r}, {lease!r}")
        whole = self._map(name)
        if size > whole.size:
            self.pending.append(lease)  # the writer's lease is not usable: give it back
            raise WireError("shm", f"'shm.size' {size} exceeds segment '{name}' of {whole.size} bytes")
        owner = _Lease(lease, whole, self.pending)
        self.received += 1
        return pa.foreign_buffer(whole.address, size, base=owner)

    def _map(self, name: str) -> pa.Buffer:
        hit = self._maps.get(name)
        if hit is not None:
            self._maps.move_to_end(name)
            return hit
        path = os.path.join(SHM_DIR, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise WireError("shm", f"shared-memory segment '{name}' cannot be opened: {exc.strerror}") from None
        try:
            mm = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        except (OSError, ValueError) as exc:
            raise WireError("shm", f"shared-memory segment '{name}' cannot be mapped: {exc}") from None
        finally:
            os.close(fd)
        buf = pa.py_buffer(mm)
        self._maps[name] = buf
        while len(self._maps) > self.max_mapped:
            self._maps.popitem(last=False)  # leases still alive keep their mapping
        return buf

    def take_pending(self) -> list[int]:
        out = []
        pending = self.pending
        while pending:
            out.append(pending.popleft())
        return out
