"""The wire format: one message = ZeroMQ multipart ``[header, payload]``.

* ``header``: a msgpack map (keys and meaning in ``docs/wire-format.md``).
* ``payload``: one Arrow IPC *stream* holding exactly one record batch (empty for ``eos``,
  ``watermark`` and ``control`` messages).

This module is the physical layer that turns bytes into (header, batch) and back. It never
unpickles: headers are msgpack (no extension types accepted), payloads are Arrow IPC, and only
Arrow's built-in (C++) canonical extension types are used.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import msgpack
import numpy as np
import pyarrow as pa

from streamcal.errors import WireError
from streamcal.schemas import REGISTRY, SchemaInfo, SchemaRegistry

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Header",
    "encode_header",
    "decode_header",
    "encode_payload",
    "decode_payload",
    "encode",
    "decode",
    "now_ns",
]

FORMAT_VERSION = 1
KINDS = ("data", "eos", "watermark", "control")
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 1 << 20
_EMPTY = b""

now_ns = time.time_ns

# (key, python type(s), required) of the header; see docs/wire-format.md
_REQUIRED: tuple[tuple[str, type | tuple[type, ...]], ...] = (
    ("v", int),
    ("stream", str),
    ("seq", int),
    ("producer", str),
    ("kind", str),
    ("t0_ns", int),
    ("t1_ns", int),
    ("sent_ns", int),
    ("schema", str),
    ("fp", str),
)


@dataclass(slots=True)
class Header:
    """Decoded message header. ``extra`` keeps optional and unknown keys (forward compatible)."""

    stream: str
    seq: int
    producer: str
    kind: str = "data"
    t0_ns: int = 0
    t1_ns: int = 0
    sent_ns: int = 0
    schema: str = ""
    fp: str = ""
    v: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "v": self.v,
            "stream": self.stream,
            "seq": self.seq,
            "producer": self.producer,
            "kind": self.kind,
            "t0_ns": self.t0_ns,
            "t1_ns": self.t1_ns,
            "sent_ns": self.sent_ns,
            "schema": self.schema,
            "fp": self.fp,
        }
        if self.extra:
            d.update(self.extra)
        return d


_TLS = threading.local()  # one reusable msgpack packer per thread


def encode_header(h: Header) -> bytes:
    try:
        packer = _TLS.packer
    except AttributeError:
        packer = _TLS.packer = msgpack.Packer(use_bin_type=True)
    return packer.pack(h.to_dict())


def _no_ext(code: int, data: bytes) -> Any:
    raise WireError("header", f"msgpack extension type {code} is not allowed in a header")


def decode_header(raw: bytes | memoryview) -> Header:
    """Parse and validate a header frame; raises :class:`WireError` with the reason."""
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError("header", f"header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES} bytes")
    try:
        d = msgpack.unpackb(raw, raw=False, strict_map_key=True, ext_hook=_no_ext)
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several types for garbage
        raise WireError("header", f"header is not valid msgpack ({type(exc).__name__}: {exc})") from None
    # fast path: a well-formed header (exact types: msgpack yields plain int/str, and bool is
    # not an int here). Anything else goes through _validate, which words the error.
    if type(d) is dict:
        try:
            v = d["v"]
            stream = d["stream"]
            seq = d["seq"]
            producer = d["producer"]
            kind = d["kind"]
            t0_ns = d["t0_ns"]
            t1_ns = d["t1_ns"]
            sent_ns = d["sent_ns"]
            schema = d["schema"]
            fp = d["fp"]
        except KeyError:
            pass
        else:
            if (
                v == FORMAT_VERSION and type(v) is int and type(stream) is str and type(seq) is int
                and type(producer) is str and type(kind) is str and type(t0_ns) is int
                and type(t1_ns) is int and type(sent_ns) is int and type(schema) is str
                and type(fp) is str and kind in _KIND_SET and seq >= 0
            ):
                extra = {k: val for k, val in d.items() if k not in _KNOWN} if len(d) > _N_REQUIRED else {}
                return Header(stream, seq, producer, kind, t0_ns, t1_ns, sent_ns, schema, fp, v, extra)
    return _validate(d)


def _validate(d: Any) -> Header:
    """The full, ordered checks of a decoded header (docs/wire-format.md section 8): raises the
    first problem found as a :class:`WireError`; returns the header if there is none."""
    if not isinstance(d, dict):
        raise WireError("header", f"header must be a msgpack map, got {type(d).__name__}")
    v = d.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise WireError("header", "header has no integer 'v' (format version)")
    if v != FORMAT_VERSION:
        raise WireError("version", f"unknown format version {v} (this reader speaks version {FORMAT_VERSION})")
    for key, typ in _REQUIRED:
        val = d.get(key)
        if val is None:
            raise WireError("header", f"header is missing '{key}'")
        if not isinstance(val, typ) or isinstance(val, bool):
            raise WireError("header", f"header field '{key}' must be {typ.__name__}, got {type(val).__name__}")
    if d["kind"] not in KINDS:
        raise WireError("kind", f"unknown message kind '{d['kind']}' (expected one of {', '.join(KINDS)})")
    if d["seq"] < 0:
        raise WireError("header", f"header field 'seq' must be >= 0, got {d['seq']}")
    extra = {k: val for k, val in d.items() if k not in _KNOWN}
    return Header(
        stream=d["stream"],
        seq=d["seq"],
        producer=d["producer"],
        kind=d["kind"],
        t0_ns=d["t0_ns"],
        t1_ns=d["t1_ns"],
        sent_ns=d["sent_ns"],
        schema=d["schema"],
        fp=d["fp"],
        v=v,
        extra=extra,
    )


_KNOWN = frozenset(k for k, _ in _REQUIRED)
_N_REQUIRED = len(_REQUIRED)
_KIND_SET = frozenset(KINDS)
# fixed IPC write options: the current (non-legacy) stream format with V5 metadata, whatever the
# ARROW_PRE_* environment variables say (pa.ipc.new_stream reads them on every call)
WRITE_OPTIONS = pa.ipc.IpcWriteOptions(metadata_version=pa.ipc.MetadataVersion.V5, use_legacy_format=False)
_WRITE_OPTIONS = WRITE_OPTIONS
_READ_OPTIONS = pa.ipc.IpcReadOptions()


_IPC_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # end-of-stream marker of the IPC stream format
_SMALL_PAYLOAD = 65536
_SCHEMA_MESSAGES: tuple[tuple[pa.Schema, bytes], ...] = ()  # newest first; replaced, never mutated


def _schema_message(schema: pa.Schema) -> bytes:
    """The encapsulated IPC Schema message of ``schema`` (cached: a stage emits few schemas)."""
    global _SCHEMA_MESSAGES
    for known, message in _SCHEMA_MESSAGES:
        if known.equals(schema, check_metadata=True):
            return message
    message = schema.serialize().to_pybytes()
    _SCHEMA_MESSAGES = ((schema, message),) + _SCHEMA_MESSAGES[:15]
    return message


def encode_payload(batch: pa.RecordBatch) -> pa.Buffer:
    """One Arrow IPC stream (schema message, one record batch, end-of-stream marker)."""
    if batch.get_total_buffer_size() < _SMALL_PAYLOAD:
        # the same bytes as the stream writer below (default IPC write options), without its
        # per-call setup: the schema message is cached, the batch message appended to it
        return pa.py_buffer(_schema_message(batch.schema) + batch.serialize().to_pybytes() + _IPC_EOS)
    sink = pa.BufferOutputStream()
    writer = pa.ipc.RecordBatchStreamWriter(sink, batch.schema, options=_WRITE_OPTIONS)
    try:
        writer.write_batch(batch)
    finally:
        writer.close()
    return sink.getvalue()


def _check_finite(batch: pa.RecordBatch, info: SchemaInfo) -> None:
    for name in info.finite:
        col = batch.column(name)
        if isinstance(col.type, pa.FixedShapeTensorType):
            values = col.storage.flatten()
        elif pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type):
            values = col.flatten()
        else:
            values = col
        arr = values.to_numpy(zero_copy_only=False)
        if arr.dtype.kind == "f" and arr.size and not np.isfinite(arr).all():
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise WireError("nan", f"column '{name}' holds {bad} NaN/inf value(s)")


_IPC_EOS_BUFFER = pa.py_buffer(_IPC_EOS)
_IPC_CONTINUATION = pa.py_buffer(_IPC_EOS[:4])
_REGISTERED_SCHEMA_MESSAGES: dict[str, tuple[pa.Schema, pa.Buffer]] = {}


def _registered_schema_message(info: SchemaInfo) -> pa.Buffer:
    hit = _REGISTERED_SCHEMA_MESSAGES.get(info.name)
    if hit is None or hit[0] is not info.schema:
        hit = _REGISTERED_SCHEMA_MESSAGES[info.name] = (info.schema, info.schema.serialize())
    return hit[1]


def _decode_exact(buf: pa.Buffer, info: SchemaInfo) -> pa.RecordBatch | None:
    """The common payload in one pass: the registered schema's own Schema message (byte for
    byte, as streamcal writes it), one record batch message, then the end-of-stream marker or
    nothing. ``None`` for anything else: the full reader below then decides (and words the
    error), so this only ever accepts what that reader accepts."""
    head = _registered_schema_message(info)
    n = head.size
    if buf.size < n + 8 or not buf.slice(0, n).equals(head) or not buf.slice(n, 4).equals(_IPC_CONTINUATION):
        return None
    try:
        message = pa.ipc.read_message(buf.slice(n))
        if message.type != "record batch":
            return None
        end = n + 8 + message.metadata.size + message.body.size  # continuation + length, metadata, body
        rest = buf.size - end
        if rest != 0 and not (rest == 8 and buf.slice(end).equals(_IPC_EOS_BUFFER)):
            return None
        batch = pa.ipc.read_record_batch(message, info.schema)
        batch.validate(full=False)
    except Exception:
        return None
    if info.finite:
        _check_finite(batch, info)
    return batch


def decode_payload(payload: bytes | memoryview | pa.Buffer, info: SchemaInfo) -> pa.RecordBatch:
    """Parse one IPC stream and check it against the registered schema ``info``."""
    buf = payload if isinstance(payload, pa.Buffer) else pa.py_buffer(payload)
    batch = _decode_exact(buf, info)
    if batch is not None:
        return batch
    return _decode_stream(buf, info)


def _decode_stream(buf: pa.Buffer, info: SchemaInfo) -> pa.RecordBatch:
    """Any IPC stream: read with Arrow's stream reader, every check in order."""
    try:
        reader = pa.ipc.RecordBatchStreamReader(buf, options=_READ_OPTIONS)
        schema = reader.schema
    except Exception as exc:
        raise WireError("payload", f"payload is not an Arrow IPC stream ({exc})") from None
    if not schema.equals(info.schema):
        raise _schema_difference(schema, info)
    try:
        batch = reader.read_next_batch()
    except StopIteration:
        raise WireError("payload", "payload IPC stream holds no record batch") from None
    except Exception as exc:
        raise WireError("payload", f"payload record batch is corrupt ({exc})") from None
    try:
        reader.read_next_batch()
    except StopIteration:
        pass
    except Exception as exc:
        raise WireError("payload", f"payload IPC stream is truncated or corrupt after the batch ({exc})") from None
    else:
        raise WireError("payload", "payload IPC stream holds more than one record batch")
    try:
        batch.validate(full=False)
    except Exception as exc:
        raise WireError("payload", f"record batch is invalid ({exc})") from None
    if info.finite:
        _check_finite(batch, info)
    return batch


def _schema_difference(got: pa.Schema, info: SchemaInfo) -> WireError:
    want = info.schema
    if got.names != want.names:
        return WireError(
            "schema_mismatch", f"schema '{info.name}': columns {got.names} differ from registered {want.names}"
        )
    for g, w in zip(got, want):
        if g.type.equals(w.type) and g.nullable == w.nullable:
            continue
        if isinstance(w.type, pa.FixedShapeTensorType) and isinstance(g.type, pa.FixedShapeTensorType):
            if list(g.type.shape) != list(w.type.shape):
                return WireError(
                    "shape",
                    f"schema '{info.name}': column '{w.name}' has tensor shape {list(g.type.shape)}, "
                    f"expected {list(w.type.shape)}",
                )
        if g.type.equals(w.type):  # only the nullability differs
            return WireError(
                "schema_mismatch",
                f"schema '{info.name}': column '{w.name}' is {'nullable' if g.nullable else 'not nullable'}, "
                f"expected {'nullable' if w.nullable else 'not nullable'} (type {w.type})",
            )
        return WireError(
            "schema_mismatch", f"schema '{info.name}': column '{w.name}' has type {g.type}, expected {w.type}"
        )
    return WireError("schema_mismatch", f"schema '{info.name}': metadata differs")


def encode(header: Header, batch: pa.RecordBatch | None) -> list[bytes | pa.Buffer]:
    """Frames of one message. ``header.sent_ns`` is stamped now if it is 0."""
    if header.sent_ns == 0:
        header.sent_ns = now_ns()
    return [encode_header(header), encode_payload(batch) if batch is not None else _EMPTY]


def decode(
    frames: list[bytes] | list[memoryview],
    *,
    registry: SchemaRegistry = REGISTRY,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    expect_schema: str | None = None,
    shm: Callable[[Any], pa.Buffer] | None = None,
) -> tuple[Header, pa.RecordBatch | None]:
    """Validate and decode one message; raises :class:`WireError` naming the reason.

    ``expect_schema`` (the schema the receiving port is wired to; ``None`` or ``"*"`` for any)
    rejects a message of another stream kind. ``shm`` resolves a header's shared-memory payload
    reference (section 10.3 of the spec) to the payload; without it such a message is rejected.
    A resolved payload replaces ``frames[1]`` in place (so callers can count its bytes).
    """
    if len(frames) != 2:
        raise WireError("frames", f"expected 2 frames [header, payload], got {len(frames)}")
    raw_header, payload = frames
    size = len(raw_header) + len(payload)
    if size > max_bytes:
        raise WireError("oversize", f"message of {size} bytes exceeds the limit of {max_bytes} bytes")
    header = decode_header(raw_header)
    if header.extra and "shm" in header.extra:
        ref = header.extra.pop("shm")
        if header.kind != "data" or len(payload):
            raise WireError("shm", f"a shared-memory reference needs a 'data' message with an empty payload "
                                   f"(got '{header.kind}' with {len(payload)} payload bytes)")
        if shm is None:
            raise WireError("shm", "shared-memory payload on a link that does not offer shared memory")
        payload = frames[1] = shm(ref)
        size = len(raw_header) + len(payload)
        if size > max_bytes:
            raise WireError("oversize", f"message of {size} bytes exceeds the limit of {max_bytes} bytes")
    if header.kind != "data":
        if len(payload):
            raise WireError("payload", f"'{header.kind}' message must have an empty payload")
        return header, None
    if header.schema not in registry:
        raise WireError("schema_unknown", f"unknown schema '{header.schema}'")
    info = registry.get(header.schema)
    if header.fp != info.fingerprint:
        raise WireError(
            "schema_fingerprint",
            f"schema '{header.schema}' fingerprint {header.fp} != registered {info.fingerprint}",
        )
    if expect_schema not in (None, "*") and header.schema != expect_schema:
        raise WireError(
            "schema_mismatch", f"message schema '{header.schema}' where this input expects '{expect_schema}'"
        )
    if header.t1_ns < header.t0_ns:
        raise WireError("header", f"event-time window t0_ns={header.t0_ns} > t1_ns={header.t1_ns}")
    return header, decode_payload(payload, info)
