"""Wire format: round trips for every registered schema (property tests) and every rejection."""

from __future__ import annotations

import msgpack
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamcal import wire
from streamcal.errors import WireError
from streamcal.schemas import REGISTRY, SchemaRegistry, fingerprint, tensor_column, tensor_to_numpy
from streamcal.stage import stage_kinds
from streamcal.wire import Header

stage_kinds()  # import every built-in stage so that all schemas are registered


def _random_column(field: pa.Field, n: int, rng: np.random.Generator) -> pa.Array:
    t = field.type
    if isinstance(t, pa.FixedShapeTensorType):
        shape = [int(s) for s in t.shape]
        dtype = t.value_type.to_pandas_dtype()
        return tensor_column(rng.normal(size=(n, *shape)).astype(dtype))
    if pa.types.is_integer(t):
        info = np.iinfo(t.to_pandas_dtype())
        return pa.array(rng.integers(max(info.min, -(2**40)), min(info.max, 2**40), n, endpoint=True).astype(t.to_pandas_dtype()), type=t)
    if pa.types.is_floating(t):
        return pa.array(rng.normal(size=n).astype(t.to_pandas_dtype()), type=t)
    if pa.types.is_boolean(t):
        return pa.array(rng.integers(0, 2, n).astype(bool))
    if pa.types.is_string(t):
        return pa.array([f"s{rng.integers(1000)}" for _ in range(n)], type=t)
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return pa.array([bytes(rng.integers(0, 256, 5).astype(np.uint8)) for _ in range(n)], type=t)
    if pa.types.is_timestamp(t):
        return pa.array(rng.integers(0, 2**40, n), type=t)
    raise AssertionError(f"no generator for {t}")


def random_batch(info, n: int, seed: int) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    return pa.RecordBatch.from_arrays([_random_column(f, n, rng) for f in info.schema], schema=info.schema)


def _header(info, **kw) -> Header:
    base = dict(stream="s", seq=0, producer="p/0", t0_ns=1, t1_ns=2, schema=info.name, fp=info.fingerprint)
    base.update(kw)
    return Header(**base)


@pytest.mark.parametrize("name", REGISTRY.names())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 40), seed=st.integers(0, 2**32 - 1), seq=st.integers(0, 2**62),
       t0=st.integers(0, 2**62), dt=st.integers(0, 10**12), stream=st.text(min_size=1, max_size=30))
def test_round_trip_every_schema(name, n, seed, seq, t0, dt, stream):
    info = REGISTRY.get(name)
    batch = random_batch(info, n, seed)
    h = _header(info, seq=seq, t0_ns=t0, t1_ns=t0 + dt, stream=stream, extra={"lseq": 3, "src": {"a/0": [[1, 4]]}})
    frames = wire.encode(h, batch)
    h2, b2 = wire.decode([bytes(f) for f in frames])
    assert b2.equals(batch)
    assert h2.to_dict() == h.to_dict()
    # the payload is a plain Arrow IPC stream any Arrow library reads
    assert pa.ipc.open_stream(frames[1]).read_next_batch().equals(batch)


def test_tensor_column_round_trip():
    a = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    col = tensor_column(a)
    assert col.type.shape == [3, 4]
    np.testing.assert_array_equal(tensor_to_numpy(col), a)


def test_fingerprint_is_language_neutral_text_hash():
    import hashlib

    s = pa.schema([pa.field("x", pa.float32(), nullable=False), pa.field("m", pa.fixed_shape_tensor(pa.float64(), [2, 3]))])
    canon = "k|x:float32!;m:tensor<float64>[2,3]"
    assert fingerprint("k", s) == hashlib.sha256(canon.encode()).hexdigest()[:16]


def test_registry_rejects_conflicting_redefinition():
    r = SchemaRegistry()
    r.register("a", pa.schema([("x", pa.int32())]))
    r.register("a", pa.schema([("x", pa.int32())]))  # idempotent
    with pytest.raises(Exception, match="already registered with a different definition"):
        r.register("a", pa.schema([("x", pa.int64())]))


SAMPLES = REGISTRY.get("demo.samples")


def _good_frames():
    batch = random_batch(SAMPLES, 4, 0)
    return wire.encode(_header(SAMPLES), batch)


def _reason(frames, **kw) -> str:
    with pytest.raises(WireError) as e:
        wire.decode(frames, **kw)
    return e.value.reason


def test_rejects_each_kind_of_bad_input():
    h, p = _good_frames()
    assert _reason([h]) == "frames"
    assert _reason([b"\xc1garbage", p]) == "header"
    assert _reason([msgpack.packb([1, 2]), p]) == "header"
    d = msgpack.unpackb(h)
    assert _reason([msgpack.packb({**d, "v": 99}), p]) == "version"
    assert _reason([msgpack.packb({**d, "kind": "weird"}), p]) == "kind"
    assert _reason([msgpack.packb({k: v for k, v in d.items() if k != "seq"}), p]) == "header"
    assert _reason([msgpack.packb({**d, "seq": "x"}), p]) == "header"
    assert _reason([msgpack.packb({**d, "schema": "nope"}), p]) == "schema_unknown"
    assert _reason([msgpack.packb({**d, "fp": "0" * 16}), p]) == "schema_fingerprint"
    assert _reason([h, p], max_bytes=100) == "oversize"
    assert _reason([h, bytes(p)[: len(p) // 2]]) == "payload"
    assert _reason([h, b"\x00" * 64]) == "payload"
    assert _reason([h, p], expect_schema="demo.scored") == "schema_mismatch"
    other = pa.RecordBatch.from_arrays([pa.array([1], pa.int64())], names=["event"])
    assert _reason([h, wire.encode_payload(other)]) == "schema_mismatch"
    nan = pa.RecordBatch.from_arrays(
        [pa.array([1], pa.int64()), pa.array([1], pa.int32()), pa.array([float("nan")])], schema=SAMPLES.schema
    )
    assert _reason([h, wire.encode_payload(nan)]) == "nan"
    ext = msgpack.packb({**d, "x": msgpack.ExtType(1, b"abc")})
    assert _reason([ext, p]) == "header"


def test_rejects_wrong_tensor_shape():
    r = SchemaRegistry()
    info = r.register("t", pa.schema([("m", pa.fixed_shape_tensor(pa.float32(), [2, 2]))]))
    bad = pa.RecordBatch.from_arrays([tensor_column(np.zeros((1, 3, 2), np.float32))], names=["m"])
    h = wire.encode_header(_header(info))
    with pytest.raises(WireError) as e:
        wire.decode([h, wire.encode_payload(bad)], registry=r)
    assert e.value.reason == "shape" and "[3, 2]" in str(e.value) and "[2, 2]" in str(e.value)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=300))
def test_garbage_never_raises_anything_but_wire_error(a, b):
    try:
        wire.decode([a, b])
    except WireError:
        pass


_LOCAL = SchemaRegistry()  # more column types than the registered schemas have, kept out of REGISTRY
_EXTRA_INFOS = [
    _LOCAL.register("test.wire.map", pa.schema([
        pa.field("t0_ns", pa.int64(), nullable=False),
        pa.field("map", pa.fixed_shape_tensor(pa.float32(), [2, 3]), nullable=False),
        pa.field("label", pa.string()),
    ]), finite=("map",)),
    _LOCAL.register("test.wire.blob", pa.schema([pa.field("blob", pa.binary(), nullable=False),
                                                 pa.field("ok", pa.bool_())])),
]


def _infos():
    return [REGISTRY.get(n) for n in REGISTRY.names()] + _EXTRA_INFOS


@pytest.mark.parametrize("info", _infos(), ids=lambda i: i.name)
@pytest.mark.parametrize("n", [0, 1, 7, 3000])
def test_payload_bytes_equal_arrows_stream_writer(info, n):
    """encode_payload (small batches take a shortcut) writes exactly what Arrow's stream writer
    writes, for every schema, sliced batches and schema metadata included."""
    batch = random_batch(info, max(n, 1), seed=n).slice(0, n)  # (no empty tensor column from numpy)
    variants = [batch, batch.slice(n // 3, n // 2),
                batch.replace_schema_metadata({"note": "kept"})]
    for b in variants:
        sink = pa.BufferOutputStream()
        with pa.ipc.RecordBatchStreamWriter(sink, b.schema, options=pa.ipc.IpcWriteOptions()) as w:
            w.write_batch(b)
        assert bytes(wire.encode_payload(b)) == bytes(sink.getvalue())
        assert wire.decode_payload(wire.encode_payload(b), info).equals(b)


def _outcome(fn):
    try:
        return ("ok", fn())
    except WireError as exc:
        return ("error", exc.reason, str(exc))


def _same(a, b) -> bool:
    if a[0] == "ok" and b[0] == "ok":
        return a[1].equals(b[1]) and a[1].schema.equals(b[1].schema, check_metadata=True)
    return a == b


@pytest.mark.parametrize("info", _infos(), ids=lambda i: i.name)
def test_payload_fast_path_agrees_with_the_stream_reader(info):
    """decode_payload's one-pass path accepts only what Arrow's stream reader accepts, with the
    same result; everything else (cut, flipped, padded, two batches, other metadata) gets the
    reader's verdict and wording."""
    batch = random_batch(info, 5, seed=1)
    good = bytes(wire.encode_payload(batch))
    other = bytes(wire.encode_payload(batch.replace_schema_metadata({"k": "v"})))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as w:
        w.write_batch(batch)
        w.write_batch(batch)
    two = sink.getvalue().to_pybytes()
    rng = np.random.default_rng(3)
    variants = [good, good[:-8], good[:-4], good + b"\x00" * 8, good + good, other, two, good[:-9], b""]
    variants += [good[:k] for k in rng.integers(0, len(good), 20)]
    for _ in range(40):
        bad = bytearray(good)
        bad[int(rng.integers(0, len(good)))] ^= 1 << int(rng.integers(0, 8))
        variants.append(bytes(bad))
    accepted = 0
    for payload in variants:
        fast = _outcome(lambda: wire.decode_payload(payload, info))
        slow = _outcome(lambda: wire._decode_stream(pa.py_buffer(payload), info))
        assert _same(fast, slow), (payload, fast, slow)
        accepted += fast[0] == "ok"
    assert wire._decode_exact(pa.py_buffer(good), info) is not None
    assert wire._decode_exact(pa.py_buffer(good[:-8]), info) is not None  # no end-of-stream marker
    assert wire._decode_exact(pa.py_buffer(other), info) is None
    assert wire._decode_exact(pa.py_buffer(two), info) is None
    assert accepted >= 3


def test_a_nullability_mismatch_is_named_as_such():
    h, _ = _good_frames()
    fields = [pa.field(f.name, f.type, nullable=True) for f in SAMPLES.schema]
    batch = pa.RecordBatch.from_arrays([pa.array([1], pa.int64()), pa.array([1], pa.int32()), pa.array([0.5])],
                                       schema=pa.schema(fields))
    with pytest.raises(WireError) as e:
        wire.decode([h, wire.encode_payload(batch)])
    assert e.value.reason == "schema_mismatch"
    assert "column 'event' is nullable, expected not nullable (type int64)" in str(e.value)
