"""The wire format: one message = ZeroMQ multipart ``[header, payload]``.

* ``header``: a msgpack map (keys and meaning in ``docs/wire-format.md``).
* ``payload``: one Arrow IPC *stream* holding exactly one record batch (empty for ``eos``,
  ``watermark`` and ``control`` messages).

This module is the physical layer that turns bytes into (header, batch) and back. It never
unpickles: headers are msgpack (no extension types accepted), payloads are Arrow IPC, and only
Arrow's built-in (C++) canonical extension types are used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

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


def encode_header(h: Header) -> bytes:
    return msgpack.packb(h.to_dict(), use_bin_type=True)


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


def encode_payload(batch: pa.RecordBatch) -> pa.Buffer:
    """One Arrow IPC stream (schema message, one record batch, end-of-stream marker)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
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


def decode_payload(payload: bytes | memoryview | pa.Buffer, info: SchemaInfo) -> pa.RecordBatch:
    """Parse one IPC stream and check it against the registered schema ``info``."""
    try:
        reader = pa.ipc.open_stream(pa.py_buffer(payload) if not isinstance(payload, pa.Buffer) else payload)
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
        return WireError(
            "schema_mismatch", f"schema '{info.name}': column '{w.name}' has type {g.type}, expected {w.type}"
        )
    return WireError("schema_mismatch", f"schema '{info.name}': metadata or nullability differs")


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
) -> tuple[Header, pa.RecordBatch | None]:
    """Validate and decode one message; raises :class:`WireError` naming the reason.

    ``expect_schema`` (the schema the receiving port is wired to; ``None`` or ``"*"`` for any)
    rejects a message of another stream kind.
    """
    if len(frames) != 2:
        raise WireError("frames", f"expected 2 frames [header, payload], got {len(frames)}")
    raw_header, payload = frames
    size = len(raw_header) + len(payload)
    if size > max_bytes:
        raise WireError("oversize", f"message of {size} bytes exceeds the limit of {max_bytes} bytes")
    header = decode_header(raw_header)
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
