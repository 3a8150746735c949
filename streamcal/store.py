"""Calibration-object store: named objects with a validity interval, in embedded SQLite.

An object is ``name`` + validity ``[t0_ns, t1_ns)`` (event time, nanoseconds; ``t1_ns = None``
means open-ended) + a payload + JSON metadata. :meth:`CalibStore.get` returns the object valid
at a time; where several are valid, the one stored last wins (a newer calibration supersedes an
older one for the interval they share, the rule of ALICE's CCDB). Objects are never overwritten.

Payloads are Arrow (a record batch or table, stored as an Arrow IPC stream: readable from C++,
Java or Python without our code) or plain bytes. Several processes may write at once (WAL mode,
busy timeout); every write is one transaction.

    store = CalibStore("calib.sqlite")
    store.put("tpc/sc_correction", t0_ns, t1_ns, batch, {"model": "sc1d"})
    obj = store.get("tpc/sc_correction", t_ns)  # -> StoredObject or None
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from streamcal.errors import StreamcalError

__all__ = ["CalibStore", "StoredObject", "OPEN_END", "add_subparser"]

OPEN_END = 2**63 - 1  # t1 of an open-ended validity interval
WALL_CLOCK_NS = 10**18  # event times from here on (2001-09-09) are read as wall-clock times when shown
_FORMATS = ("arrow", "bytes")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    name        TEXT    NOT NULL,
    t0_ns       INTEGER NOT NULL,
    t1_ns       INTEGER NOT NULL,
    created_ns  INTEGER NOT NULL,
    format      TEXT    NOT NULL,
    payload     BLOB    NOT NULL,
    sha256      TEXT    NOT NULL,
    metadata    TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_name_t0 ON objects (name, t0_ns);
CREATE TABLE IF NOT EXISTS store_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO store_info VALUES ('format_version', '1');
"""


@dataclass(frozen=True)
class StoredObject:
    """One stored calibration object."""

    id: int
    name: str
    t0_ns: int
    t1_ns: int | None  # None: open-ended
    created_ns: int
    format: str
    sha256: str
    size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    payload: bytes | None = None  # None in listings

    def valid_at(self, t_ns: int) -> bool:
        return self.t0_ns <= t_ns and (self.t1_ns is None or t_ns < self.t1_ns)

    def table(self) -> pa.Table:
        """The payload as an Arrow table (``format == 'arrow'``)."""
        if self.payload is None:
            raise StreamcalError(f"object {self.name}#{self.id}: payload not loaded")
        if self.format != "arrow":
            raise StreamcalError(f"object {self.name}#{self.id}: payload is '{self.format}', not Arrow")
        return pa.ipc.open_stream(pa.py_buffer(self.payload)).read_all()

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "t0_ns": self.t0_ns, "t1_ns": self.t1_ns,
                "created_ns": self.created_ns, "format": self.format, "sha256": self.sha256,
                "size": self.size, "metadata": self.metadata}


def _encode(payload: Any) -> tuple[str, bytes]:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return "bytes", bytes(payload)
    if isinstance(payload, pa.RecordBatch):
        payload = pa.Table.from_batches([payload])
    if isinstance(payload, pa.Table):
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, payload.schema) as w:
            w.write_table(payload)
        return "arrow", sink.getvalue().to_pybytes()
    raise StreamcalError(
        f"payload must be an Arrow RecordBatch/Table or bytes, got {type(payload).__name__}"
    )


class CalibStore:
    """A calibration-object store in one SQLite file (created on first use)."""

    def __init__(self, path: str | os.PathLike, *, timeout_s: float = 30.0, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not self.path.exists():
            raise StreamcalError(f"calibration store '{self.path}' does not exist")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            uri = f"file:{self.path}?mode=ro" if readonly else str(self.path)
            self._db = sqlite3.connect(uri, timeout=timeout_s, uri=readonly, isolation_level=None,
                                       check_same_thread=False)
            if not readonly:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.executescript(_SCHEMA)
            version = self._db.execute("SELECT value FROM store_info WHERE key='format_version'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StreamcalError(f"'{self.path}' is not a calibration store: {exc}") from None
        if version is None or version[0] != "1":
            raise StreamcalError(f"calibration store '{self.path}': unsupported format version {version}")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> "CalibStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ writing
    def put(self, name: str, t0_ns: int, t1_ns: int | None, payload: Any,
            metadata: dict[str, Any] | None = None) -> int:
        """Store an object valid in ``[t0_ns, t1_ns)`` (``None``: open-ended); return its id."""
        if not isinstance(name, str) or not name or name != name.strip():
            raise StreamcalError(f"object name must be a non-empty string without surrounding spaces, got {name!r}")
        if not isinstance(t0_ns, int) or isinstance(t0_ns, bool):
            raise StreamcalError(f"object '{name}': t0_ns must be an integer (ns), got {t0_ns!r}")
        if t1_ns is not None and (not isinstance(t1_ns, int) or isinstance(t1_ns, bool) or t1_ns <= t0_ns):
            raise StreamcalError(f"object '{name}': t1_ns must be an integer > t0_ns={t0_ns} or None, got {t1_ns!r}")
        fmt, blob = _encode(payload)
        try:
            meta = json.dumps(metadata or {}, sort_keys=True)
        except TypeError as exc:
            raise StreamcalError(f"object '{name}': metadata must be JSON-serialisable: {exc}") from None
        cur = self._db.execute(
            "INSERT INTO objects (name, t0_ns, t1_ns, created_ns, format, payload, sha256, metadata) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (name, t0_ns, OPEN_END if t1_ns is None else t1_ns, time.time_ns(), fmt, blob,
             hashlib.sha256(blob).hexdigest(), meta),
        )
        return int(cur.lastrowid)

    # ------------------------------------------------------------------ reading
    def _row(self, row: tuple, with_payload: bool) -> StoredObject:
        id_, name, t0, t1, created, fmt, sha, size, meta, *rest = row
        return StoredObject(id=id_, name=name, t0_ns=t0, t1_ns=None if t1 == OPEN_END else t1, created_ns=created,
                            format=fmt, sha256=sha, size=size, metadata=json.loads(meta),
                            payload=bytes(rest[0]) if with_payload else None)

    _COLS = "id, name, t0_ns, t1_ns, created_ns, format, sha256, length(payload), metadata"

    def get(self, name: str, t_ns: int) -> StoredObject | None:
        """The object named ``name`` valid at ``t_ns`` (the newest stored, if several), or None."""
        row = self._db.execute(
            f"SELECT {self._COLS}, payload FROM objects WHERE name = ? AND t0_ns <= ? AND ? < t1_ns "
            "ORDER BY id DESC LIMIT 1",
            (name, t_ns, t_ns),
        ).fetchone()
        return None if row is None else self._row(row, True)

    def latest(self, name: str) -> StoredObject | None:
        """The object named ``name`` whose validity starts last (the newest stored, if several), or None."""
        row = self._db.execute(
            f"SELECT {self._COLS}, payload FROM objects WHERE name = ? ORDER BY t0_ns DESC, id DESC LIMIT 1", (name,)
        ).fetchone()
        return None if row is None else self._row(row, True)

    def by_id(self, object_id: int) -> StoredObject:
        row = self._db.execute(f"SELECT {self._COLS}, payload FROM objects WHERE id = ?", (object_id,)).fetchone()
        if row is None:
            raise StreamcalError(f"no object with id {object_id} in '{self.path}'")
        return self._row(row, True)

    def list(self, name: str | None = None, at_ns: int | None = None) -> list[StoredObject]:
        """Objects (without payloads), optionally of one name and/or valid at one time."""
        where, args = [], []
        if name is not None:
            where.append("name = ?")
            args.append(name)
        if at_ns is not None:
            where.append("t0_ns <= ? AND ? < t1_ns")
            args += [at_ns, at_ns]
        sql = f"SELECT {self._COLS} FROM objects" + (f" WHERE {' AND '.join(where)}" if where else "")
        return [self._row(r, False) for r in self._db.execute(sql + " ORDER BY name, t0_ns, id", args)]

    def names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT DISTINCT name FROM objects ORDER BY name")]

    def __iter__(self) -> Iterator[StoredObject]:
        return iter(self.list())

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM objects").fetchone()[0])


# ---------------------------------------------------------------------- CLI
def _time_ns(text: str) -> int:
    """``123ns``, ``1.5s``, ``10ms``, ``250us``, a bare integer (ns), or a UTC date and time
    (ISO 8601, ``2026-12-06T21:30:05.25``; the event times of graphs on the wall clock)."""
    units = (("ns", 1), ("us", 10**3), ("ms", 10**6), ("s", 10**9))
    t = text.strip()
    if "T" in t or (t.count("-") >= 2 and ":" in t):
        try:
            when = datetime.datetime.fromisoformat(t.replace(" ", "T"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an ISO 8601 date and time (2026-12-06T21:30:05)") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        delta = when - datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
        return (delta.days * 86400 + delta.seconds) * 10**9 + delta.microseconds * 10**3
    for suffix, scale in units:
        if t.endswith(suffix) and not (suffix == "s" and t[-2:] in ("ns", "us", "ms")):
            try:
                return round(float(t[: -len(suffix)]) * scale)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a time: use ns (an integer) or 1.5s, 10ms, 250us") from None


def _fmt_t(t: int | None) -> str:
    if t is None:
        return "open"
    if t >= WALL_CLOCK_NS:  # an event time on the wall clock: also as a UTC date
        when = datetime.datetime.fromtimestamp(t / 1e9, tz=datetime.timezone.utc)
        return f"{t / 1e9:.6f}s ({when:%Y-%m-%d %H:%M:%S.%f} UTC)"
    return f"{t / 1e9:.6f}s"


def cmd_ls(args: argparse.Namespace) -> int:
    with CalibStore(args.db, readonly=True) as st:
        objs = st.list(args.name, args.at)
        if args.json:
            print(json.dumps([o.info() for o in objs], indent=2))
            return 0
        for o in objs:
            print(f"{o.id:6d}  {o.name:32s} [{_fmt_t(o.t0_ns)}, {_fmt_t(o.t1_ns)})  {o.format:5s} {o.size:9d} B  "
                  f"{json.dumps(o.metadata)[:80]}")
        print(f"{len(objs)} object(s) in {args.db}", file=sys.stderr)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with CalibStore(args.db, readonly=True) as st:
        if args.id is not None:
            obj = st.by_id(args.id)
        elif args.latest:
            obj = st.latest(args.name)
            if obj is None:
                raise StreamcalError(f"no object named '{args.name}'; names in the store: {', '.join(st.names()) or 'none'}")
        else:
            obj = st.get(args.name, args.at)
        if obj is None:
            valid = st.list(args.name)
            hint = (f"; {len(valid)} object(s) named '{args.name}' cover "
                    + ", ".join(f"[{_fmt_t(o.t0_ns)}, {_fmt_t(o.t1_ns)})" for o in valid[:5])) if valid else \
                f"; names in the store: {', '.join(st.names()) or 'none'}"
            raise StreamcalError(f"no object '{args.name}' valid at {_fmt_t(args.at)}{hint}")
        print(json.dumps(obj.info(), indent=2))
        if args.out:
            Path(args.out).write_bytes(obj.payload or b"")
            print(f"payload ({obj.format}, {obj.size} B) written to {args.out}", file=sys.stderr)
        elif obj.format == "arrow":
            print(obj.table().schema)
    return 0


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("store", help="the calibration-object store (list, get)")
    sub = p.add_subparsers(dest="store_command", required=True, metavar="ACTION")
    s = sub.add_parser("ls", help="list objects")
    s.add_argument("--db", default="calib.sqlite", help="store file (default calib.sqlite)")
    s.add_argument("--name")
    s.add_argument("--at", type=_time_ns, help="only objects valid at this time (ns, 1.5s, 10ms, or UTC 2026-12-06T21:30:05)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ls)
    s = sub.add_parser("get", help="the object valid at a time (or by id)")
    s.add_argument("name", nargs="?")
    s.add_argument("--db", default="calib.sqlite")
    s.add_argument("--at", type=_time_ns, help="time (ns, 1.5s, 10ms, or UTC 2026-12-06T21:30:05)")
    s.add_argument("--latest", action="store_true", help="the object whose validity starts last")
    s.add_argument("--id", type=int)
    s.add_argument("--out", help="write the payload here (Arrow IPC stream or raw bytes)")
    s.set_defaults(func=_get_checked)
    return p


def _get_checked(args: argparse.Namespace) -> int:
    if args.id is None and (args.name is None or (args.at is None) == (not args.latest)):
        raise StreamcalError("store get: give NAME and one of --at TIME or --latest, or --id ID")
    return cmd_get(args)
