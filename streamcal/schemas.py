"""Schema registry: one named Arrow schema per stream kind, with a language-neutral fingerprint.

The fingerprint is the first 16 hex digits of the SHA-256 of a canonical text form of the schema
(see ``docs/wire-format.md``, section "Schema fingerprint"), so that a client in any language can
compute it from the field list alone.

Multi-dimensional arrays travel as Arrow's canonical ``arrow.fixed_shape_tensor`` extension type
(row-major, no permutation); :func:`tensor_column` and :func:`tensor_to_numpy` convert.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import pyarrow as pa

from streamcal.errors import StreamcalError

__all__ = [
    "SchemaInfo",
    "SchemaRegistry",
    "REGISTRY",
    "register_schema",
    "get_schema",
    "canonical_type",
    "canonical_schema",
    "fingerprint",
    "tensor_type",
    "tensor_column",
    "tensor_to_numpy",
    "ANY",
]

#: Wildcard schema name a stage input may declare to accept any registered schema (sinks, recorders).
ANY = "*"

_INT_NAMES = {
    pa.int8(): "int8",
    pa.int16(): "int16",
    pa.int32(): "int32",
    pa.int64(): "int64",
    pa.uint8(): "uint8",
    pa.uint16(): "uint16",
    pa.uint32(): "uint32",
    pa.uint64(): "uint64",
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.bool_(): "bool",
    pa.string(): "utf8",
    pa.large_string(): "large_utf8",
    pa.binary(): "binary",
    pa.large_binary(): "large_binary",
    pa.null(): "null",
}


def canonical_type(t: pa.DataType) -> str:
    """Canonical text of an Arrow type (the grammar is in docs/wire-format.md)."""
    if isinstance(t, pa.FixedShapeTensorType):
        if t.permutation is not None and list(t.permutation) != list(range(len(t.shape))):
            raise StreamcalError("fixed_shape_tensor with a permutation is not supported on the wire")
        if t.dim_names:
            raise StreamcalError("fixed_shape_tensor with dim_names is not supported on the wire")
        dims = ",".join(str(int(d)) for d in t.shape)
        return f"tensor<{canonical_type(t.value_type)}>[{dims}]"
    if t in _INT_NAMES:
        return _INT_NAMES[t]
    if pa.types.is_timestamp(t):
        return f"timestamp[{t.unit}{',' + t.tz if t.tz else ''}]"
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{canonical_type(t.value_type)}>[{t.list_size}]"
    if pa.types.is_large_list(t):
        return f"large_list<{canonical_type(t.value_type)}>"
    if pa.types.is_list(t):
        return f"list<{canonical_type(t.value_type)}>"
    if pa.types.is_struct(t):
        inner = ",".join(_canonical_field(t.field(i)) for i in range(t.num_fields))
        return f"struct<{inner}>"
    raise StreamcalError(f"Arrow type {t} is not supported on the wire")


def _canonical_field(f: pa.Field) -> str:
    return f"{f.name}:{canonical_type(f.type)}{'' if f.nullable else '!'}"


def canonical_schema(name: str, schema: pa.Schema) -> str:
    """``name`` + ``|`` + fields joined by ``;`` (``field:type``, ``!`` suffix when not nullable)."""
    return name + "|" + ";".join(_canonical_field(f) for f in schema)


def fingerprint(name: str, schema: pa.Schema) -> str:
    """First 16 hex digits of SHA-256 of :func:`canonical_schema` in UTF-8."""
    return hashlib.sha256(canonical_schema(name, schema).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class SchemaInfo:
    """A registered stream schema. ``finite`` names float columns that must hold no NaN/inf."""

    name: str
    schema: pa.Schema
    doc: str = ""
    finite: tuple[str, ...] = ()
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", fingerprint(self.name, self.schema))
        missing = [c for c in self.finite if c not in self.schema.names]
        if missing:
            raise StreamcalError(f"schema '{self.name}': finite columns {missing} are not in the schema")


class SchemaRegistry:
    """Maps stream-kind names to :class:`SchemaInfo`. Re-registering the same schema is a no-op."""

    def __init__(self) -> None:
        self._by_name: dict[str, SchemaInfo] = {}

    def register(
        self, name: str, schema: pa.Schema, *, doc: str = "", finite: Iterable[str] = ()
    ) -> SchemaInfo:
        info = SchemaInfo(name, schema, doc, tuple(finite))
        old = self._by_name.get(name)
        if old is not None:
            if old.fingerprint != info.fingerprint or old.finite != info.finite:
                raise StreamcalError(
                    f"schema '{name}' is already registered with a different definition "
                    f"(fingerprint {old.fingerprint}, new {info.fingerprint})"
                )
            return old
        self._by_name[name] = info
        return info

    def get(self, name: str) -> SchemaInfo:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise StreamcalError(f"unknown schema '{name}' (registered: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def __iter__(self):
        return iter(self._by_name[n] for n in self.names())


#: The process-wide registry. Stage modules register their schemas at import.
REGISTRY = SchemaRegistry()


def register_schema(name: str, schema: pa.Schema, *, doc: str = "", finite: Iterable[str] = ()) -> SchemaInfo:
    return REGISTRY.register(name, schema, doc=doc, finite=finite)


def get_schema(name: str) -> SchemaInfo:
    return REGISTRY.get(name)


def tensor_type(value_type: pa.DataType, shape: Iterable[int]) -> pa.FixedShapeTensorType:
    """Arrow fixed-shape tensor type (row-major) with the given element type and shape."""
    return pa.fixed_shape_tensor(value_type, [int(s) for s in shape])


def tensor_column(array: np.ndarray) -> pa.FixedShapeTensorArray:
    """A (rows, *shape) numpy array as a fixed-shape tensor column of ``rows`` elements."""
    a = np.ascontiguousarray(array)
    if a.ndim < 2:
        raise StreamcalError(f"tensor_column needs an array of shape (rows, *shape), got shape {a.shape}")
    # numpy leaves arbitrary strides on length-1 axes of a contiguous array; Arrow wants C strides
    a = a.reshape(-1).reshape(a.shape)
    return pa.FixedShapeTensorArray.from_numpy_ndarray(a)


def tensor_to_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Fixed-shape tensor column -> numpy array (rows, *shape), zero-copy where Arrow allows."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not isinstance(column.type, pa.FixedShapeTensorType):
        raise StreamcalError(f"expected a fixed_shape_tensor column, got {column.type}")
    return column.to_numpy_ndarray()
